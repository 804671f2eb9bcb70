"""What ``python -m jobs.pretrain`` and ``python -m jobs.sweep`` share.

Two ways in:

* ``--job-id ID`` alone: the REST service's fixed Ray Jobs entrypoint. The validated spec is
  read from the job store (``SPARKORCH_DATABASE_URL``); no user string is on the command
  line. The MLflow run id is written back to the store once the run exists.
* ``--spec FILE [--job-id ID]``: run a spec file directly (``sparkctl`` does the same).

The job joins ``RAY_ADDRESS`` (set by Ray Jobs) or starts a local cluster, runs to the end
and prints its result as one JSON line on stdout. SIGTERM (``ray job stop``) ends it KILLED.
Exit codes: 0 finished, 1 failed, 2 bad spec or arguments, 130 cancelled.

A cancelled job leaves no driver behind, whatever the timing (see
:mod:`orchestrator.driver_guard`): a Ray Jobs driver dies with its parent (Ray's shell), and
a driver of a stored job stops by itself once the store says the job is cancelled or over,
before opening its MLflow run or while it runs (under Ray Jobs after leaving Ray a few
seconds to stop it, so that Ray records STOPPED). Either way its run, if one was opened,
ends KILLED and it exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NoReturn

from orchestrator.driver_guard import (
    StoreGuard,
    await_stop,
    cancel_reason,
    die_with_parent,
    end_runs_killed,
    started_by_ray_jobs,
    stop_grace_s,
)
from orchestrator.kinds import get_kind
from orchestrator.lifecycle import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_FAILED,
    JobCancelled,
    cancel_on_sigterm,
    check_job_id,
    exit_after_cancel,
    interrupted_by_cancel,
)
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import SpecError
from orchestrator.startup import StartupClock


def parse_args(kind: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{kind}", description=__doc__)
    parser.add_argument("--spec", help=f"YAML or JSON {kind} spec file")
    parser.add_argument(
        "--job-id",
        help="job id: alone, the spec is read from the job store; with --spec, "
        "names the job (the same id resumes)",
    )
    args = parser.parse_args(argv)
    if not args.spec and not args.job_id:
        parser.error("give --job-id (spec from the job store) or --spec FILE")
    return args


@dataclass
class Driver:
    """What one run of the entrypoint knows so far (for the clean-up of a cancel)."""

    kind: str
    settings: OrchestratorSettings
    logger: logging.Logger
    job_id: str | None = None
    store: Any = None
    experiment: str | None = None
    run_id: str | None = None
    startup: StartupClock | None = None

    def on_run_open(self, opened_id: str, ref: Any) -> None:
        self.job_id, self.run_id = opened_id, ref.run_id
        label = get_kind(self.kind).run_label
        self.logger.info("job %s: MLflow %s %s", opened_id, label, ref.run_id)
        if self.store is not None:
            self.store.update(
                opened_id, mlflow_run_id=ref.run_id, mlflow_experiment_id=ref.experiment_id
            )

    def end_run_killed(self) -> None:
        """Make sure a cancel leaves no RUNNING run: it may have come before the run's own
        clean-up could start, or interrupted it."""
        if self.job_id is None or self.experiment is None:
            return  # the spec was not loaded yet: no run was opened
        ended = end_runs_killed(
            self.settings.tracking_uri, self.experiment, self.job_id, self.run_id
        )
        if ended:
            self.logger.info("ended MLflow run(s) %s KILLED", ", ".join(ended))


def _experiment(kind: str, spec: Any, settings: OrchestratorSettings) -> str:
    """The MLflow experiment the job's run goes to (a sweep's: its base spec's)."""
    section = spec
    for part in get_kind(kind).section:
        section = getattr(section, part)
    return settings.experiment_for(section)


def _load(driver: Driver, args: argparse.Namespace) -> Any:
    """The job's spec, from the store (``--job-id`` alone) or a file; returns None when the
    store says the job must not run any more. Raises SpecError, ValueError, OSError."""
    kind, settings = driver.kind, driver.settings
    driver.job_id = check_job_id(args.job_id) if args.job_id else None
    if args.spec is not None:
        spec = get_kind(kind).load(args.spec, data_roots=settings.allowed_data_roots)
        driver.experiment = _experiment(kind, spec, settings)
        driver.startup = StartupClock.for_driver(None)
        return spec
    from orchestrator.control.store import JobStore

    driver.store = JobStore(settings.job_store_url)
    job = driver.store.get(driver.job_id)
    if job is None:
        raise ValueError(f"job {driver.job_id} is not in the job store {settings.job_store_url}")
    if job.kind != kind:
        raise ValueError(f"job {driver.job_id} is a {job.kind} job, not {kind}")
    spec = get_kind(kind).parse(job.spec, data_roots=settings.allowed_data_roots)
    driver.experiment = _experiment(kind, spec, settings)
    driver.startup = StartupClock.for_driver(job.created_at)
    reason = cancel_reason(job)
    if reason is not None:
        driver.logger.warning("%s: not starting", reason)
        return None
    return spec


def _guard(driver: Driver) -> AbstractContextManager[Any]:
    """Watch the job store while the job runs (nothing to watch with a spec file)."""
    if driver.store is None or driver.job_id is None:
        return nullcontext()
    return StoreGuard(driver.store, driver.job_id, grace_s=stop_grace_s())


def _run(driver: Driver, spec: Any) -> int:
    kind = driver.kind
    try:
        with _guard(driver):
            result = get_kind(kind).run(
                spec,
                job_id=driver.job_id,
                settings=driver.settings,
                on_run_open=driver.on_run_open,
                startup=driver.startup,
            )
    except (JobCancelled, KeyboardInterrupt):
        raise  # JobCancelled is an Exception too: not a failure, main() handles it
    except Exception as error:
        if interrupted_by_cancel(error):
            # A second SIGTERM (each defence sends one) cut the clean-up of the first, e.g.
            # while the run was being ended KILLED: still a cancel, finished by main().
            raise JobCancelled("cancelled during the clean-up") from error
        driver.logger.exception(
            "job failed; the MLflow %s is marked FAILED", get_kind(kind).run_label
        )
        return EXIT_FAILED
    sys.stdout.write(json.dumps(result.to_dict(), default=str) + "\n")
    return 0


def _leave_cancelled(driver: Driver) -> NoReturn:
    """The one way out of a cancellation: no RUNNING run left, exit 130."""
    # More SIGTERMs may follow (each defence sends one): none may cut the clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    driver.end_run_killed()
    label = get_kind(driver.kind).run_label
    driver.logger.warning("cancelled; the MLflow %s is marked KILLED", label)
    exit_after_cancel(EXIT_CANCELLED)


def main(kind: str, argv: list[str] | None = None) -> int:
    """Run one job of ``kind`` to the end; returns the exit code (see the module docstring)."""
    # First of all: a Ray Jobs driver must not outlive Ray's shell, even when Ray stopped
    # the job while it was starting this process.
    orphaned = started_by_ray_jobs() and not die_with_parent(signal.SIGTERM)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logger = logging.getLogger(f"jobs.{kind}")
    args = parse_args(kind, argv)
    if orphaned:
        logger.warning("the parent of this driver is gone (the job was stopped): not starting")
        return EXIT_CANCELLED
    driver = Driver(kind, OrchestratorSettings(), logger)
    # From here on every SIGTERM (Ray's stop, the dead parent's, the store guard's) takes
    # the one cancellation path below.
    with cancel_on_sigterm():
        try:
            try:
                spec = _load(driver, args)
            except (SpecError, ValueError, OSError) as error:
                logger.error("%s", error)
                return EXIT_BAD_INPUT
            if spec is None:  # cancelled already: leave Ray the time to stop it, then go
                await_stop(stop_grace_s())
                return EXIT_CANCELLED
            return _run(driver, spec)
        except (JobCancelled, KeyboardInterrupt):
            _leave_cancelled(driver)
