"""``python -m jobs.sweep --spec FILE [--job-id ID]``: one ablation sweep on Ray Tune.

The Ray Jobs entrypoint of a sweep (``sparkctl sweep`` runs the same in-process). Running
the same job id again restores the sweep: finished trials are not re-run. Prints the
result (table, best trial) as one JSON line. SIGTERM ends it as KILLED.
Exit codes: 0 finished, 1 failed, 2 bad spec or arguments, 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from orchestrator.pretrain import JobCancelled, cancel_on_sigterm, check_job_id, exit_after_cancel
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import SpecError, load_sweep
from orchestrator.sweeps import run_sweep

logger = logging.getLogger("jobs.sweep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__)
    parser.add_argument("--spec", required=True, help="YAML or JSON SweepSpec file")
    parser.add_argument("--job-id", help="job id (default: a new UUID); the same id resumes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    settings = OrchestratorSettings()
    try:
        sweep = load_sweep(args.spec, data_roots=settings.allowed_data_roots)
        job_id = check_job_id(args.job_id) if args.job_id else None
    except (SpecError, ValueError) as error:
        logger.error("%s", error)
        return 2
    try:
        with cancel_on_sigterm():
            result = run_sweep(sweep, job_id=job_id, settings=settings)
    except (JobCancelled, KeyboardInterrupt):
        logger.warning("cancelled; the MLflow parent run is marked KILLED")
        exit_after_cancel(130)
    except Exception:
        logger.exception("sweep failed; the MLflow parent run is marked FAILED")
        return 1
    sys.stdout.write(json.dumps(result.to_dict(), default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
