"""The docker-compose topology rehearsed without Docker (scripts/rehearse_cluster.py): a Ray
head and a second node as separate processes, MLflow server and the API on PostgreSQL, GCS
fault tolerance on Redis. A sweep submitted over HTTP runs trials on both nodes and survives
losing one: the interrupted trial is restored from its checkpoint. (The script's head-restart
phase is not run here yet: see the README's deployment section.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rehearse_cluster.py"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SPARKORCH_REHEARSAL") != "1",
    reason="opt-in (SPARKORCH_REHEARSAL=1): passes on its own, but inside the full suite its "
    "two-node placement timed out once on this 2-core machine; issue 6 tracks making it stable",
)
def test_rehearsal_of_the_cluster_topology(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--skip-head-restart", "--keep-logs", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = json.loads(run.stdout[run.stdout.index("{") :]) if "{" in run.stdout else {}
    assert run.returncode == 0, json.dumps(report, indent=2)[-8000:] + run.stderr[-4000:]
    sweep = report["sweep"]
    assert sweep["nodes_in_use"] == 2
    assert sweep["resumed"] and all(r["resumed_at_step"] > 0 for r in sweep["resumed"])
    assert len(sweep["table"]) == 2
