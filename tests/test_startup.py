"""The startup clock: marks counted from the submission, logged once after the first step
without the step waiting for the log, and the driver's bookkeeping run alongside."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from pathlib import Path

import pytest

from orchestrator.startup import MARKS, FirstStepMark, StartupClock, alongside
from spark_core.pretrain_recipe import reference_drop_path

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "pretrain-smoke.yaml"


def test_marks_count_from_the_submission_and_travel_as_plain_data() -> None:
    submitted = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    clock = StartupClock.for_driver(submitted)
    clock.mark("run_opened")
    clock.mark("run_opened", at=0.0)  # the first mark stays
    shipped = StartupClock.from_dict(clock.to_dict())
    assert shipped is not None
    shipped.mark("worker_started")
    metrics = shipped.metrics()
    assert list(metrics) == ["startup/driver_started_s", "startup/run_opened_s",
                             "startup/worker_started_s"]  # fmt: skip
    assert 4.5 < metrics["startup/run_opened_s"] < 60
    assert metrics["startup/run_opened_s"] <= metrics["startup/worker_started_s"]
    assert StartupClock.from_dict(None) is None
    with pytest.raises(ValueError, match="unknown startup mark 'warm'"):
        clock.mark("warm")
    assert MARKS[0] == "driver_started" and MARKS[-1] == "first_step"


def test_without_a_submission_time_the_driver_counts_from_its_own_start() -> None:
    clock = StartupClock.for_driver(None)
    assert clock.origin == clock.marks["driver_started"] <= time.time()


def test_the_first_step_is_logged_once_and_never_waited_for() -> None:
    release = threading.Event()
    logged: list[dict[str, float]] = []

    def slow_log(values: dict[str, float]) -> None:
        release.wait(5)
        logged.append(values)

    clock = StartupClock(origin=time.time() - 1.0)
    mark = FirstStepMark(clock, slow_log)
    start = time.perf_counter()
    mark.on_step(object())
    mark.on_step(object())
    assert time.perf_counter() - start < 2.5  # the step did not wait for the store (5 s)
    release.set()
    mark.on_epoch_end(None, None)  # joins the logging thread
    assert len(logged) == 1 and 1.0 <= logged[0]["startup/first_step_s"] < 30


def test_a_failed_log_does_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    def broken(values: dict[str, float]) -> None:
        raise ConnectionError("tracking server down")

    mark = FirstStepMark(StartupClock(origin=time.time()), broken)
    with caplog.at_level(logging.ERROR, logger="orchestrator.startup"):
        mark.on_step(object())
        mark.on_epoch_end(None, None)
    assert "could not log the startup metrics" in caplog.text


def test_alongside_runs_the_task_during_the_block_and_waits_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    go, done = threading.Event(), threading.Event()
    with alongside(lambda: go.wait(30) and done.set(), "wait for the block"):
        assert not done.is_set()  # the block runs while the task waits
        go.set()
    assert done.is_set()  # the end of the block waited for the task

    def fails() -> None:
        raise OSError("listing failed")

    with caplog.at_level(logging.ERROR, logger="orchestrator.startup"), alongside(fails, "list"):
        pass
    assert "could not list" in caplog.text


def _modules_loaded(probe: str) -> list[str]:
    """Run ``probe`` in a fresh interpreter; it prints its answer as words."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()


def test_the_driver_does_not_import_torch_or_the_model_before_its_workers_start() -> None:
    """A pre-training driver imports its module to hand the training function to Ray Train:
    PyTorch, timm, torchvision and the SparK model (seconds of imports on a small VM) wait,
    MLflow until the trainer runs (the run opens while Ray Train starts), and recording the
    run imports none of the others."""
    probe = (
        "import sys, orchestrator.pretrain, spark_core;"
        "from orchestrator.kinds import get_kind;"
        "from orchestrator.settings import OrchestratorSettings;"
        "from orchestrator.training import build_trainer, train_worker;"
        f"spec = get_kind('pretrain').load({str(SMOKE)!r}, data_roots=None);"
        "build_trainer(train_worker, {}, spec, job_id='j', settings=OrchestratorSettings());"
        "heavy = ('torch', 'timm', 'torchvision', 'spark_core.model');"
        "print(sorted(m for m in (*heavy, 'mlflow') if m in sys.modules) or 'none');"
        "from orchestrator.tracking import environment_tags;"
        "spec.flat_params(); environment_tags(spec);"  # what the driver records in MLflow
        "print(sorted(m for m in heavy if m in sys.modules) or 'none');"
        "spark_core.build_spark;"
        "print('timm' in sys.modules)"
    )
    assert _modules_loaded(probe) == ["none", "none", "True"]  # not by the driver; on use


def test_ray_trains_controller_does_not_import_torch() -> None:
    """The controller unpickles the trainer's backend config and runs its backend."""
    probe = (
        "import pickle, sys;"
        "from orchestrator.torch_backend import TorchProcessGroup;"
        "config = pickle.loads(pickle.dumps(TorchProcessGroup.for_devices(use_gpu=True)));"
        "config.backend_cls(); config.train_func_context;"
        "print(config.backend, 'torch' in sys.modules,"
        "      'ray.train.v2.api.data_parallel_trainer' in sys.modules)"
    )
    assert _modules_loaded(probe) == ["nccl", "False", "False"]  # nor the driver's trainer


def test_only_rank_0_imports_mlflow() -> None:
    """Every worker imports the training module and the model; only rank 0 tracks."""
    probe = (
        "import sys, orchestrator.training, orchestrator.datasets, spark_core.engine;"
        "print('mlflow' in sys.modules)"
    )
    assert _modules_loaded(probe) == ["False"]


def test_every_lazy_name_of_spark_core_resolves() -> None:
    import spark_core

    assert sorted(spark_core.__all__) == sorted(spark_core._EXPORTS)
    for name in spark_core.__all__:
        assert getattr(spark_core, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = spark_core.nope


def test_the_reference_drop_path_needs_no_timm() -> None:
    assert reference_drop_path("resnet50") == reference_drop_path("resnet50.a1_in1k") == 0.05
    assert reference_drop_path("convnext_large") == 0.4
    assert reference_drop_path("resnet18") == 0.0
