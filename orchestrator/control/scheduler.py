"""Ray Job Submission and the reconciler that keeps the job store in step with Ray.

Every job is submitted with a fixed entrypoint, ``<python> -m jobs.<kind> --job-id <uuid>``:
the id is a UUID the service made, the module its kind's fixed one
(:mod:`orchestrator.kinds`), the interpreter a setting; no user string reaches Ray. The
environment of the job driver comes from the service's own settings, never from the
request. The Ray submission id is the job id for the first submission and
``<job id>-<n>`` for the n-th (``submission_id``): Ray never forgets a submission id, and a
job whose driver died with its node must be submitted again.

The reconciler runs every ``reconcile_interval_s``; each pass looks at every active job:

* ``HELD``: left alone until released. ``QUEUED``: submitted when its owner has fewer than
  ``quota_active_jobs`` jobs on Ray.
* ``SUBMITTING``: the service stopped between writing the state and hearing back from Ray.
  Ray is asked for the submission id: known, the job moves on; unknown, it is submitted
  (it never was). Nothing is ever submitted twice.
* ``PENDING``/``RUNNING``: Ray's state is copied. A job is *lost* when Ray no longer knows
  it (the cluster was replaced), when Ray still says it runs but its driver's node is DEAD
  (the Ray head restarted under GCS fault tolerance: Ray 2.60 keeps such a job RUNNING
  forever), or when Ray failed it because its job supervisor died (``LOST_ERROR_TYPES``).
  A lost job is submitted again when its spec allows it and
  ``submissions < max_submissions`` (the same job id resumes its checkpoints and MLflow
  run), else marked FAILED with the reason. Dead nodes are listed once per pass, and only
  when a job on Ray has a driver node.
"""

from __future__ import annotations

import functools
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.control.store import ACTIVE_STATES, ON_RAY_STATES, Job, JobStore
from orchestrator.kinds import get_kind
from orchestrator.settings import OrchestratorSettings

logger = logging.getLogger(__name__)

# Longer than a cancelled driver's own clean-up (driver_guard.CLEANUP_TIMEOUT_S, 30 s); the
# compose deployment sets the same value on its Ray nodes.
JOB_STOP_WAIT_S = 45

RAY_TO_STORE = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "STOPPED": "CANCELLED",
}


# Ray's job error types that say the infrastructure, not the job's program, failed.
LOST_ERROR_TYPES = frozenset(
    {
        "JOB_SUPERVISOR_ACTOR_DIED",
        "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE",
        "JOB_SUPERVISOR_ACTOR_START_FAILURE",
    }
)


@dataclass(frozen=True)
class RayJobStatus:
    status: str
    message: str
    error_type: str
    driver_node_id: str = ""


def _nth_submission_id(job_id: str, n: int) -> str:
    return job_id if n <= 1 else f"{job_id}-{n}"


def driver_env(settings: OrchestratorSettings) -> dict[str, str]:
    """What a job driver needs to find the service's store, MLflow and data roots: sent
    with each job (``forward_driver_env``), or carried by the Ray nodes' own environment
    (the embedded stack's cluster, the compose deployment)."""
    s = settings
    env = {
        "SPARKORCH_HOME": str(s.home),
        "SPARKORCH_DATABASE_URL": s.job_store_url,
        "MLFLOW_TRACKING_URI": s.tracking_uri,
        "SPARKORCH_DATA_ROOTS": ":".join(str(p) for p in s.allowed_data_roots),
        "SPARKORCH_MLFLOW_EXPERIMENT": s.mlflow_experiment,
        "RAY_AUTH_MODE": "token",
        # Ray's supervisor waits this long after SIGTERM before SIGKILL (default 3 s): long
        # enough for a cancelled driver to end its MLflow run KILLED on a busy node.
        "RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S),
    }
    if s.ray_storage:
        env["SPARKORCH_RAY_STORAGE"] = s.ray_storage
    if s.ray_auth_token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(s.token_path)
    return env


def submission_id(job: Job) -> str:
    """The Ray submission id of the job's latest submission (the job id, then ``<id>-<n>``)."""
    return _nth_submission_id(job.id, job.submissions)


def submission_ids(job: Job) -> list[str]:
    """Every Ray submission id the job has had, oldest first."""
    return [_nth_submission_id(job.id, n) for n in range(1, job.submissions + 1)]


class RayUnavailable(RuntimeError):
    """The Ray dashboard (Job Submission API) cannot be reached."""


def _not_found(error: RuntimeError) -> bool:
    """Ray's SDK reports an unknown submission id only in the error's text
    (``Request failed with status code 404: ...``). A connection error is never "not found",
    even when its text holds a URL with 404 in it."""
    return not isinstance(error, RayUnavailable) and "status code 404" in str(error)


class RayJobs:
    """A thin, lazily connected wrapper of Ray's ``JobSubmissionClient``."""

    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                from orchestrator.cluster import configure_ray_auth

                configure_ray_auth(self.settings)
                try:
                    self._client = JobSubmissionClient(self.settings.ray_dashboard_url)
                except (ConnectionError, OSError, RuntimeError) as error:
                    raise RayUnavailable(
                        f"Ray dashboard {self.settings.ray_dashboard_url}: {error}"
                    ) from error
            return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client(), method)(*args, **kwargs)
        except (ConnectionError, OSError) as error:
            with self._lock:
                self._client = None
            raise RayUnavailable(str(error)) from error

    def entrypoint(self, job: Job) -> str:
        python = self.settings.job_python or sys.executable
        module = get_kind(job.kind).entrypoint_module
        return shlex.join([python, "-m", module, "--job-id", job.id])

    def submit(self, job: Job) -> None:
        """Submit ``job`` as its latest submission (``job.submissions`` already counts it)."""
        self._call(
            "submit_job",
            entrypoint=self.entrypoint(job),
            submission_id=submission_id(job),
            runtime_env={"env_vars": driver_env(self.settings)}
            if self.settings.forward_driver_env
            else None,
            metadata={"owner": job.owner, "kind": job.kind, "name": job.name},
        )

    def status(self, ray_id: str) -> RayJobStatus | None:
        """Ray's view of one submission, or None when Ray does not know it."""
        try:
            info = self._call("get_job_info", ray_id)
        except RuntimeError as error:
            if _not_found(error):
                return None
            raise RayUnavailable(str(error)) from error
        status = info.status.value if hasattr(info.status, "value") else info.status
        error_type = getattr(info.error_type, "value", info.error_type)
        return RayJobStatus(
            str(status),
            info.message or "",
            str(error_type or ""),
            str(getattr(info, "driver_node_id", None) or ""),
        )

    def stop(self, ray_id: str) -> bool:
        try:
            return bool(self._call("stop_job", ray_id))
        except RuntimeError as error:
            if _not_found(error):
                return False
            raise

    def logs(self, ray_id: str) -> str:
        try:
            return str(self._call("get_job_logs", ray_id))
        except RuntimeError as error:
            if _not_found(error):
                return ""
            raise RayUnavailable(str(error)) from error

    async def tail(self, ray_id: str) -> Any:
        async for chunk in self.client().tail_job_logs(ray_id):
            yield chunk

    def dead_nodes(self) -> frozenset[str]:
        """Ids of the nodes Ray's state API lists as DEAD."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(
                address=self.settings.ray_dashboard_url,
                filters=[("state", "=", "DEAD")],
                limit=10_000,
                raise_on_missing_output=False,
            )
        except Exception as error:  # the state API raises its own types for HTTP failures
            raise RayUnavailable(f"listing Ray's nodes: {error}") from error
        return frozenset(node.node_id for node in nodes)

    def ping(self) -> None:
        self._call("get_version")


def allows_resubmission(job: Job) -> bool:
    """The stored spec's ``failures.resubmit_on_loss``, wherever its kind keeps it."""
    return get_kind(job.kind).resubmit_on_loss(job.spec)


class Reconciler:
    """Maps Ray's job states onto the store; submits queued and lost jobs."""

    def __init__(self, store: JobStore, ray_jobs: RayJobs, settings: OrchestratorSettings):
        self.store = store
        self.ray_jobs = ray_jobs
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Run a pass now (a job was just created or cancelled)."""
        self._wake.set()

    def _loop(self) -> None:
        unavailable_since: float | None = None
        while not self._stop.is_set():
            try:
                self.reconcile_once()
                if unavailable_since is not None:
                    logger.warning(
                        "reconciler: Ray reachable again after %.0f s",
                        time.monotonic() - unavailable_since,
                    )
                    unavailable_since = None
            except RayUnavailable as error:
                # One warning per outage; every retry at DEBUG.
                level = logging.DEBUG if unavailable_since is not None else logging.WARNING
                unavailable_since = unavailable_since or time.monotonic()
                logger.log(level, "reconciler: Ray unavailable (%s); retrying", error)
            except Exception:
                logger.exception("reconciler pass failed; retrying")
            self._wake.wait(self.settings.reconcile_interval_s)
            self._wake.clear()

    # -------------------------------------------------------------- one pass

    def reconcile_once(self) -> None:
        running: dict[str, int] = {}
        jobs = self.store.active_jobs()
        for job in jobs:
            if job.state in ON_RAY_STATES:
                running[job.owner] = running.get(job.owner, 0) + 1
        dead_nodes = functools.cache(self._dead_nodes)  # listed once per pass, if at all
        for job in jobs:
            if job.state == "HELD":
                continue
            if job.state == "QUEUED":
                if running.get(job.owner, 0) >= self.settings.quota_active_jobs:
                    continue
                if self._submit(job, expect="QUEUED"):
                    running[job.owner] = running.get(job.owner, 0) + 1
            elif job.state == "SUBMITTING":
                self._recover_submitting(job)
            else:
                self._follow(job, dead_nodes)

    def _dead_nodes(self) -> frozenset[str]:
        # Without the list no job is taken for lost: a false "lost" would run a job twice.
        try:
            return self.ray_jobs.dead_nodes()
        except RayUnavailable as error:
            logger.warning("reconciler: cannot list Ray's dead nodes this pass: %s", error)
            return frozenset()

    def _submit(self, job: Job, *, expect: str) -> bool:
        """QUEUED -> SUBMITTING (counting the submission) -> Ray -> PENDING."""
        if job.cancel_requested:
            return self.store.update(job.id, expect_states=[expect], state="CANCELLED")
        if not self.store.update(
            job.id, expect_states=[expect], state="SUBMITTING", submissions=job.submissions + 1
        ):
            return False  # another pass (or a cancel) got there first
        return self._send(replace(job, state="SUBMITTING", submissions=job.submissions + 1))

    def _send(self, job: Job) -> bool:
        """Submit a SUBMITTING job as its latest submission; then SUBMITTING -> PENDING."""
        ray_id = submission_id(job)
        try:
            self.ray_jobs.submit(job)
        except RayUnavailable:
            raise  # stays SUBMITTING; the next pass asks Ray whether it arrived
        except Exception as error:
            if self.ray_jobs.status(ray_id) is None:
                self.store.update(
                    job.id,
                    expect_states=["SUBMITTING"],
                    state="FAILED",
                    message=f"Ray refused the job: {error}",
                )
                return False
        if not self.store.update(
            job.id, expect_states=["SUBMITTING"], state="PENDING", message=None
        ):
            # Cancelled while it was being submitted: it must not run unseen.
            logger.info("job %s was cancelled while being submitted: stopping %s", job.id, ray_id)
            self.ray_jobs.stop(ray_id)
            return False
        logger.info("submitted job %s as %s (%s, owner %s)", job.id, ray_id, job.kind, job.owner)
        return True

    def _recover_submitting(self, job: Job) -> None:
        if self.ray_jobs.status(submission_id(job)) is not None:
            self.store.update(job.id, expect_states=["SUBMITTING"], state="PENDING")
            return
        logger.info("job %s was never received by Ray: submitting it", job.id)
        self._send(job)

    def _follow(self, job: Job, dead_nodes: Callable[[], frozenset[str]]) -> None:
        ray_id = submission_id(job)
        found = self.ray_jobs.status(ray_id)
        if found is None:
            self._lost(job, "Ray no longer knows the job (the cluster was replaced)")
            return
        on_ray = found.status in ("PENDING", "RUNNING")
        if on_ray and found.driver_node_id and found.driver_node_id in dead_nodes():
            self._lost(job, "the job's driver died with its node (the Ray head restarted?)")
            return
        if found.status == "FAILED" and found.error_type in LOST_ERROR_TYPES:
            self._lost(job, f"Ray lost the job's supervisor: {found.message}")
            return
        if on_ray and job.cancel_requested:
            self.ray_jobs.stop(ray_id)  # a cancel that raced a (re)submission
        state = RAY_TO_STORE.get(found.status, job.state)
        if job.cancel_requested and state == "FAILED":
            # The driver ended itself on the cancel (it watches the store) before Ray's stop.
            state = "CANCELLED"
        if state == job.state:
            return
        values: dict[str, Any] = {"state": state}
        if state == "FAILED":
            values["message"] = found.message or "the job driver failed; see GET /logs"
        elif state == "CANCELLED":
            values["message"] = "cancelled"
        if state == "RUNNING" and job.started_at is not None:
            values["started_at"] = job.started_at
        self.store.update(job.id, expect_states=ACTIVE_STATES, **values)

    def _lost(self, job: Job, why: str) -> None:
        ray_id = submission_id(job)
        if self.ray_jobs.stop(ray_id):
            # Ray still had a live supervisor: wait until it is gone, so that the old
            # driver and a new submission never run at once.
            logger.warning("lost job %s (%s): stopping what is left of %s", job.id, why, ray_id)
            return
        if job.cancel_requested:
            self.store.update(job.id, expect_states=ACTIVE_STATES, state="CANCELLED")
            return
        if not allows_resubmission(job):
            self.store.update(
                job.id,
                expect_states=[job.state],
                state="FAILED",
                message=f"{why}; its spec says failures.resubmit_on_loss: false",
            )
            return
        if job.submissions < self.settings.max_submissions:
            logger.warning("lost job %s (%s): submitting it again", job.id, why)
            self.store.update(
                job.id,
                expect_states=[job.state],
                state="QUEUED",
                message=f"{why}; resubmitting",
            )
            return
        self.store.update(
            job.id,
            expect_states=[job.state],
            state="FAILED",
            message=f"{why}; it was already submitted {job.submissions} times",
        )
