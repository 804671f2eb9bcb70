"""``make run``'s stack (``python -m api.stack``) as a user runs it: it prints its URLs and a
working token, submits the smoke job through the API to Ray, and Ctrl-C stops every process
it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import free_port

from orchestrator.processes import alive, descendants, marked

pytestmark = pytest.mark.slow

# Set by the tests in the stack's environment: every process the stack starts inherits it,
# so a test finds them without relying on the stack's own bookkeeping.
TEST_MARKER = "SPARKORCH_TEST_STACK"
READY = "Ctrl-C stops the stack"


def stack_env(home: Path, api_port: int, ui_port: int, dashboard_port: int) -> dict[str, str]:
    """The stack's environment: its own home and ports, no outside Ray, MLflow or settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPARKORCH_", "MLFLOW_"))
    }
    env.update(
        SPARKORCH_HOME=str(home),
        SPARKORCH_API_PORT=str(api_port),
        SPARKORCH_MLFLOW_UI_PORT=str(ui_port),
        SPARKORCH_RAY_DASHBOARD_URL=f"http://127.0.0.1:{dashboard_port}",
        SPARKORCH_RAY_NUM_CPUS="2",
    )
    env[TEST_MARKER] = uuid.uuid4().hex
    return env


def start_stack(env: dict[str, str], out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "api.stack", *args],
        env=env,
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_until_ready(stack: subprocess.Popen, out: Path, timeout: float = 180) -> str:
    """The stack's output once it says it is up; fails if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while READY not in out.read_text():
        assert stack.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.5)
    return out.read_text()


def started_by(stack: subprocess.Popen, env: dict[str, str]) -> set[int]:
    """The live processes the stack started: its tree, and whatever carries the test marker."""
    found = {proc.pid for proc in marked(TEST_MARKER, env[TEST_MARKER])}
    return (found | descendants(stack.pid)) - {stack.pid}


def wait_for_first_step(api: str, headers: dict[str, str], job_id: str) -> int:
    """The job's first logged training step, as its progress shows it."""
    deadline = time.monotonic() + 180
    while True:
        progress = httpx.get(f"{api}/v1/jobs/{job_id}/progress", headers=headers, timeout=30)
        if progress.status_code == 200 and progress.json().get("step"):
            return progress.json()["step"]
        assert time.monotonic() < deadline, f"no training step in 180 s: {progress.text}"
        time.sleep(1)


def wait_for_job_on_ray(api: str, headers: dict[str, str], job_id: str) -> dict:
    """The job once the service has submitted it to Ray (the reconciler does, within seconds)."""
    deadline = time.monotonic() + 60
    while True:
        job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        if job["submissions"] >= 1 and job["state"] not in ("QUEUED", "SUBMITTING"):
            return job
        assert time.monotonic() < deadline, f"the job never reached Ray: {job}"
        time.sleep(1)


def test_make_run_stack_starts_submits_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    api_port, ui_port, dashboard_port = free_port(), free_port(), free_port()
    env = stack_env(home, api_port, ui_port, dashboard_port)
    out = tmp_path / "stack.out"
    stack = start_stack(env, out)
    try:
        text = wait_until_ready(stack, out)
        token = (home / "api-token").read_text().strip()
        assert token in text and oct((home / "api-token").stat().st_mode & 0o777) == "0o600"
        assert f"http://127.0.0.1:{api_port}" in text and f":{ui_port}" in text
        job_id = re.search(r"job ([0-9a-f-]{36})", text).group(1)

        api = f"http://127.0.0.1:{api_port}"
        headers = {"Authorization": f"Bearer {token}"}
        job = wait_for_job_on_ray(api, headers, job_id)
        assert job["name"] == "pretrain-smoke" and job["submissions"] == 1, job
        assert job["state"] in ("PENDING", "RUNNING", "SUCCEEDED"), job
        # Ray itself has the submission (its id is the job id), behind its token.
        ray_token = (home / "ray-auth-token").read_text().strip()
        ray_job = httpx.get(
            f"http://127.0.0.1:{dashboard_port}/api/jobs/{job_id}",
            headers={"Authorization": f"Bearer {ray_token}"},
            timeout=30,
        )
        assert ray_job.status_code == 200, ray_job.text
        assert ray_job.json()["submission_id"] == job_id
        assert "jobs.pretrain" in ray_job.json()["entrypoint"]
        # The stack's Ray processes carry the drivers' settings: nothing travels with the job
        # (a runtime_env would start every worker process twice), and yet the driver and
        # rank 0 find the job store and MLflow: the job trains.
        assert not (ray_job.json().get("runtime_env") or {}).get("env_vars"), ray_job.json()
        assert wait_for_first_step(api, headers, job_id) >= 1

        deadline = time.monotonic() + 60
        while httpx.get(f"{api}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the stack never became ready"
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=30).status_code == 200
        children = started_by(stack, env)
        assert children, "the stack started no processes?"
        # Its Ray carries the drivers' settings; its jobs track through its MLflow server.
        raylet = next(
            p for p in psutil.process_iter(["name"]) if p.pid in children and p.name() == "raylet"
        ).environ()
        assert raylet["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ui_port}"
        assert raylet["SPARKORCH_DATABASE_URL"] == f"sqlite:///{home / 'jobs.db'}"
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=90)
        except subprocess.TimeoutExpired:
            stack.kill()
            raise
    assert stack.returncode == 0, out.read_text()[-3000:]
    assert "stopped." in out.read_text()
    time.sleep(2)
    left = alive(children) | {proc.pid for proc in marked(TEST_MARKER, env[TEST_MARKER])}
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
