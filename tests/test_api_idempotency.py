"""Idempotency-Key over real HTTP (uvicorn, httpx) on a real job store, SQLite and
PostgreSQL: a retry of the same request gets the same job (200), a different request under
the same key, ``hold`` included, gets 409. Ray is not needed (the reconciler is off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_SPEC, ApiServer

from api.auth import issue_token
from orchestrator.settings import OrchestratorSettings

SPEC: dict[str, Any] = {**TINY_SPEC, "name": "idem-tiny"}


@pytest.fixture
def alice(tmp_path: Path, store_url: str) -> Iterator[httpx.Client]:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(
        home=home,
        database_url=store_url,
        ray_dashboard_url="http://127.0.0.1:9",  # nothing listens: Ray is "down"
        api_rate_limit_per_s=1000,
        api_rate_burst=1000,
    )
    token = issue_token(settings.tokens_file, "alice")
    with ApiServer(settings, reconcile=False) as server, server.client(token) as client:
        yield client


def submit(client: httpx.Client, key: str, *, hold: bool | None) -> httpx.Response:
    """POST /v1/jobs; ``hold=None`` leaves the field out (the API's default, false)."""
    body: dict[str, Any] = {"kind": "pretrain", "spec": SPEC}
    if hold is not None:
        body["hold"] = hold
    return client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})


@pytest.mark.parametrize("hold", [True, False, None], ids=["held", "queued", "default"])
def test_the_same_request_again_returns_the_same_job(
    alice: httpx.Client, hold: bool | None
) -> None:
    first = submit(alice, "same", hold=hold)
    again = submit(alice, "same", hold=hold)
    assert first.status_code == 202, first.text
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["state"] == ("HELD" if hold else "QUEUED")
    assert len(alice.get("/v1/jobs").json()["items"]) == 1


@pytest.mark.parametrize(("first", "then"), [(True, False), (False, True), (None, True)])
def test_the_same_key_with_another_hold_is_a_conflict(
    alice: httpx.Client, first: bool | None, then: bool
) -> None:
    original = submit(alice, "flip", hold=first)
    assert original.status_code == 202, original.text
    retry = submit(alice, "flip", hold=then)
    assert retry.status_code == 409, retry.text
    assert retry.headers["content-type"].startswith("application/problem+json")
    assert "Idempotency-Key" in retry.json()["detail"]
    # The stored job is as first submitted.
    job = alice.get(f"/v1/jobs/{original.json()['id']}").json()
    assert job["state"] == ("HELD" if first else "QUEUED")
    assert len(alice.get("/v1/jobs").json()["items"]) == 1


def test_a_held_job_released_still_matches_its_held_request(alice: httpx.Client) -> None:
    """The key is checked against the request, not the job's current state."""
    held = submit(alice, "released", hold=True).json()
    assert alice.post(f"/v1/jobs/{held['id']}/release").status_code == 202
    again = submit(alice, "released", hold=True)
    assert again.status_code == 200 and again.json()["id"] == held["id"]
    assert again.json()["state"] == "QUEUED"
