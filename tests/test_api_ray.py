"""The REST service driving a real local Ray cluster through the Job Submission API, with the
job store on PostgreSQL and SQLite and MLflow on SQLite: jobs run, are cancelled, survive an
API crash, and are resubmitted when Ray loses them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ApiServer, RayTestCluster, free_port
from mlflow.tracking import MlflowClient

from api.auth import issue_token
from orchestrator.control.store import JobStore, new_job
from orchestrator.settings import OrchestratorSettings
from orchestrator.startup import MARKS

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "name": "api-tiny",
    "model": {"backbone": "resnet18", "input_size": 64},
    "spark": {"decoder_width": 64},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
    "optim": {"global_batch_size": 16, "epochs": 2, "warmup_epochs": 0},
    "resources": {"num_workers": 1},
    "evaluation": {"method": "none"},
    "tracking": {"reconstruction_every": 0},
}

FINETUNE_SPEC: dict[str, Any] = {
    "name": "api-tiny-finetune",
    "model": {"backbone": "resnet18", "input_size": 64},
    "data": {"train": {"kind": "synthetic", "count": 30, "size": 64, "classes": 2}},
    "recipe": {"batch_size": 12, "epochs": 1, "warmup_epochs": 0},
    "resources": {"num_workers": 1},
}


def service_settings(ray_cluster: RayTestCluster, database_url: str | None) -> Any:
    return ray_cluster.settings.model_copy(
        update={"database_url": database_url, "reconcile_interval_s": 0.5}
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def job_state(client: httpx.Client, job_id: str, states: tuple[str, ...]) -> dict | None:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["state"] in states else None


def ray_submissions(ray_cluster: RayTestCluster, job_id: str) -> int:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
    ids = [job.submission_id or "" for job in jobs]
    # The n-th submission of a job is `<job id>-<n>` (control/scheduler.py::submission_id).
    return sum(1 for ray_id in ids if ray_id == job_id or ray_id.startswith(f"{job_id}-"))


def test_a_job_runs_through_ray_and_reports_back(
    ray_cluster: RayTestCluster, postgres_url: str
) -> None:
    settings = service_settings(ray_cluster, postgres_url)
    token = issue_token(settings.tokens_file, "alice")
    with ApiServer(settings) as api, api.client(token) as client:
        created = client.post("/v1/jobs", json={"kind": "pretrain", "spec": SPEC})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        job = wait_for(
            lambda: job_state(client, job_id, ("SUCCEEDED", "FAILED", "CANCELLED")),
            300,
            "the job to end",
        )
        logs = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 500}).json()["lines"]
        assert job["state"] == "SUCCEEDED", "\n".join(logs[-60:])
        assert job["submissions"] == 1 and job["started_at"] and job["finished_at"]
        assert job["mlflow_run_id"]
        assert any("MLflow run" in line for line in logs)
        streamed = client.get(f"/v1/jobs/{job_id}/logs", params={"follow": "true"})
        assert streamed.headers["content-type"].startswith("text/plain")
        assert "MLflow run" in streamed.text

        progress = client.get(f"/v1/jobs/{job_id}/progress").json()
        assert progress["mlflow_status"] == "FINISHED"
        assert progress["step"] == progress["total_steps"] == 4
        results = client.get(f"/v1/jobs/{job_id}/results").json()
        assert "final/loss" in results["metrics"]
        # Where the time to the first step went, counted from the POST, in order (the run
        # opens while Ray Train starts, seconds before the first step).
        startup = {mark: results["metrics"][f"startup/{mark}_s"] for mark in MARKS}
        ordered = [seconds for mark, seconds in startup.items() if mark != "run_opened"]
        assert ordered[0] > 0 and ordered == sorted(ordered), startup
        assert startup["fit_called"] <= startup["run_opened"] <= startup["first_step"], startup
        assert any(path.startswith("encoder/") for path in results["artifacts"])
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409

        run = MlflowClient(settings.tracking_uri).get_run(job["mlflow_run_id"])
        assert run.data.tags["job_id"] == job_id and run.info.status == "FINISHED"

        # Then fine-tune its encoder with the paper's protocol, also over REST.
        finetune = {**FINETUNE_SPEC, "weights": {"kind": "pretrain_job", "job_id": job_id}}
        created = client.post("/v1/jobs", json={"kind": "finetune", "spec": finetune})
        assert created.status_code == 202, created.text
        tuned_id = created.json()["id"]
        tuned = wait_for(
            lambda: job_state(client, tuned_id, ("SUCCEEDED", "FAILED", "CANCELLED")),
            300,
            "the fine-tuning job to end",
        )
        logs = client.get(f"/v1/jobs/{tuned_id}/logs", params={"tail": 500}).json()["lines"]
        assert tuned["state"] == "SUCCEEDED", "\n".join(logs[-60:])
        assert tuned["kind"] == "finetune"
        progress = client.get(f"/v1/jobs/{tuned_id}/progress").json()
        assert progress["step"] == progress["total_steps"] == 2  # 24 images / batch 12
        results = client.get(f"/v1/jobs/{tuned_id}/results").json()
        assert 0 <= results["metrics"]["final/finetune_top1"] <= 100
        assert results["metrics"]["startup/first_step_s"] > 0
        assert any(path.startswith("weights/") for path in results["artifacts"])
        tuned_run = MlflowClient(settings.tracking_uri).get_run(tuned["mlflow_run_id"])
        assert tuned_run.data.tags["sparkorch.source_run_id"] == job["mlflow_run_id"]
        source_run = MlflowClient(settings.tracking_uri).get_run(job["mlflow_run_id"])
        assert f"sparkorch.finetune.{tuned['mlflow_run_id']}" in source_run.data.tags
    assert ray_submissions(ray_cluster, job_id) == 1
    stored = JobStore(postgres_url).get(job_id)
    assert stored.state == "SUCCEEDED" and stored.owner == "alice"


def test_cancel_stops_the_ray_job_and_its_run(ray_cluster: RayTestCluster) -> None:
    settings = service_settings(ray_cluster, None)
    token = issue_token(settings.tokens_file, "carol")
    long = {**SPEC, "name": "api-long", "optim": {**SPEC["optim"], "epochs": 200}}
    with ApiServer(settings) as api, api.client(token) as client:
        job_id = client.post("/v1/jobs", json={"kind": "pretrain", "spec": long}).json()["id"]
        wait_for(
            lambda: (client.get(f"/v1/jobs/{job_id}/progress").json().get("step") or 0) > 0,
            300,
            "training steps",
        )
        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
        job = wait_for(
            lambda: job_state(client, job_id, ("SUCCEEDED", "FAILED", "CANCELLED")),
            120,
            "the cancellation",
        )
        assert job["state"] == "CANCELLED"
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "CANCELLED"
        run = MlflowClient(settings.tracking_uri).get_run(job["mlflow_run_id"])
        assert run.info.status == "KILLED"
    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(job_id)
    assert str(status.value if hasattr(status, "value") else status) == "STOPPED"


def _start_api(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "api"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_killing_the_api_loses_nothing_and_submits_nothing_twice(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    settings = service_settings(ray_cluster, None)
    token = issue_token(settings.tokens_file, "dave")
    port = free_port()
    env = {
        **ray_cluster.env(),
        "SPARKORCH_RAY_DASHBOARD_URL": ray_cluster.dashboard_url,
        "SPARKORCH_API_PORT": str(port),
        "SPARKORCH_RECONCILE_INTERVAL_S": "0.5",
    }
    log = tmp_path / "api.log"
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    api = _start_api(env, log)
    try:
        wait_for(up, 60, "the API to start")
        spec = {**SPEC, "name": "api-crash", "optim": {**SPEC["optim"], "epochs": 4}}
        job_id = client.post("/v1/jobs", json={"kind": "pretrain", "spec": spec}).json()["id"]
        wait_for(lambda: job_state(client, job_id, ("RUNNING",)), 120, "the job to run")
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=30)
        time.sleep(2)
        api = _start_api(env, log)
        wait_for(up, 60, "the API to start again")
        job = wait_for(
            lambda: job_state(client, job_id, ("SUCCEEDED", "FAILED", "CANCELLED")),
            300,
            "the job to end",
        )
        assert job["state"] == "SUCCEEDED", log.read_text()[-3000:]
        assert job["submissions"] == 1
    finally:
        if api.poll() is None:
            api.send_signal(signal.SIGTERM)
            try:
                api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                api.kill()
        client.close()
    assert ray_submissions(ray_cluster, job_id) == 1


def test_jobs_ray_lost_are_resubmitted_or_failed(ray_cluster: RayTestCluster) -> None:
    """Jobs the store believes are running but Ray never heard of (a restarted cluster)."""
    settings: OrchestratorSettings = service_settings(ray_cluster, None).model_copy(
        update={"max_submissions": 2}
    )
    store = JobStore(settings.job_store_url)
    store.migrate()
    jobs = []
    for number, submissions, resubmit in ((1, 1, True), (2, 2, True), (3, 1, False)):
        job = new_job(
            job_id=f"10000000-0000-4000-8000-{number:012d}",
            kind="pretrain",
            name="api-lost",
            owner="erin",
            spec={**SPEC, "name": "api-lost", "failures": {"resubmit_on_loss": resubmit}},
            num_workers=1,
            num_gpus=0,
        )
        store.create(job)
        store.update(job.id, state="RUNNING", submissions=submissions)
        jobs.append(job.id)
    token = issue_token(settings.tokens_file, "erin")
    with ApiServer(settings) as api, api.client(token) as client:
        gave_up = wait_for(lambda: job_state(client, jobs[1], ("FAILED",)), 60, "FAILED")
        assert "Ray no longer knows the job" in gave_up["message"]
        assert "already submitted 2 times" in gave_up["message"]
        refused = wait_for(lambda: job_state(client, jobs[2], ("FAILED",)), 60, "FAILED")
        assert "resubmit_on_loss: false" in refused["message"]
        resubmitted = wait_for(
            lambda: job_state(client, jobs[0], ("RUNNING", "SUCCEEDED")), 120, "resubmission"
        )
        assert resubmitted["submissions"] == 2
        lines = client.get(f"/v1/jobs/{jobs[0]}/logs").json()["lines"]
        assert f"--- submission 2 (Ray submission {jobs[0]}-2) ---" in lines
        client.post(f"/v1/jobs/{jobs[0]}/cancel")
        wait_for(lambda: job_state(client, jobs[0], ("CANCELLED", "SUCCEEDED")), 120, "cancel")
    assert ray_submissions(ray_cluster, jobs[0]) == 1
    assert ray_submissions(ray_cluster, jobs[1]) == ray_submissions(ray_cluster, jobs[2]) == 0


def test_the_per_owner_queue_holds_jobs_over_the_quota(ray_cluster: RayTestCluster) -> None:
    """One job on Ray per owner: the second waits QUEUED and starts once the first ends.
    (A sweep through the API, with its results table, runs in tests/test_rehearsal.py.)"""
    settings = service_settings(ray_cluster, None).model_copy(update={"quota_active_jobs": 1})
    token = issue_token(settings.tokens_file, "frank")
    long = {**SPEC, "name": "api-queue", "optim": {**SPEC["optim"], "epochs": 200}}
    ended = ("SUCCEEDED", "FAILED", "CANCELLED")
    with ApiServer(settings) as api, api.client(token) as client:
        first = client.post("/v1/jobs", json={"kind": "pretrain", "spec": long}).json()["id"]
        second = client.post("/v1/jobs", json={"kind": "pretrain", "spec": long}).json()["id"]
        wait_for(lambda: job_state(client, first, ("RUNNING",)), 120, "the first job to run")
        time.sleep(3)  # several reconciler passes
        waiting = client.get(f"/v1/jobs/{second}").json()
        assert waiting["state"] == "QUEUED" and waiting["submissions"] == 0
        client.post(f"/v1/jobs/{first}/cancel")
        wait_for(lambda: job_state(client, first, ended), 120, "the first job to stop")
        started = wait_for(
            lambda: job_state(client, second, ("PENDING", "RUNNING")), 60, "the second job"
        )
        assert started["submissions"] == 1
        client.post(f"/v1/jobs/{second}/cancel")
        assert wait_for(lambda: job_state(client, second, ended), 120, "cancel")["state"] == (
            "CANCELLED"
        )
