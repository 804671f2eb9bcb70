"""``python -m jobs.pretrain --spec FILE [--job-id ID]``: one pre-training job on Ray.

The Ray Jobs entrypoint (and what ``sparkctl pretrain`` runs in-process). It joins the
cluster in ``RAY_ADDRESS`` (or starts a local one), runs the job to the end and prints the
result as one JSON line on stdout. SIGTERM (``ray job stop``) ends it as KILLED.
Exit codes: 0 finished, 1 failed, 2 bad spec or arguments, 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from orchestrator.pretrain import (
    JobCancelled,
    cancel_on_sigterm,
    check_job_id,
    exit_after_cancel,
    run_pretrain,
)
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import SpecError, load_spec

logger = logging.getLogger("jobs.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__)
    parser.add_argument("--spec", required=True, help="YAML or JSON PretrainSpec file")
    parser.add_argument("--job-id", help="job id (default: a new UUID); the same id resumes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    settings = OrchestratorSettings()
    try:
        spec = load_spec(args.spec, data_roots=settings.allowed_data_roots)
        job_id = check_job_id(args.job_id) if args.job_id else None
    except (SpecError, ValueError) as error:
        logger.error("%s", error)
        return 2
    try:
        with cancel_on_sigterm():
            result = run_pretrain(spec, job_id=job_id, settings=settings)
    except (JobCancelled, KeyboardInterrupt):
        logger.warning("cancelled; the MLflow run is marked KILLED")
        exit_after_cancel(130)
    except Exception:
        logger.exception("job failed; the MLflow run is marked FAILED")
        return 1
    sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
