"""MLflow run bookkeeping on a real (SQLite) store."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.settings import OrchestratorSettings
from orchestrator.tracking import client_for, end_run, open_run


def _open(settings: OrchestratorSettings, job_id: str):
    ref, reopened = open_run(
        settings,
        job_id=job_id,
        experiment="tracking-test",
        run_name=job_id,
        tags={},
        params={"a": "1"},
        document={"name": job_id},
    )
    return ref, reopened


def _status(ref) -> str:
    return client_for(ref.tracking_uri).get_run(ref.run_id).info.status


@pytest.fixture
def settings(tmp_path: Path) -> OrchestratorSettings:
    return OrchestratorSettings(home=tmp_path / "home")


def test_a_killed_run_is_not_turned_failed_but_can_finish(settings: OrchestratorSettings) -> None:
    ref, _ = _open(settings, "job-stopped")
    end_run(ref, "KILLED")  # e.g. the sweep, for a trial its scheduler stopped
    end_run(ref, "FAILED")  # the stopped trial's driver, winding down afterwards
    assert _status(ref) == "KILLED"
    end_run(ref, "FINISHED")  # it did finish after all
    assert _status(ref) == "FINISHED"


def test_end_run_sets_each_status_and_reopening_resumes(settings: OrchestratorSettings) -> None:
    ref, reopened = _open(settings, "job-plain")
    assert not reopened and _status(ref) == "RUNNING"
    end_run(ref, "FAILED")
    assert _status(ref) == "FAILED"
    again, reopened = _open(settings, "job-plain")
    assert reopened and again.run_id == ref.run_id and _status(ref) == "RUNNING"
    end_run(again, "KILLED")
    assert _status(ref) == "KILLED"
    with pytest.raises(Exception, match="BOGUS"):
        end_run(again, "BOGUS")
