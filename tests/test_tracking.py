"""MLflow run bookkeeping on a real (SQLite) store."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.settings import OrchestratorSettings
from orchestrator.tracking import STOPPED_TAG, client_for, end_run, mark_stopped, open_run


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


def test_a_stop_landing_between_the_check_and_the_write_still_ends_killed(
    settings: OrchestratorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a stopped trial's driver (ending FAILED) with its sweep (marking it
    stopped): the stop lands after the driver read RUNNING and before it wrote FAILED."""
    from mlflow.tracking import MlflowClient

    ref, _ = _open(settings, "job-raced")
    set_terminated = MlflowClient.set_terminated
    raced = []

    def stop_first(self, run_id, status=None, end_time=None):
        if status == "FAILED" and not raced:
            raced.append(True)
            mark_stopped(client_for(ref.tracking_uri), run_id, "scheduler")
        return set_terminated(self, run_id, status=status, end_time=end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", stop_first)
    end_run(ref, "FAILED")
    assert raced and _status(ref) == "KILLED"
    again, reopened = _open(settings, "job-raced")  # a resumed run is no longer stopped
    assert (
        reopened and STOPPED_TAG not in client_for(ref.tracking_uri).get_run(ref.run_id).data.tags
    )
    end_run(again, "FAILED")
    assert _status(ref) == "FAILED"


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
