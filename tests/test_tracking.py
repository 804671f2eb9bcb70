"""MLflow run bookkeeping on a real (SQLite) store."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from orchestrator import tracking
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import parse_spec
from orchestrator.tracking import (
    JOB_ID_TAG,
    STOPPED_TAG,
    MetricsLogger,
    RunNotFoundError,
    client_for,
    end_run,
    find_children,
    locate_run,
    mark_stopped,
    open_job_run,
    open_run,
    run_ended_by_outcome,
)

SPEC = {
    "name": "tracking-tiny",
    "model": {"backbone": "resnet18", "input_size": 64},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
    "optim": {"global_batch_size": 16, "epochs": 1, "warmup_epochs": 0},
}


def _open(settings: OrchestratorSettings, job_id: str, tags: dict[str, str] | None = None):
    ref, reopened = open_run(
        settings,
        job_id=job_id,
        experiment="tracking-test",
        run_name=job_id,
        tags=tags or {},
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


def test_rank_0_finds_the_run_its_driver_opens_meanwhile(settings: OrchestratorSettings) -> None:
    """The pre-training driver starts Ray Train, then opens the run; rank 0 waits for it."""
    import threading

    shipped = {"tracking_uri": settings.tracking_uri, "experiment": "tracking-test"}
    opened: list[Any] = []
    driver = threading.Timer(1.0, lambda: opened.append(_open(settings, "job-late")[0]))
    driver.start()
    try:
        # Neither the experiment nor the run exists yet: looked up until both do.
        found = locate_run({**shipped, "job_id": "job-late"}, timeout_s=60)
    finally:
        driver.join()
    assert found == opened[0]
    # A run the driver opened first is taken as shipped, without a lookup.
    assert locate_run({**asdict(found), "tracking_uri": "unused://"}).run_id == found.run_id
    with pytest.raises(RunNotFoundError, match=r"no MLflow run of job job-never .* after 1 s"):
        locate_run({**shipped, "job_id": "job-never"}, timeout_s=1)


def test_the_block_s_outcome_ends_the_run(settings: OrchestratorSettings) -> None:
    from orchestrator.lifecycle import JobCancelled

    closed: list[str] = []
    ref, _ = _open(settings, "job-completes")
    with run_ended_by_outcome(ref, on_unfinished=lambda: closed.append("completes")):
        pass
    assert _status(ref) == "FINISHED" and closed == []
    for job_id, error, status in (
        ("job-cancelled", JobCancelled("stop"), "KILLED"),
        ("job-interrupted", KeyboardInterrupt(), "KILLED"),
        ("job-fails", RuntimeError("boom"), "FAILED"),
    ):
        ref, _ = _open(settings, job_id)
        with (
            pytest.raises(type(error)),
            run_ended_by_outcome(ref, on_unfinished=lambda job_id=job_id: closed.append(job_id)),
        ):
            raise error
        assert _status(ref) == status, job_id
    assert closed == ["job-cancelled", "job-interrupted", "job-fails"]


def _tags(ref) -> dict[str, str]:
    return client_for(ref.tracking_uri).get_run(ref.run_id).data.tags


def test_caller_tags_cannot_take_the_job_id_or_the_run_name(
    settings: OrchestratorSettings,
) -> None:
    """A run tagged with another job's id would be the one that job's resume reopens."""
    first, _ = _open(settings, "job-first")
    end_run(first, "FAILED")
    second, _ = _open(settings, "job-second", {JOB_ID_TAG: "job-first", "team": "vision"})
    assert _tags(second)[JOB_ID_TAG] == "job-second" and _tags(second)["team"] == "vision"
    end_run(second, "FAILED")
    again, reopened = _open(settings, "job-first")  # the newest run tagged job-first, if any
    assert reopened and again.run_id == first.run_id
    again, reopened = _open(settings, "job-second")
    assert reopened and again.run_id == second.run_id
    named, _ = _open(settings, "job-named", {"mlflow.runName": "job-first"})
    assert _tags(named)["mlflow.runName"] == "job-named"


def test_a_spec_cannot_set_the_services_run_tags(
    settings: OrchestratorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec's job id, parent run and stop mark are dropped; its other tags kept."""
    # The versions and host are beside the point, and reading them imports torch and Ray.
    monkeypatch.setattr(tracking, "environment_tags", lambda spec: {"sparkorch.host": "here"})
    spec = parse_spec(SPEC, data_roots=[])
    first, _ = open_job_run(spec, "job-first", settings)
    # model_copy skips validation (which refuses these keys), as an old stored spec might.
    forged = {
        JOB_ID_TAG: "job-first",
        "mlflow.parentRunId": first.run_id,
        STOPPED_TAG: "forged",
        "team": "vision",
    }
    second, _ = open_job_run(spec.model_copy(update={"tags": forged}), "job-second", settings)
    tags = _tags(second)
    assert tags[JOB_ID_TAG] == "job-second" and tags["team"] == "vision"
    assert "mlflow.parentRunId" not in tags and STOPPED_TAG not in tags
    assert find_children(first) == []
    again, reopened = open_job_run(spec, "job-first", settings)
    assert reopened and again.run_id == first.run_id


# --------------------------------------------------------------- metrics off the step loop


def _step(step: int, steps_per_epoch: int = 100) -> Any:
    from spark_core.engine import StepMetrics

    return StepMetrics(
        epoch=0,
        step=step,
        loss=1.0 / (step + 1),
        lr=0.1,
        weight_decay=0.05,
        grad_norm=1.0,
        images_per_sec=10.0,
        epoch_progress=(step + 1) / steps_per_epoch,
    )


def _steps_logged(ref) -> list[int]:
    history = client_for(ref.tracking_uri).get_metric_history(ref.run_id, "train/step")
    return sorted(int(m.value) for m in history)


def test_steps_never_wait_on_a_slow_tracking_store_and_every_metric_arrives(
    settings: OrchestratorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that takes 0.4 s per request: each step's callback returns in far less, the
    first step is sent at once, and after close every step's metrics are there."""
    from mlflow.tracking import MlflowClient

    ref, _ = _open(settings, "job-slow-store")
    latency, log_batch = 0.4, MlflowClient.log_batch
    requests: list[int] = []

    def slow_log_batch(self, run_id, metrics=(), **kwargs):
        time.sleep(latency)
        requests.append(len(metrics))
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", slow_log_batch)
    metrics_logger = MetricsLogger(ref, log_every=2)
    slowest = 0.0
    for step in range(20):
        metrics = _step(step)  # built outside the timing: the first imports the engine
        start = time.perf_counter()
        metrics_logger.on_step(metrics)
        slowest = max(slowest, time.perf_counter() - start)
        if step == 0:  # the first step is on its way alone, not with step 1
            deadline = time.monotonic() + 30
            while _steps_logged(ref) != [1] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _steps_logged(ref) == [1]
        time.sleep(0.02)  # the training step
    assert slowest < latency / 2, slowest  # a step never waits for a 0.4 s request
    assert metrics_logger.close()
    assert _steps_logged(ref) == list(range(1, 21))
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec"):
        assert len(client_for(ref.tracking_uri).get_metric_history(ref.run_id, key)) == 20
    # Windows queued behind a slow request go out together: fewer requests than windows.
    assert len(requests) < 11 and sum(requests) == 20 * 7


def test_a_transient_store_error_is_retried_and_a_lasting_one_is_reported(
    settings: OrchestratorSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    ref, _ = _open(settings, "job-flaky-store")
    log_batch, failures = MlflowClient.log_batch, [1]  # the first request fails

    def flaky_log_batch(self, run_id, metrics=(), **kwargs):
        if failures and failures[0] > 0:
            failures[0] -= 1
            raise MlflowException("503 Service Unavailable")
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky_log_batch)
    metrics_logger = MetricsLogger(ref, log_every=1)
    metrics_logger.writer.retry_delay_s = 0.01
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        metrics_logger.on_step(_step(0))
        assert metrics_logger.flush(timeout=30)
        assert _steps_logged(ref) == [1]  # retried: nothing lost
        failures[0] = 10**6  # the store is gone for good
        metrics_logger.on_step(_step(1))  # training goes on
        assert not metrics_logger.close()
    assert metrics_logger.writer.dropped == 7
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("dropped 7 metrics (steps 1..1) after 2 attempts" in e for e in errors), errors
