"""The docker-compose topology rehearsed without Docker (scripts/rehearse_cluster.py): a Ray
head and a second node as separate processes, MLflow server and the API on PostgreSQL, GCS
fault tolerance on Redis. A sweep submitted over HTTP runs trials on both nodes and survives
losing one (the interrupted trial is restored from its checkpoint); a job survives a restart
of the Ray head (the service sees its driver died with the old head, submits it again, and
it resumes from its checkpoint)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.processes import kill_tree

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rehearse_cluster.py"


@pytest.mark.extended
@pytest.mark.slow
def test_rehearsal_of_the_cluster_topology(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--keep-logs", str(logs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = script.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        script.send_signal(signal.SIGTERM)  # the script stops everything it started
        try:
            out, err = script.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            kill_tree(script.pid)
            raise
    report = json.loads(out[out.index("{") :]) if "{" in out else {}
    assert script.returncode == 0, json.dumps(report, indent=2)[-8000:] + err[-4000:]
    sweep = report["sweep"]
    assert sweep["nodes_in_use"] == 2
    assert sweep["resumed"] and all(r["resumed_at_step"] > 0 for r in sweep["resumed"])
    assert len(sweep["table"]) == 2
    head_restart = report["head_restart"]
    assert head_restart["submissions"] == 2 and head_restart["resumed_at_step"] > 0
