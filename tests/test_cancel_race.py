"""A cancel that races a job's start leaves no driver behind and no MLflow run open.

The race (found against the running service): ``hold`` -> ``release`` -> ``cancel`` at once.
Ray's job supervisor could be stopped while it was spawning the driver; the driver, in its
own session, survived with parent PID 1, trained to the end and ended its run FINISHED,
while the store said CANCELLED and the quota no longer counted it.

* :func:`test_cancel_racing_the_start_leaves_nothing_behind` loops the race on the real
  stack (the REST app with its reconciler against the session's Ray cluster), varying the
  delay between release and cancel so that the cancel lands in QUEUED, SUBMITTING, PENDING
  and RUNNING. ``SPARKORCH_CANCEL_RACE_N`` sets the number of tries (default: one per delay).
* The deterministic tests start ``python -m jobs.pretrain --job-id ID`` themselves, as the
  orphan the race leaves: one whose job is already cancelled in the store, one cancelled in
  the store while it trains (nobody signals it), and one whose parent dies under it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import ApiServer, RayTestCluster
from mlflow.tracking import MlflowClient

from api.auth import issue_token
from orchestrator.control.states import TERMINAL_STATES
from orchestrator.control.store import Job, JobStore, new_job
from orchestrator.driver_guard import RAY_JOB_ENV_VAR, StoreGuard, cancel_reason
from orchestrator.settings import OrchestratorSettings

logger = logging.getLogger(__name__)

# Long enough that a leaked driver is still training when it is looked for.
SPEC: dict[str, Any] = {
    "name": "cancel-race",
    "model": {"backbone": "resnet18", "input_size": 64},
    "spark": {"decoder_width": 64},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
    "optim": {"global_batch_size": 16, "epochs": 200, "warmup_epochs": 0},
    "resources": {"num_workers": 1},
    "evaluation": {"method": "none"},
    "tracking": {"reconstruction_every": 0},
}
# Seconds between release and cancel: the shortest land in SUBMITTING (the release wakes
# the reconciler at once), the middle ones in PENDING while Ray's supervisor starts the
# driver, the longest in RUNNING while the driver imports, opens its run or trains.
DELAYS_S = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3.0, 6.0)
RAY_TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
# How long a cancelled driver may take to go (a loaded 2-core machine imports slowly).
GRACE_S = 45.0
EXIT_CANCELLED = 130


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def job_processes(job_id: str) -> list[psutil.Process]:
    """Live processes whose command line names ``--job-id <job_id>`` (the driver, its shell)."""
    needle = f"--job-id {job_id}"
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            # A zombie has exited: only its parent (maybe PID 1) has not reaped it yet.
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if needle in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    parts = []
    for proc in procs:
        try:
            parts.append(f"pid {proc.pid} ppid {proc.ppid()}: {' '.join(proc.cmdline())}")
        except psutil.Error:
            parts.append(f"pid {proc.pid} (gone)")
    return "; ".join(parts)


def kill_leftovers(job_ids: list[str]) -> None:
    """SIGKILL what the tests' own jobs left running, so one failure does not load the rest."""
    for job_id in job_ids:
        for proc in job_processes(job_id):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue


def job_runs(settings: OrchestratorSettings, job_id: str) -> list[Any]:
    """Every MLflow run tagged with ``job_id`` (none when no driver opened one)."""
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.job_id = '{job_id}'")


def ray_statuses(dashboard_url: str, job: dict[str, Any]) -> list[str | None]:
    """Ray's status of every submission of ``job`` (None: Ray never heard of it)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    ids = [job["id"]] + [f"{job['id']}-{n}" for n in range(2, job["submissions"] + 1)]
    statuses: list[str | None] = []
    for ray_id in ids[: job["submissions"]]:
        try:
            status = client.get_job_status(ray_id)
        except RuntimeError as error:
            if "status code 404" not in str(error):
                raise
            statuses.append(None)
            continue
        statuses.append(str(getattr(status, "value", status)))
    return statuses


def assert_left_nothing(settings: OrchestratorSettings, job_id: str) -> list[str]:
    """No process of the job after the grace period; every run of it KILLED. Returns the
    runs' statuses."""
    try:
        wait_for(lambda: not job_processes(job_id), GRACE_S, "the job's processes to end", 0.25)
    except AssertionError:
        raise AssertionError(
            f"job {job_id} was cancelled but left {describe(job_processes(job_id))}"
        ) from None
    statuses = [run.info.status for run in job_runs(settings, job_id)]
    assert all(status == "KILLED" for status in statuses), (
        f"job {job_id} was cancelled but its MLflow runs ended {statuses}"
    )
    return statuses


# ----------------------------------------------------------------------------- the race


def race_once(client: httpx.Client, dashboard_url: str, delay: float) -> tuple[str, dict]:
    """hold -> release -> (delay) -> cancel; wait for CANCELLED and Ray's end. Returns the
    job id and what the try saw."""
    created = client.post("/v1/jobs", json={"kind": "pretrain", "spec": SPEC, "hold": True})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    released = client.post(f"/v1/jobs/{job_id}/release")
    assert released.status_code in (200, 202), released.text
    if delay:
        time.sleep(delay)
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.text
    job = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in TERMINAL_STATES and j,
        120,
        f"job {job_id} to end",
    )
    assert job["state"] == "CANCELLED", job

    def ray_ended() -> list[str | None] | None:
        statuses = ray_statuses(dashboard_url, job)
        return statuses if all(s is None or s in RAY_TERMINAL for s in statuses) else None

    seen: dict[str, Any] = {"cancelled_in": cancelled.json()["state"]}
    seen["ray"] = wait_for(ray_ended, 120, f"Ray to end job {job_id}") if job["submissions"] else []
    if job["submissions"]:
        seen["driver"] = driver_progress(dashboard_url, job_id)
    return job_id, seen


def driver_progress(dashboard_url: str, ray_id: str) -> str:
    """How far the driver got, from its Ray log (for the test's own log)."""
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(dashboard_url).get_job_logs(ray_id)
    for marker, what in (
        ("cancelled; the MLflow", "cancelled"),
        ("MLflow run", "opened its run"),
        ("not starting", "refused to start"),
        ("Running entrypoint", "started"),
    ):
        if marker in logs:
            return what
    return "never started"


@pytest.mark.slow
def test_cancel_racing_the_start_leaves_nothing_behind(ray_cluster: RayTestCluster) -> None:
    settings = ray_cluster.settings.model_copy(
        update={"database_url": None, "reconcile_interval_s": 0.5}
    )
    token = issue_token(settings.tokens_file, "race")
    tries = int(os.environ.get("SPARKORCH_CANCEL_RACE_N", len(DELAYS_S)))
    job_ids: list[str] = []
    try:
        with ApiServer(settings) as api, api.client(token) as client:
            for number in range(tries):
                delay = DELAYS_S[number % len(DELAYS_S)]
                job_id, seen = race_once(client, ray_cluster.dashboard_url, delay)
                job_ids.append(job_id)
                seen["runs"] = assert_left_nothing(settings, job_id)
                logger.info("try %d, cancel after %.0f ms: %s", number, delay * 1000, seen)
    finally:
        kill_leftovers(job_ids)


# ----------------------------------------------------------------------------- orphans


def store_job(store: JobStore, state: str, **values: Any) -> Job:
    job = new_job(
        job_id=str(uuid.uuid4()),
        kind="pretrain",
        name=SPEC["name"],
        owner="orphans",
        spec=SPEC,
        num_workers=1,
        num_gpus=0,
    )
    store.create(job)
    store.update(job.id, state=state, **values)
    return job


@pytest.fixture
def orphan_env(ray_cluster: RayTestCluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    """What a Ray Jobs driver gets: the cluster, the store, MLflow and Ray's job marker."""
    env = {
        **ray_cluster.env(),
        "SPARKORCH_DATABASE_URL": ray_cluster.settings.job_store_url,
        "MLFLOW_TRACKING_URI": ray_cluster.settings.tracking_uri,
        RAY_JOB_ENV_VAR: "{}",
    }
    yield env


def start_driver(job_id: str, env: dict[str, str], log: Path, *, via_shell: bool) -> Any:
    """``python -m jobs.pretrain --job-id`` in a session of its own, as Ray starts it."""
    command = [sys.executable, "-m", "jobs.pretrain", "--job-id", job_id]
    if via_shell:  # Ray runs the entrypoint through /bin/sh, which forks the driver
        command = ["/bin/sh", "-c", " ".join(command)]
    return subprocess.Popen(
        command,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_exit(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"the driver kept running:\n{log.read_text()[-3000:]}") from None


@pytest.mark.slow
def test_a_driver_whose_job_is_already_cancelled_opens_no_run(
    ray_cluster: RayTestCluster, orphan_env: dict[str, str], tmp_path: Path
) -> None:
    settings = ray_cluster.settings
    store = JobStore(settings.job_store_url)
    store.migrate()
    job = store_job(store, "CANCELLED", cancel_requested=True, submissions=1)
    log = tmp_path / "driver.log"
    driver = start_driver(job.id, orphan_env, log, via_shell=False)
    try:
        assert wait_exit(driver, log, 120) == EXIT_CANCELLED, log.read_text()[-3000:]
    finally:
        kill_leftovers([job.id])
    assert job_runs(settings, job.id) == []
    assert store.get(job.id).mlflow_run_id is None


@pytest.mark.slow
def test_a_driver_cancelled_only_in_the_store_stops_and_ends_its_run_killed(
    ray_cluster: RayTestCluster, orphan_env: dict[str, str], tmp_path: Path
) -> None:
    """Nobody signals the orphan: it finds the cancellation in the store by itself."""
    settings = ray_cluster.settings
    store = JobStore(settings.job_store_url)
    store.migrate()
    job = store_job(store, "RUNNING", submissions=2)  # a resubmitted job runs on
    log = tmp_path / "driver.log"
    driver = start_driver(job.id, orphan_env, log, via_shell=False)
    try:
        wait_for(lambda: store.get(job.id).mlflow_run_id, 180, "the driver's MLflow run")
        time.sleep(3)  # a few store polls: a job that is not cancelled keeps running
        assert driver.poll() is None, log.read_text()[-3000:]
        store.update(job.id, cancel_requested=True, state="CANCELLED")
        assert wait_exit(driver, log, 120) == EXIT_CANCELLED, log.read_text()[-3000:]
    finally:
        kill_leftovers([job.id])
    assert [run.info.status for run in job_runs(settings, job.id)] == ["KILLED"]


@pytest.mark.slow
def test_a_driver_whose_parent_dies_stops_and_ends_its_run_killed(
    ray_cluster: RayTestCluster, orphan_env: dict[str, str], tmp_path: Path
) -> None:
    """Ray's shell dies without passing anything on: the driver must not outlive it, even
    though its job is not cancelled in the store."""
    settings = ray_cluster.settings
    store = JobStore(settings.job_store_url)
    store.migrate()
    job = store_job(store, "RUNNING", submissions=1)
    log = tmp_path / "driver.log"
    shell = start_driver(job.id, orphan_env, log, via_shell=True)
    try:
        wait_for(lambda: store.get(job.id).mlflow_run_id, 180, "the driver's MLflow run")
        drivers = [p for p in job_processes(job.id) if p.pid != shell.pid]
        assert len(drivers) == 1, describe(job_processes(job.id))
        shell.send_signal(signal.SIGKILL)
        shell.wait(timeout=30)
        wait_for(lambda: not job_processes(job.id), GRACE_S, "the orphaned driver to end", 0.25)
    finally:
        kill_leftovers([job.id])
    assert [run.info.status for run in job_runs(settings, job.id)] == ["KILLED"]
    stored = store.get(job.id)  # not the store guard's doing: the job was never cancelled
    assert stored.state == "RUNNING" and not stored.cancel_requested


@pytest.mark.slow
def test_a_driver_whose_parent_died_before_it_armed_does_not_start(
    ray_cluster: RayTestCluster, orphan_env: dict[str, str], tmp_path: Path
) -> None:
    """The race itself: Ray's shell dies just after forking the driver, long before the
    driver can ask to die with it (its interpreter is still starting)."""
    settings = ray_cluster.settings
    store = JobStore(settings.job_store_url)
    store.migrate()
    job = store_job(store, "RUNNING", submissions=1)
    log = tmp_path / "driver.log"
    shell = start_driver(job.id, orphan_env, log, via_shell=True)
    try:
        parent = psutil.Process(shell.pid)
        wait_for(parent.children, 30, "the shell to fork the driver", every=0.001)
        shell.send_signal(signal.SIGKILL)
        shell.wait(timeout=30)
        wait_for(lambda: not job_processes(job.id), GRACE_S, "the orphaned driver to end", 0.25)
    finally:
        kill_leftovers([job.id])
    assert job_runs(settings, job.id) == [], log.read_text()[-3000:]
    assert "the parent of this driver is gone" in log.read_text()


@pytest.mark.parametrize(
    ("state", "cancel_requested", "cancelled"),
    [
        ("QUEUED", False, False),  # lost and about to be resubmitted
        ("SUBMITTING", False, False),
        ("PENDING", False, False),
        ("RUNNING", False, False),
        ("RUNNING", True, True),  # a cancel on its way through Ray
        ("SUBMITTING", True, True),
        ("CANCELLED", True, True),
        ("FAILED", False, True),  # the service gave the job up: nobody counts it any more
        ("SUCCEEDED", False, True),
    ],
)
def test_only_a_cancelled_or_ended_job_stops_its_driver(
    state: str, cancel_requested: bool, cancelled: bool
) -> None:
    job = new_job(
        job_id=str(uuid.uuid4()),
        kind="pretrain",
        name="x",
        owner="o",
        spec={},
        num_workers=1,
        num_gpus=0,
    )
    job = replace(job, state=state, cancel_requested=cancel_requested, submissions=2)
    assert (cancel_reason(job) is not None) is cancelled


class FakeStore:
    """A job store whose one job changes when the test says so; ``broken`` raises."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.broken = False
        self.reads = 0

    def get(self, job_id: str) -> Job:
        import sqlalchemy.exc

        self.reads += 1
        if self.broken:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("down"))
        return self.job


def test_the_store_guard_fires_once_after_its_grace_and_never_on_store_errors() -> None:
    job = replace(
        new_job(
            job_id=str(uuid.uuid4()),
            kind="pretrain",
            name="x",
            owner="o",
            spec={},
            num_workers=1,
            num_gpus=0,
        ),
        state="RUNNING",
    )
    store = FakeStore(job)
    fired: list[float] = []
    guard = StoreGuard(
        store,  # type: ignore[arg-type]
        job.id,
        interval_s=0.02,
        grace_s=0.3,
        cancel=lambda: fired.append(time.monotonic()),
    )
    with guard:
        store.broken = True
        wait_for(lambda: store.reads >= 5, 30, "reads of a broken store", 0.01)
        store.broken = False
        wait_for(lambda: store.reads >= 10, 30, "reads of a running job", 0.01)
        assert not fired
        cancelled_at = time.monotonic()
        store.job = replace(job, cancel_requested=True)
        wait_for(lambda: fired, 30, "the guard to fire", 0.01)
        time.sleep(0.2)
    assert len(fired) == 1 and fired[0] - cancelled_at >= 0.3
    ended = FakeStore(replace(job, state="CANCELLED"))
    with StoreGuard(
        ended,  # type: ignore[arg-type]
        job.id,
        interval_s=0.02,
        grace_s=30,
        cancel=lambda: fired.append(time.monotonic()),
    ):  # left during the grace (the job ended another way): never fires
        wait_for(lambda: ended.reads, 30, "a read", 0.01)
    assert len(fired) == 1
