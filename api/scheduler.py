"""Ray Job Submission and the reconciler that keeps the job store in step with Ray.

Every job is submitted with ``submission_id`` = job id and a fixed entrypoint,
``<python> -m jobs.<kind> --job-id <uuid>``: the id is a UUID the service made, the kind one
of two literals, the interpreter a setting; no user string reaches Ray. The environment of
the job driver comes from the service's own settings, never from the request.

The reconciler runs every ``reconcile_interval_s``; each pass looks at every active job:

* ``HELD``: left alone until released. ``QUEUED``: submitted when its owner has fewer than
  ``quota_active_jobs`` jobs on Ray.
* ``SUBMITTING``: the service stopped between writing the state and hearing back from Ray.
  Ray is asked for the submission id: known, the job moves on; unknown, it is submitted
  (it never was). Nothing is ever submitted twice.
* ``PENDING``/``RUNNING``: Ray's state is copied. A job Ray no longer knows (the cluster
  restarted) is submitted again when its spec allows it and
  ``submissions < max_submissions`` (the same job id resumes its checkpoints and MLflow
  run), else marked FAILED with the reason.
"""

from __future__ import annotations

import logging
import shlex
import sys
import threading
from dataclasses import dataclass
from typing import Any

from orchestrator.jobstore import ACTIVE_STATES, ON_RAY_STATES, Job, JobStore
from orchestrator.runner import get_kind
from orchestrator.settings import OrchestratorSettings

logger = logging.getLogger(__name__)

RAY_TO_STORE = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "STOPPED": "CANCELLED",
}


@dataclass(frozen=True)
class RayJobStatus:
    status: str
    message: str
    error_type: str


class RayUnavailable(RuntimeError):
    """The Ray dashboard (Job Submission API) cannot be reached."""


def _not_found(error: RuntimeError) -> bool:
    """Ray's SDK reports an unknown submission id only in the error's text."""
    return "404" in str(error) or "does not exist" in str(error)


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
        module = get_kind(job.kind).module()
        return shlex.join([python, "-m", module, "--job-id", job.id])

    def driver_env(self) -> dict[str, str]:
        """What the job driver needs to find the same store, MLflow and data roots."""
        s = self.settings
        if not s.forward_driver_env:
            return {}
        env = {
            "SPARKORCH_HOME": str(s.home),
            "SPARKORCH_DATABASE_URL": s.job_store_url,
            "MLFLOW_TRACKING_URI": s.tracking_uri,
            "SPARKORCH_DATA_ROOTS": ":".join(str(p) for p in s.allowed_data_roots),
            "SPARKORCH_MLFLOW_EXPERIMENT": s.mlflow_experiment,
            "RAY_AUTH_MODE": "token",
        }
        if s.ray_storage:
            env["SPARKORCH_RAY_STORAGE"] = s.ray_storage
        if s.ray_auth_token_path:
            env["RAY_AUTH_TOKEN_PATH"] = str(s.token_path)
        return env

    def submit(self, job: Job) -> None:
        self._call(
            "submit_job",
            entrypoint=self.entrypoint(job),
            submission_id=job.id,
            runtime_env={"env_vars": self.driver_env()}
            if self.settings.forward_driver_env
            else None,
            metadata={"owner": job.owner, "kind": job.kind, "name": job.name},
        )

    def status(self, job_id: str) -> RayJobStatus | None:
        """Ray's view of the job, or None when Ray does not know it."""
        try:
            info = self._call("get_job_info", job_id)
        except RuntimeError as error:
            if _not_found(error):
                return None
            raise RayUnavailable(str(error)) from error
        status = info.status.value if hasattr(info.status, "value") else info.status
        return RayJobStatus(str(status), info.message or "", str(info.error_type or ""))

    def stop(self, job_id: str) -> bool:
        try:
            return bool(self._call("stop_job", job_id))
        except RuntimeError as error:
            if _not_found(error):
                return False
            raise

    def logs(self, job_id: str) -> str:
        try:
            return str(self._call("get_job_logs", job_id))
        except RuntimeError as error:
            if _not_found(error):
                return ""
            raise RayUnavailable(str(error)) from error

    async def tail(self, job_id: str) -> Any:
        async for chunk in self.client().tail_job_logs(job_id):
            yield chunk

    def ping(self) -> None:
        self._call("get_version")


def allows_resubmission(job: Job) -> bool:
    """The spec's ``failures.resubmit_on_loss`` (a sweep's: its base spec's)."""
    spec = job.spec.get("base", job.spec) if job.kind == "sweep" else job.spec
    return bool(spec.get("failures", {}).get("resubmit_on_loss", True))


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
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except RayUnavailable as error:
                logger.warning("reconciler: Ray unavailable (%s); retrying", error)
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
                self._follow(job)

    def _submit(self, job: Job, *, expect: str) -> bool:
        if job.cancel_requested:
            return self.store.update(job.id, expect_states=[expect], state="CANCELLED")
        if not self.store.update(
            job.id, expect_states=[expect], state="SUBMITTING", submissions=job.submissions + 1
        ):
            return False  # another pass (or a cancel) got there first
        try:
            self.ray_jobs.submit(job)
        except RayUnavailable:
            raise  # stays SUBMITTING; the next pass asks Ray whether it arrived
        except Exception as error:
            if self.ray_jobs.status(job.id) is None:
                self.store.update(
                    job.id,
                    expect_states=["SUBMITTING"],
                    state="FAILED",
                    message=f"Ray refused the job: {error}",
                )
                return False
        self.store.update(job.id, expect_states=["SUBMITTING"], state="PENDING", message=None)
        logger.info("submitted job %s (%s, owner %s)", job.id, job.kind, job.owner)
        return True

    def _recover_submitting(self, job: Job) -> None:
        if self.ray_jobs.status(job.id) is not None:
            self.store.update(job.id, expect_states=["SUBMITTING"], state="PENDING")
            return
        logger.info("job %s was never received by Ray: submitting it", job.id)
        self.store.update(job.id, expect_states=["SUBMITTING"], submissions=job.submissions - 1)
        fresh = self.store.get(job.id)
        if fresh is not None:
            self._submit(fresh, expect="SUBMITTING")

    def _follow(self, job: Job) -> None:
        found = self.ray_jobs.status(job.id)
        if found is None:
            self._lost(job)
            return
        ray_status, message = found.status, found.message
        state = RAY_TO_STORE.get(ray_status, job.state)
        if state == job.state:
            return
        values: dict[str, Any] = {"state": state}
        if state == "FAILED":
            values["message"] = message or "the job driver failed; see GET /logs"
        elif state == "CANCELLED":
            values["message"] = "cancelled"
        if state == "RUNNING" and job.started_at is not None:
            values["started_at"] = job.started_at
        self.store.update(job.id, expect_states=ACTIVE_STATES, **values)

    def _lost(self, job: Job) -> None:
        if job.cancel_requested:
            self.store.update(job.id, expect_states=ACTIVE_STATES, state="CANCELLED")
            return
        if not allows_resubmission(job):
            self.store.update(
                job.id,
                expect_states=[job.state],
                state="FAILED",
                message="Ray lost the job and its spec says failures.resubmit_on_loss: false",
            )
            return
        if job.submissions < self.settings.max_submissions:
            logger.warning("Ray lost job %s (cluster restarted?): submitting it again", job.id)
            self.store.update(
                job.id,
                expect_states=[job.state],
                state="QUEUED",
                message="Ray lost the job (cluster restarted); resubmitting",
            )
            return
        self.store.update(
            job.id,
            expect_states=[job.state],
            state="FAILED",
            message=f"Ray lost the job and it was already submitted {job.submissions} times",
        )
