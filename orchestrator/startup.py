"""Where the time from submission to the first training step goes.

The driver and the Ray Train workers mark the moments a job passes on its way to its first
step; rank 0 logs them once that step is done, as MLflow metrics ``startup/<mark>_s``:
seconds since the job was submitted (``POST /v1/jobs``: the job store's ``created_at``, so
a job that waited, held or queued behind its owner's quota, shows the wait in
``driver_started``; a driver started on a spec file counts from its own start). They show in
the run's charts and in ``GET /v1/jobs/{id}/results``; ``scripts/loadtest.py --first-step``
prints them. Only a fresh start logs them: a worker group restored from a checkpoint does
not (a job submitted again before its first checkpoint logs a second set at step 0).

Marks, in a pre-training job's order (the driver's, then a worker's; a fine-tuning driver
opens its run before it calls ``fit``):

==================  ============================================================
``driver_started``  the driver process started (Ray Jobs' supervisor launched it)
``fit_called``      spec loaded, connected to Ray, the trainer's ``fit`` called
``run_opened``      its MLflow run exists (opened while Ray Train starts)
``worker_started``  the training function runs on rank 0 (Ray Train started the
                    controller and the worker group, and imported the function)
``model_ready``     rank 0 has its data, model and engine
``first_step``      the first optimiser step is done
==================  ============================================================
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_PREFIX = "startup/"
LOG_WAIT_S = 5.0  # at the first epoch's end, the longest wait for the startup metrics
MARKS = (
    "driver_started",
    "fit_called",
    "run_opened",
    "worker_started",
    "model_ready",
    "first_step",
)


def process_start_time() -> float:
    """When this process started (epoch seconds)."""
    import psutil

    return psutil.Process().create_time()


@dataclass
class StartupClock:
    """Wall-clock marks (epoch seconds) of one job's start, counted from ``origin``.

    Plain data: the driver ships ``to_dict()`` to the workers inside their config, and
    rank 0 adds its own marks (wall clocks of one cluster agree to well under the
    seconds measured here).
    """

    origin: float
    marks: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_driver(cls, submitted_at: dt.datetime | None) -> StartupClock:
        """A driver's clock: from the job's submission, or from the process's start."""
        started = process_start_time()
        origin = submitted_at.timestamp() if submitted_at is not None else started
        return cls(origin, {"driver_started": started})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> StartupClock | None:
        if not data:
            return None
        return cls(float(data["origin"]), {k: float(v) for k, v in data["marks"].items()})

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "marks": dict(self.marks)}

    def mark(self, name: str, at: float | None = None) -> None:
        if name not in MARKS:
            raise ValueError(f"unknown startup mark {name!r}; one of {', '.join(MARKS)}")
        self.marks.setdefault(name, time.time() if at is None else at)

    def metrics(self, names: Iterable[str] = MARKS) -> dict[str, float]:
        """``startup/<mark>_s``: seconds from the origin to each mark reached (of ``names``)."""
        return {
            f"{STARTUP_PREFIX}{name}_s": round(self.marks[name] - self.origin, 3)
            for name in names
            if name in self.marks
        }


class FirstStepMark:
    """Engine callback for rank 0: marks the first step and hands the clock's metrics to
    ``log`` in a thread of its own, so the step loop never waits on the tracking server."""

    def __init__(self, clock: StartupClock, log: Callable[[dict[str, float]], None]) -> None:
        self.clock = clock
        self.log = log
        self.thread: threading.Thread | None = None

    def on_step(self, metrics: Any) -> None:
        if self.thread is not None:
            return
        self.clock.mark("first_step")
        values = self.clock.metrics()
        logger.info("startup: %s", ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
        self.thread = threading.Thread(
            target=self._log, args=(values,), name="startup-metrics", daemon=True
        )
        self.thread.start()

    def _log(self, values: dict[str, float]) -> None:
        try:
            self.log(values)
        except Exception:  # a lost timing must not stop training; it is in the log above
            logger.exception("could not log the startup metrics")

    def on_epoch_end(self, engine: Any, metrics: Any) -> None:
        if self.thread is not None:  # bounded: a down server must not stall the epoch's end
            self.thread.join(LOG_WAIT_S)


@contextmanager
def alongside(task: Callable[[], None], what: str) -> Iterator[None]:
    """Run ``task`` in a thread while the block runs (the driver's bookkeeping while Ray Train
    starts the workers), and wait for it at the end. A failure of ``task`` is logged, not
    raised: it must not fail the job it describes. When the block raises (a cancel), the
    task gets one more second, not an unbounded wait: the run must end before Ray's stop
    turns into a SIGKILL."""

    def run() -> None:
        try:
            task()
        except Exception:
            logger.exception("could not %s", what)

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        thread.join(1.0)
        raise
    thread.join()
