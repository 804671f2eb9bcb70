"""sparkctl's remote verbs against the real REST service over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ApiServer
from test_api import SPEC

from api.auth import issue_token
from orchestrator.cli import EXIT_BAD_INPUT, EXIT_CANCELLED, main
from orchestrator.settings import OrchestratorSettings


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
        yield {"spec": spec, "tmp": tmp_path}


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
