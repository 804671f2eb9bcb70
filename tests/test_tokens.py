"""``sparkctl token create|list|revoke`` on the tokens file, and the running REST service
seeing each change within a second, without a restart (a real server over HTTP, no Ray)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ApiServer

from api.auth import HASH_PATTERN, ReloadingTokenRegistry, hash_token
from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.settings import OrchestratorSettings
from orchestrator.tokens import issue_token, token_owners

WITHIN_S = 1.0


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A running service, sparkctl pointed at its tokens file, and alice's token."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    for name in ("SPARKORCH_API_TOKENS_FILE", "SPARKORCH_API_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARKORCH_HOME", str(home))
    settings = OrchestratorSettings(
        home=home,
        ray_dashboard_url="http://127.0.0.1:9",
        api_rate_limit_per_s=1000,
        api_rate_burst=1000,
    )
    alice = issue_token(settings.tokens_file, "alice")
    with ApiServer(settings, reconcile=False) as server:
        yield {"server": server, "file": settings.tokens_file, "alice": alice}


def sparkctl(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def answer(server: ApiServer, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{server.url}/v1/jobs", headers=headers, timeout=10).status_code


def seconds_until(server: ApiServer, token: str, status: int) -> float:
    """How long after the change a request sent gets ``status`` for ``token`` (fails past
    1 s). Counted at the request's sending: the time a loaded machine takes to answer is
    not the service's staleness."""
    started = time.monotonic()
    while True:
        sent = time.monotonic() - started
        got = answer(server, token)
        if got == status:
            return sent
        assert sent < WITHIN_S, f"still {got}, not {status}, {sent:.2f} s after the change"
        time.sleep(0.02)


def test_a_created_token_is_accepted_without_a_restart(
    tokens: dict, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = sparkctl(capsys, "token", "create", "bob")
    bob = out.strip()
    assert code == 0 and bob.startswith("spk_") and "shown this once" in err
    assert seconds_until(tokens["server"], bob, 200) < WITHIN_S
    assert answer(tokens["server"], tokens["alice"]) == 200


def test_a_revoked_token_is_refused_within_a_second(
    tokens: dict, capsys: pytest.CaptureFixture
) -> None:
    bob = sparkctl(capsys, "token", "create", "bob")[1].strip()
    seconds_until(tokens["server"], bob, 200)
    code, out, _ = sparkctl(capsys, "token", "revoke", "bob")
    assert code == 0 and "revoked bob's token" in out
    assert seconds_until(tokens["server"], bob, 401) < WITHIN_S
    assert answer(tokens["server"], tokens["alice"]) == 200
    assert token_owners(tokens["file"]) == ["alice"]


def test_list_names_owners_only_and_the_file_holds_only_hashes(
    tokens: dict, capsys: pytest.CaptureFixture
) -> None:
    plain = [sparkctl(capsys, "token", "create", name)[1].strip() for name in ("carol", "bob")]
    code, out, _ = sparkctl(capsys, "token", "list")
    assert code == 0 and out.split() == ["alice", "bob", "carol"]
    code, out, _ = sparkctl(capsys, "token", "list", "--json")
    assert json.loads(out)["owners"] == ["alice", "bob", "carol"]
    path: Path = tokens["file"]
    stored = json.loads(path.read_text())
    assert all(HASH_PATTERN.match(digest) for digest in stored.values())
    assert stored["carol"] == hash_token(plain[0]) and stored["bob"] == hash_token(plain[1])
    for secret in [*plain, tokens["alice"]]:
        assert secret not in path.read_text() and secret not in out
    assert not any(digest in out for digest in stored.values())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in path.parent.glob("*.tmp")) == []  # no leftover partials


def test_unknown_names_and_existing_owners_are_clear_errors(
    tokens: dict, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = sparkctl(capsys, "token", "revoke", "nobody")
    assert code == EXIT_BAD_INPUT and "no token for 'nobody'" in err and "alice" in err
    code, _, err = sparkctl(capsys, "token", "create", "alice")
    assert code == EXIT_BAD_INPUT and "already has a token" in err and "--replace" in err
    code, _, err = sparkctl(capsys, "token", "create", "Not A Name")
    assert code == EXIT_BAD_INPUT and "must match" in err
    code, out, _ = sparkctl(capsys, "token", "create", "alice", "--replace", "--json")
    replaced = json.loads(out)
    assert code == 0 and replaced["owner"] == "alice"
    seconds_until(tokens["server"], replaced["token"], 200)
    assert answer(tokens["server"], tokens["alice"]) == 401  # the old one is gone with it


def test_a_malformed_file_keeps_the_last_good_tokens(
    tokens: dict, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    path: Path = tokens["file"]
    server = tokens["server"]
    with caplog.at_level(logging.ERROR, logger="api.auth"):
        for broken in ('{"alice": "9f86', json.dumps({"alice": tokens["alice"]})):
            path.write_text(broken)  # a hand edit gone wrong (not even atomic)
            deadline = time.monotonic() + 3 * 0.25 + 0.1  # past a few reload checks
            while time.monotonic() < deadline:
                assert answer(server, tokens["alice"]) == 200
                time.sleep(0.05)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("never the token itself" in e and "stay in force" in e for e in errors), errors
    assert any("tokens file" in e and "stay in force" in e for e in errors), errors
    code, _, err = sparkctl(capsys, "token", "create", "dave")  # nor written over by sparkctl
    assert code == EXIT_BAD_INPUT and "never the token itself" in err
    path.write_text(json.dumps({"erin": hash_token("erin-token")}))  # fixed by hand
    assert seconds_until(server, "erin-token", 200) < WITHIN_S
    assert answer(server, tokens["alice"]) == 401


def test_concurrent_edits_lose_none(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens.json"
    names = [f"user{i}" for i in range(16)]

    def issue(part: list[str]) -> None:
        for name in part:
            issue_token(path, name)

    threads = [threading.Thread(target=issue, args=(names[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert token_owners(path) == sorted(names)


def test_a_removed_file_leaves_only_the_environments_tokens(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens.json"
    alice = issue_token(path, "alice")
    extra = {"ci": hash_token("ci-token")}
    registry = ReloadingTokenRegistry(path, extra, check_every_s=0)
    assert registry.owner_of(alice) == "alice" and registry.owner_of("ci-token") == "ci"
    path.unlink()
    assert registry.owner_of(alice) is None and registry.owner_of("ci-token") == "ci"
