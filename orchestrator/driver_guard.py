"""Keeps a job driver from outliving its job, whatever the timing of a cancel.

Ray's job supervisor runs the entrypoint through ``/bin/sh -c`` in a session of its own, and
on ``stop`` signals the shell and the children it has *so far*. A stop that lands while the
shell is still forking leaves the driver out: it is reparented to PID 1 and trains to the
end, unseen (the store says CANCELLED, Ray says STOPPED, the quota no longer counts it).
Two independent defences, both ending in the driver's ordinary cancellation (SIGTERM ->
:class:`~orchestrator.lifecycle.JobCancelled` -> MLflow run KILLED -> exit 130):

* :func:`die_with_parent`: the kernel sends SIGTERM when the driver's parent exits
  (``PR_SET_PDEATHSIG``), and a parent already gone is reported at once.
* :class:`StoreGuard`: the job store is the source of truth; a daemon thread reads the job
  every couple of seconds and cancels the driver once the job is cancelled or has ended.
  Under Ray Jobs it first leaves Ray :data:`RAY_STOP_GRACE_S` to stop the job itself (the
  reconciler does within a pass), so that the submission ends STOPPED, not FAILED with
  exit code 130; an orphan nobody stops ends itself after that grace.

:func:`end_runs_killed` is the last step of every cancellation: a cancel can land between
the MLflow run's creation and the code that would end it, or a second SIGTERM (Ray's, the
dead parent's, the guard's) can interrupt that code; the run must not stay RUNNING.

Torch-free: imported by the job entrypoints before anything heavy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from orchestrator.control.states import TERMINAL_STATES
from orchestrator.processes import set_parent_death_signal

if TYPE_CHECKING:
    from orchestrator.control.store import Job, JobStore

logger = logging.getLogger(__name__)

# Ray's job supervisor sets it in the environment of every Ray Jobs driver.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
POLL_INTERVAL_S = 2.0
# How long a Ray Jobs driver that finds its job cancelled leaves Ray to stop it: the
# reconciler stops a cancelled job's submission within one pass (2 s by default).
RAY_STOP_GRACE_S = 10.0
CLEANUP_TIMEOUT_S = 30.0


def started_by_ray_jobs(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a Ray Jobs driver (a supervisor's shell is its parent)."""
    return RAY_JOB_ENV_VAR in environ


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent exits.

    Returns False when the parent is already gone (then no signal will ever come): the
    parent changed meanwhile, or this process already belongs to PID 1. Only meaningful
    for a process whose parent is never PID 1 (a Ray Jobs driver). Linux only; elsewhere
    only the PID 1 check is made.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux") and not set_parent_death_signal(signum):
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    # Checked after prctl: a parent that exits before it would send nothing.
    current = os.getppid()
    return current == parent and current != 1


def cancel_reason(job: Job | None) -> str | None:
    """Why a driver of ``job`` must stop, or None while it may run.

    A job that Ray lost and the service submits again goes QUEUED -> SUBMITTING -> PENDING
    -> RUNNING with ``cancel_requested`` false: its driver runs on. A job row that vanished
    says nothing either way: the driver runs on.
    """
    if job is None:
        return None
    if job.cancel_requested:
        return f"job {job.id} was cancelled (state {job.state})"
    if job.state in TERMINAL_STATES:
        return f"the job store says job {job.id} ended {job.state}"
    return None


def stop_grace_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long to leave Ray to stop a cancelled job before the driver ends itself."""
    return RAY_STOP_GRACE_S if started_by_ray_jobs(environ) else 0.0


def await_stop(grace_s: float) -> None:
    """Leave whoever stops this job (Ray) ``grace_s`` to do it; its SIGTERM cuts the wait
    short (the handler raises in the main thread)."""
    if grace_s > 0:
        time.sleep(grace_s)


def cancel_this_process() -> None:
    """SIGTERM to this process: the main thread's handler raises JobCancelled."""
    os.kill(os.getpid(), signal.SIGTERM)


class StoreGuard:
    """Cancels this driver (once) when the job store says its job is cancelled or over.

    A context manager: polling starts on entry and stops on exit. Store errors are logged
    and retried: an unreachable store never cancels a job. ``grace_s``: how long to leave
    Ray to stop the job first (:func:`stop_grace_s`).
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        *,
        interval_s: float = POLL_INTERVAL_S,
        grace_s: float = 0.0,
        cancel: Callable[[], None] = cancel_this_process,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._cancel = cancel
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = threading.Event()

    def __enter__(self) -> StoreGuard:
        self._thread = threading.Thread(target=self._loop, name="store-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)

    def check(self) -> str | None:
        """One look at the store: the reason to cancel, or None."""
        import sqlalchemy.exc

        try:
            return cancel_reason(self.store.get(self.job_id))
        except sqlalchemy.exc.SQLAlchemyError as error:
            logger.warning("job %s: cannot read the job store (%s); retrying", self.job_id, error)
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            reason = self.check()
            if reason is None or self._stop.is_set():
                continue
            logger.warning("%s: this driver ends in %.0f s unless stopped", reason, self.grace_s)
            if self._stop.wait(self.grace_s):
                return
            logger.warning("%s: cancelling this driver", reason)
            self.fired.set()
            self._cancel()
            return


def end_runs_killed(
    tracking_uri: str, experiment: str, job_id: str, run_id: str | None = None
) -> list[str]:
    """End KILLED the job's MLflow run when it is still RUNNING; returns the runs ended.

    ``run_id``: the run this driver opened; None when the cancel came before it was known
    (then the runs tagged with ``job_id`` in ``experiment`` are looked up). Bounded by
    :data:`CLEANUP_TIMEOUT_S`: an unreachable tracking server must not keep the driver.
    """
    ended: list[str] = []

    def work() -> None:
        from orchestrator.tracking import ACTIVE_STATUSES, JOB_ID_TAG, client_for

        client = client_for(tracking_uri)
        if run_id is not None:
            runs = [client.get_run(run_id)]
        else:
            found = client.get_experiment_by_name(experiment)
            query = f"tags.{JOB_ID_TAG} = '{job_id}'"
            runs = client.search_runs([found.experiment_id], query) if found else []
        for run in runs:
            if run.info.status in ACTIVE_STATUSES:
                client.set_terminated(run.info.run_id, status="KILLED")
                ended.append(run.info.run_id)

    def guarded() -> None:
        try:
            work()
        except Exception:  # clean-up on the way out: log whatever MLflow raises, then exit
            logger.exception("job %s: could not end its MLflow run KILLED", job_id)

    thread = threading.Thread(target=guarded, name="end-runs-killed", daemon=True)
    thread.start()
    thread.join(timeout=CLEANUP_TIMEOUT_S)
    if thread.is_alive():
        logger.error("job %s: MLflow did not answer within %.0f s", job_id, CLEANUP_TIMEOUT_S)
    return list(ended)


__all__ = [
    "RAY_JOB_ENV_VAR",
    "StoreGuard",
    "await_stop",
    "cancel_reason",
    "die_with_parent",
    "end_runs_killed",
    "started_by_ray_jobs",
    "stop_grace_s",
]
