"""What ``python -m jobs.pretrain`` and ``python -m jobs.sweep`` share.

Two ways in:

* ``--job-id ID`` alone: the REST service's fixed Ray Jobs entrypoint. The validated spec is
  read from the job store (``SPARKORCH_DATABASE_URL``); no user string is on the command
  line. The MLflow run id is written back to the store once the run exists.
* ``--spec FILE [--job-id ID]``: run a spec file directly (``sparkctl`` does the same).

The job joins ``RAY_ADDRESS`` (set by Ray Jobs) or starts a local cluster, runs to the end
and prints its result as one JSON line on stdout. SIGTERM (``ray job stop``) ends it KILLED.
Exit codes: 0 finished, 1 failed, 2 bad spec or arguments, 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from orchestrator.lifecycle import JobCancelled, check_job_id, exit_after_cancel
from orchestrator.runner import get_kind, run_job
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import SpecError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 1, 2, 130


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


def _spec_from_store(kind: str, job_id: str, store: Any, settings: OrchestratorSettings) -> Any:
    job = store.get(job_id)
    if job is None:
        raise ValueError(f"job {job_id} is not in the job store {settings.job_store_url}")
    if job.kind != kind:
        raise ValueError(f"job {job_id} is a {job.kind} job, not {kind}")
    roots = settings.allowed_data_roots
    return get_kind(kind).parse(job.spec, data_roots=roots)


def main(kind: str, argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logger = logging.getLogger(f"jobs.{kind}")
    args = parse_args(kind, argv)
    settings = OrchestratorSettings()
    store = None
    try:
        job_id = check_job_id(args.job_id) if args.job_id else None
        if args.spec is None:
            from orchestrator.control.store import JobStore

            store = JobStore(settings.job_store_url)
            spec = _spec_from_store(kind, job_id, store, settings)
        else:
            spec = get_kind(kind).load(args.spec, data_roots=settings.allowed_data_roots)
    except (SpecError, ValueError, OSError) as error:
        logger.error("%s", error)
        return EXIT_BAD_INPUT

    def on_run_open(opened_id: str, ref: Any) -> None:
        logger.info("job %s: MLflow %s %s", opened_id, get_kind(kind).run_label, ref.run_id)
        if store is not None:
            store.update(
                opened_id, mlflow_run_id=ref.run_id, mlflow_experiment_id=ref.experiment_id
            )

    try:
        result = run_job(kind, spec, job_id=job_id, settings=settings, on_run_open=on_run_open)
    except (JobCancelled, KeyboardInterrupt):
        logger.warning("cancelled; the MLflow %s is marked KILLED", get_kind(kind).run_label)
        exit_after_cancel(EXIT_CANCELLED)
    except Exception:
        logger.exception("job failed; the MLflow %s is marked FAILED", get_kind(kind).run_label)
        return EXIT_FAILED
    sys.stdout.write(json.dumps(result.to_dict(), default=str) + "\n")
    return 0
