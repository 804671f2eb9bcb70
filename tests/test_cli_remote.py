"""sparkctl's remote verbs and its API client against the real REST service over HTTP."""

from __future__ import annotations

import email.utils
import json
import logging
import shlex
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ApiServer
from test_api import SPEC

from api.auth import issue_token
from orchestrator import cli
from orchestrator.api_client import ApiClient, ApiError, retry_after_s
from orchestrator.cli import EXIT_BAD_INPUT, EXIT_CANCELLED, main
from orchestrator.control.states import JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX
from orchestrator.settings import OrchestratorSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(home=home, ray_dashboard_url="http://127.0.0.1:9")
    token = issue_token(settings.tokens_file, "alice")
    with ApiServer(settings, reconcile=False) as server:
        monkeypatch.setenv("SPARKORCH_API_URL", server.url)
        monkeypatch.setenv("SPARKORCH_TOKEN", token)
        monkeypatch.setenv("SPARKORCH_HOME", str(home))
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(SPEC))
        yield {"spec": spec, "tmp": tmp_path, "server": server, "token": token}


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, Any]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_submit_list_status_cancel_results(remote: dict, capsys: pytest.CaptureFixture) -> None:
    code, job = run_json(capsys, "submit", str(remote["spec"]))
    assert code == 0 and job["state"] == "QUEUED" and job["kind"] == "pretrain"
    code, page = run_json(capsys, "jobs")
    assert code == 0 and [j["id"] for j in page["items"]] == [job["id"]]
    code, status = run_json(capsys, "status", job["id"])
    assert code == 0 and status["progress"]["state"] == "QUEUED"
    code, cancelled = run_json(capsys, "cancel", job["id"])
    assert code == 0 and cancelled["state"] == "CANCELLED"
    assert main(["status", job["id"], "--wait", "--poll", "0.1"]) == EXIT_CANCELLED
    capsys.readouterr()
    code, results = run_json(capsys, "results", job["id"])
    assert code == 0 and results["state"] == "CANCELLED" and results["metrics"] == {}
    assert main(["logs", job["id"]]) == 0


def test_remote_errors_name_the_fields(remote: dict, capsys: pytest.CaptureFixture) -> None:
    bad = remote["tmp"] / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "spark": {"mask_ratio": 2}}))
    code = main(["submit", str(bad)])
    assert code == EXIT_BAD_INPUT
    assert "spec.spark.mask_ratio" in capsys.readouterr().err
    code, document = run_json(capsys, "status", "00000000-0000-4000-8000-000000000000")
    assert code == EXIT_BAD_INPUT and "no job" in document["errors"][0]["message"]


def test_missing_token_is_a_clear_error(
    remote: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("SPARKORCH_TOKEN")
    assert main(["jobs"]) == EXIT_BAD_INPUT
    assert "SPARKORCH_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("SPARKORCH_TOKEN", "wrong")
    assert main(["jobs"]) == EXIT_BAD_INPUT
    assert "401" in capsys.readouterr().err


def spec_named(remote: dict, name: str) -> str:
    path = remote["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "name": name}))
    return str(path)


def test_hold_then_release(remote: dict, capsys: pytest.CaptureFixture) -> None:
    code, held = run_json(capsys, "submit", str(remote["spec"]), "--hold")
    assert code == 0 and held["state"] == "HELD"
    code, page = run_json(capsys, "jobs", "--state", "HELD")
    assert [job["id"] for job in page["items"]] == [held["id"]]
    assert main(["release", held["id"]]) == 0
    assert capsys.readouterr().out.startswith(f"released: {held['id']}")
    code, job = run_json(capsys, "status", held["id"])
    assert job["state"] == "QUEUED"
    assert main(["release", held["id"]]) == EXIT_BAD_INPUT  # not held any more: 409
    assert "HTTP 409" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a held job never ends: nothing to wait for
        main(["submit", str(remote["spec"]), "--hold", "--wait"])
    assert info.value.code == EXIT_BAD_INPUT


def test_jobs_filters(remote: dict, capsys: pytest.CaptureFixture) -> None:
    _, held = run_json(capsys, "submit", spec_named(remote, "held"), "--hold")
    _, queued = run_json(capsys, "submit", spec_named(remote, "queued"))
    _, cancelled = run_json(capsys, "submit", spec_named(remote, "gone"))
    run_json(capsys, "cancel", cancelled["id"])

    def ids(*argv: str) -> list[str]:
        code, page = run_json(capsys, "jobs", *argv)
        assert code == 0
        return [job["id"] for job in page["items"]]

    assert ids("--state", "HELD", "--state", "CANCELLED") == [cancelled["id"], held["id"]]
    assert ids("--state", "QUEUED") == [queued["id"]]
    assert ids("--kind", "pretrain") == [cancelled["id"], queued["id"], held["id"]]
    assert ids("--kind", "sweep") == []
    assert ids("--name", "queued") == [queued["id"]]
    assert ids("--name", "queued", "--state", "HELD") == []


def test_jobs_pages_by_cursor_and_all(remote: dict, capsys: pytest.CaptureFixture) -> None:
    submitted = [run_json(capsys, "submit", spec_named(remote, f"p{i}"))[1] for i in range(3)]
    newest_first = [job["id"] for job in reversed(submitted)]
    seen: list[str] = []
    argv = ["jobs", "--state", "QUEUED", "--limit", "1"]
    while argv:  # follow the printed hint, as a person would
        assert main(argv) == 0
        *lines, last = capsys.readouterr().out.strip().splitlines()
        seen += [line.split()[0] for line in [*lines, last] if not line.startswith("...")]
        argv = shlex.split(last.removeprefix("... more: "))[1:] if last.startswith("...") else []
        assert not argv or (
            "--cursor" in argv and argv[:5] == ["jobs", "--state", "QUEUED", "--limit", "1"]
        )
    assert seen == newest_first
    code, page = run_json(capsys, "jobs", "--limit", "1", "--all")
    assert code == 0 and [job["id"] for job in page["items"]] == newest_first
    assert page["next_cursor"] is None
    code, first = run_json(capsys, "jobs", "--limit", "2")
    code, rest = run_json(capsys, "jobs", "--limit", "2", "--cursor", first["next_cursor"])
    assert [job["id"] for job in first["items"] + rest["items"]] == newest_first


@pytest.mark.parametrize("limit", ["0", str(JOBS_PAGE_MAX + 1), "many"])
def test_jobs_limit_out_of_bounds_is_a_usage_error(
    limit: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["jobs", "--limit", limit])
    assert info.value.code == EXIT_BAD_INPUT
    assert "--limit" in capsys.readouterr().err


def test_the_clients_page_bounds_are_the_apis(remote: dict) -> None:
    schema = httpx.get(f"{remote['server'].url}/openapi.json").json()
    parameters = schema["paths"]["/v1/jobs"]["get"]["parameters"]
    limit = next(p["schema"] for p in parameters if p["name"] == "limit")
    assert (limit["minimum"], limit["maximum"]) == (1, JOBS_PAGE_MAX)
    assert limit["default"] == JOBS_PAGE_DEFAULT


def test_version(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == cli.DISTRIBUTION
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparkctl {project['version']}"
    monkeypatch.setattr(cli, "DISTRIBUTION", "no-such-distribution")
    assert cli.package_version() == f"{project['version']} (not installed)"


# ----------------------------------------------------------------------------- retries


class Waits(list):
    """A client's ``sleep``: records each wait, and sleeps ``real_s`` instead of it (the
    limiter's bucket refills faster than its Retry-After, rounded up to whole seconds)."""

    def __init__(self, real_s: float = 0.0) -> None:
        super().__init__()
        self.real_s = real_s

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(self.real_s)


def rate_limited(tmp_path: Path, rate: float) -> tuple[ApiServer, str]:
    """A server (not started) allowing ``rate`` requests/s per owner, no burst; a token."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(
        home=home,
        ray_dashboard_url="http://127.0.0.1:9",
        api_rate_limit_per_s=rate,
        api_rate_burst=1,
    )
    token = issue_token(settings.tokens_file, "alice")
    return ApiServer(settings, reconcile=False), token


def test_the_client_waits_out_the_rate_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    waits = Waits(real_s=0.25)
    server, token = rate_limited(tmp_path, 5.0)
    with server:
        client = ApiClient(server.url, token, sleep=waits)
        assert client.jobs()["items"] == []  # the one request of the burst
        with caplog.at_level(logging.WARNING, logger="orchestrator.api_client"):
            job = client.submit("pretrain", SPEC)  # 429 first: refused before anything is done
        assert waits == [1.0]  # the Retry-After
        said = "429 from POST /v1/jobs: over 5 requests/s for alice; retry later; "
        assert said + "retrying in 1 s (attempt 2/5)" in caplog.text
        assert [j["id"] for j in client.all_jobs()] == [job["id"]]  # stored once
        client.close()


def test_the_client_gives_up_after_its_bounds(tmp_path: Path) -> None:
    server, token = rate_limited(tmp_path, 0.001)  # Retry-After: 1000 s
    with server:
        waits = Waits()
        client = ApiClient(server.url, token, sleep=waits)
        client.jobs()
        with pytest.raises(ApiError) as error:
            client.jobs()  # past max_wait_s (60 s) at once
        assert error.value.status == 429 and waits == []
        patient = ApiClient(server.url, token, max_attempts=3, max_wait_s=1e6, sleep=waits)
        with pytest.raises(ApiError) as error:
            patient.jobs()
        assert error.value.status == 429 and "requests/s" in str(error.value)
        assert waits == [1000.0, 1000.0]  # 3 attempts, 2 waits


def mock_client(answers: list[httpx.Response | Exception], waits: Waits) -> tuple[ApiClient, list]:
    """A client whose transport answers ``answers`` in turn, and the requests it saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    transport = httpx.MockTransport(handler)
    return ApiClient("http://api.test", "t", sleep=waits, transport=transport), seen


def unavailable(retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(
        503, json={"title": "Service Unavailable", "detail": "Ray is unavailable"}, headers=headers
    )


def test_503_is_retried_after_an_http_date_or_backing_off(caplog: pytest.LogCaptureFixture) -> None:
    waits = Waits()
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    answers = [
        unavailable(later),
        unavailable(None),
        unavailable(None),
        httpx.Response(200, json={"lines": ["ok"]}),
    ]
    client, seen = mock_client(answers, waits)
    with caplog.at_level(logging.WARNING, logger="orchestrator.api_client"):
        assert client.logs("j1") == ["ok"]
    assert len(seen) == 4 and 1.0 < waits[0] <= 3.0 and waits[1:] == [2.0, 4.0]
    assert "503 from GET /v1/jobs/j1/logs: Ray is unavailable; retrying in" in caplog.text
    assert "(attempt 4/5)" in caplog.text


def test_errors_other_than_429_and_503_and_broken_connections_are_not_retried() -> None:
    waits = Waits()
    client, seen = mock_client([httpx.Response(409, json={"detail": "not held"})], waits)
    with pytest.raises(ApiError) as error:
        client.release("j1")
    assert error.value.status == 409 and len(seen) == 1
    client, seen = mock_client([httpx.ConnectError("refused")], waits)
    with pytest.raises(ApiError) as error:
        client.submit("pretrain", SPEC)
    assert error.value.status == 0 and len(seen) == 1 and waits == []


def test_retry_after_values() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    at = email.utils.format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert retry_after_s(at, 1, now=now.timestamp) == 7.0
    assert (
        retry_after_s(
            email.utils.format_datetime(now, usegmt=True), 1, now=lambda: now.timestamp() + 5
        )
        == 0.0
    )
    assert retry_after_s("2", 4) == 2.0
    assert [retry_after_s(v, n) for v, n in ((None, 1), ("soon", 2), ("", 10))] == [1.0, 2.0, 30.0]
