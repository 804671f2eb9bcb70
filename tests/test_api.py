"""The REST service over real HTTP (uvicorn, httpx) on a real job store: authentication,
validation, problem+json, idempotency, paging, quotas, limits. Ray is not needed here (the
reconciler is off); tests/test_api_ray.py runs jobs through Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_SPEC, ApiServer

from api.auth import TokenRegistry, hash_token, issue_token
from orchestrator.settings import OrchestratorSettings

SPEC: dict[str, Any] = {**TINY_SPEC, "name": "api-tiny"}


@pytest.fixture
def api_env(tmp_path: Path) -> dict[str, Any]:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    settings = OrchestratorSettings(
        home=home,
        ray_dashboard_url="http://127.0.0.1:9",  # nothing listens: Ray is "down"
        quota_workers_per_job=4,
        api_rate_limit_per_s=1000,
        api_rate_burst=1000,
        api_max_body_bytes=64 * 1024,
    )
    tokens = {owner: issue_token(settings.tokens_file, owner) for owner in ("alice", "bob")}
    return {"settings": settings, "tokens": tokens}


@pytest.fixture
def api(api_env: dict[str, Any]) -> ApiServer:
    with ApiServer(api_env["settings"], reconcile=False) as server:
        yield server


@pytest.fixture
def alice(api: ApiServer, api_env: dict[str, Any]) -> httpx.Client:
    with api.client(api_env["tokens"]["alice"]) as client:
        yield client


def submit(client: httpx.Client, spec: dict[str, Any] = SPEC, **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json={"kind": "pretrain", "spec": spec}, headers=headers)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"]
    return body


# ----------------------------------------------------------------------------- auth


def test_tokens_are_stored_hashed(api_env: dict[str, Any]) -> None:
    path = api_env["settings"].tokens_file
    stored = json.loads(path.read_text())
    token = api_env["tokens"]["alice"]
    assert token not in path.read_text()
    assert stored["alice"] == hash_token(token)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert TokenRegistry.load(path).owner_of(token) == "alice"
    assert TokenRegistry.load(path).owner_of(token + "x") is None


def test_every_route_requires_a_token_except_health(api: ApiServer) -> None:
    """Walks the OpenAPI document: any route that answers without a token fails the test."""
    schema = httpx.get(f"{api.url}/openapi.json").json()
    open_routes = {"/livez", "/readyz"}
    checked = 0
    for path, operations in schema["paths"].items():
        concrete = path.replace("{job_id}", "00000000-0000-4000-8000-000000000000")
        for method in operations:
            for headers in ({}, {"Authorization": "Bearer not-a-token"}):
                response = httpx.request(
                    method, f"{api.url}{concrete}", headers=headers, json={}, timeout=30
                )
                if path in open_routes:
                    assert response.status_code in (200, 503)
                    continue
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                checked += 1
    assert checked >= 2 * 8


def test_livez_and_readyz_reports_ray_down(api: ApiServer) -> None:
    assert httpx.get(f"{api.url}/livez").json() == {"status": "ok", "checks": {}}
    ready = httpx.get(f"{api.url}/readyz", timeout=60)
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["mlflow"] == "ok"
    assert checks["ray"].startswith("unreachable")


# ----------------------------------------------------------------------------- jobs


def test_submit_returns_202_with_the_job_and_links(alice: httpx.Client) -> None:
    response = submit(alice)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "QUEUED" and job["owner"] == "alice" and job["kind"] == "pretrain"
    assert job["spec"]["optim"]["epochs"] == 1 and "mask_ratio" in job["spec"]["spark"]
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["links"]["logs"].endswith(f"/v1/jobs/{job['id']}/logs")
    assert alice.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


def test_other_owners_get_404(api: ApiServer, api_env: dict[str, Any], alice: httpx.Client):
    job_id = submit(alice).json()["id"]
    with api.client(api_env["tokens"]["bob"]) as bob:
        assert_problem(bob.get(f"/v1/jobs/{job_id}"), 404)
        assert_problem(bob.post(f"/v1/jobs/{job_id}/cancel"), 404)
        assert_problem(bob.get(f"/v1/jobs/{job_id}/results"), 404)
        assert bob.get("/v1/jobs").json()["items"] == []
    assert_problem(alice.get("/v1/jobs/not-a-uuid"), 404)


def test_invalid_specs_are_422_naming_the_fields(alice: httpx.Client) -> None:
    bad = {**SPEC, "spark": {"mask_ratio": 1.5}, "optim": {**SPEC["optim"], "epochs": -1}}
    body = assert_problem(submit(alice, bad), 422)
    fields = {e["field"] for e in body["errors"]}
    assert {"spec.spark.mask_ratio", "spec.optim.epochs"} <= fields, body
    body = assert_problem(alice.post("/v1/jobs", json={"kind": "nope", "spec": {}}), 422)
    assert body["errors"][0]["field"] == "kind"
    escape = {**SPEC, "data": {"train": {"kind": "image_folder", "path": "../../etc"}}}
    body = assert_problem(submit(alice, escape), 422)
    assert body["errors"][0]["field"].startswith("spec.data.train.path")
    body = assert_problem(submit(alice, {**SPEC, "name": "rm -rf /; $(reboot)"}), 422)
    assert body["errors"][0]["field"] == "spec.name"
    assert alice.get("/v1/jobs").json()["items"] == []  # nothing half-written


def test_gpu_decoder_without_gpus_is_422_naming_data_decoder(alice: httpx.Client) -> None:
    body = assert_problem(submit(alice, {**SPEC, "data": {**SPEC["data"], "decoder": "gpu"}}), 422)
    assert [e["field"] for e in body["errors"]] == ["spec.data.decoder"]
    assert "resources.gpus_per_worker" in body["errors"][0]["message"]


def test_malformed_json_is_400_and_oversized_bodies_413(alice: httpx.Client) -> None:
    response = alice.post(
        "/v1/jobs",
        content=b'{"kind": "pretrain", "spec": {',
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 400)
    huge = {**SPEC, "tags": {f"k{i}": "v" * 200 for i in range(400)}}
    assert_problem(submit(alice, huge), 413)


def test_quota_over_workers_is_422(alice: httpx.Client) -> None:
    big = {
        **SPEC,
        "resources": {"num_workers": 8},
        "optim": {**SPEC["optim"], "global_batch_size": 32},
    }
    body = assert_problem(submit(alice, big), 422)
    assert body["errors"][0]["field"] == "spec.resources.num_workers"
    assert "quota" in body["errors"][0]["message"]


def test_idempotency_key(alice: httpx.Client) -> None:
    first = submit(alice, **{"Idempotency-Key": "run-42"})
    again = submit(alice, **{"Idempotency-Key": "run-42"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = submit(alice, {**SPEC, "seed": 7}, **{"Idempotency-Key": "run-42"})
    assert_problem(other, 409)
    assert len(alice.get("/v1/jobs").json()["items"]) == 1


def test_list_filters_and_paginates_newest_first(alice: httpx.Client) -> None:
    ids = [submit(alice, {**SPEC, "name": f"job-{i}"}).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = alice.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    named = alice.get("/v1/jobs", params={"name": "job-3"}).json()["items"]
    assert [job["id"] for job in named] == [ids[3]]
    assert alice.get("/v1/jobs", params={"state": "RUNNING"}).json()["items"] == []
    assert_problem(alice.get("/v1/jobs", params={"limit": 1000}), 422)
    assert_problem(alice.get("/v1/jobs", params={"cursor": "garbage"}), 422)


def test_cancelling_a_queued_job_is_idempotent_and_a_finished_one_409(
    alice: httpx.Client,
) -> None:
    job_id = submit(alice).json()["id"]
    first = alice.post(f"/v1/jobs/{job_id}/cancel")
    assert first.status_code == 202 and first.json()["state"] == "CANCELLED"
    assert alice.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "CANCELLED"
    progress = alice.get(f"/v1/jobs/{job_id}/progress").json()
    assert progress["state"] == "CANCELLED" and progress["step"] is None
    assert alice.get(f"/v1/jobs/{job_id}/logs").json()["lines"] == []


def test_rate_limit_answers_429_with_retry_after(api_env: dict[str, Any]) -> None:
    settings = api_env["settings"].model_copy(
        update={"api_rate_limit_per_s": 0.5, "api_rate_burst": 3}
    )
    with (
        ApiServer(settings, reconcile=False) as server,
        server.client(api_env["tokens"]["alice"]) as client,
    ):
        codes = [client.get("/v1/jobs").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        limited = client.get("/v1/jobs")
        assert_problem(limited, 429)
        assert int(limited.headers["retry-after"]) >= 1


def test_spec_schemas(alice: httpx.Client) -> None:
    schemas = alice.get("/v1/specs/schema").json()
    assert set(schemas) == {"pretrain", "finetune", "sweep"}
    assert "spark" in schemas["pretrain"]["properties"]
    assert "weights" in schemas["finetune"]["properties"]
    assert "search" in schemas["sweep"]["properties"]


def test_held_jobs_wait_for_release(alice: httpx.Client) -> None:
    held = alice.post("/v1/jobs", json={"kind": "pretrain", "spec": SPEC, "hold": True}).json()
    assert held["state"] == "HELD"
    released = alice.post(f"/v1/jobs/{held['id']}/release")
    assert released.status_code == 202 and released.json()["state"] == "QUEUED"
    assert_problem(alice.post(f"/v1/jobs/{held['id']}/release"), 409)
    other = alice.post("/v1/jobs", json={"kind": "pretrain", "spec": SPEC, "hold": True}).json()
    assert alice.post(f"/v1/jobs/{other['id']}/cancel").json()["state"] == "CANCELLED"
