"""Ablation sweeps: spec validation (fast) and Ray Tune over Ray Train with MLflow (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from conftest import RayTestCluster, actor_count
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.specs import SpecError, load_sweep, parse_sweep
from orchestrator.sweeps import run_sweep, table_column

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BASE: dict[str, Any] = {
    "name": "tiny-trial",
    "model": {"backbone": "resnet18", "input_size": 64},
    "spark": {"decoder_width": 64},
    "data": {"train": {"kind": "synthetic", "count": 64, "size": 64, "classes": 4}},
    "optim": {"global_batch_size": 16, "epochs": 2, "warmup_epochs": 1, "base_lr": 0.05},
    "resources": {"num_workers": 1},
    "evaluation": {"method": "knn"},
    "tracking": {"reconstruction_every": 0},
}


def sweep_errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_sweep(data, data_roots=[])
    return dict(info.value.errors)


# ----------------------------------------------------------------------------- validation


def test_the_examples_validate(tmp_path: Path) -> None:
    for folder in ("imagenet/train", "imagenet/val", "imagenet100/train", "imagenet100/val"):
        (tmp_path / folder).mkdir(parents=True)
    smoke = load_sweep(EXAMPLES / "sweep-smoke.yaml", data_roots=[tmp_path])
    assert list(smoke.search) == ["spark.mask_ratio", "spark.decoder_depth"]
    paper = load_sweep(EXAMPLES / "ablation-paper.yaml", data_roots=[tmp_path])
    assert paper.variants["random-init"] == {"optim.epochs": 0}
    assert {"dense-masking", "single-scale", "no-mask-token"} <= set(paper.variants)
    search = load_sweep(EXAMPLES / "search-mask-ratio.yaml", data_roots=[tmp_path])
    assert search.algorithm == "optuna" and search.scheduler.kind == "asha"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"search": {"spark.nope": {"grid": [1]}}}, "search.spark.nope", "not a field"),
        ({"search": {"model": {"grid": [1]}}}, "search.model", "not a field"),
        ({"search": {"spark.mask_ratio": {"grid": [0.5, 1.2]}}}, "search.spark.mask_ratio", "1.2"),
        (  # at the base's 64 px (2x2 patches) 0.9 leaves no patch visible
            {"search": {"spark.mask_ratio": {"grid": [0.5, 0.9]}}},
            "search.spark.mask_ratio",
            "0 of 4 patches stay visible",
        ),
        (
            {"search": {"spark.hierarchy": {"choice": [1, 5]}}, "algorithm": "random"},
            "search.spark.hierarchy",
            "less than or equal to 4",
        ),
        (
            {"search": {"spark.mask_ratio": {"uniform": [0.9, 0.4]}}, "algorithm": "random"},
            "search.spark.mask_ratio",
            "lower bound",
        ),
        (
            {"search": {"spark.mask_ratio": {"grid": [0.5], "choice": [0.6]}}},
            "search.spark.mask_ratio",
            "exactly one",
        ),
        (
            {"search": {"spark.mask_ratio": {"normal": [0, 1]}}},
            "search.spark.mask_ratio.normal",
            "",
        ),
        ({"search": {"spark.mask_ratio": {"uniform": [0.4, 0.8]}}}, "algorithm", "grid search"),
        ({"variants": {"bad": {"spark.decoder_depth": 0}}}, "variants.bad", "decoder_depth"),
        ({"variants": {"bad": {"optim.nope": 1}}}, "variants.bad", "not a field"),
        ({"metric": "linear_probe_top1"}, "metric", "evaluation.method: linear_probe"),
        (
            {"algorithm": "optuna", "search": {"spark.mask_ratio": {"grid": [0.4]}}},
            "algorithm",
            "optuna cannot search a grid",
        ),
        (
            {
                "scheduler": {"kind": "asha"},
                "base": {**BASE, "optim": {**BASE["optim"], "epochs": 1}},
            },
            "scheduler.kind",
            "epochs >= 2",
        ),
    ],
)
def test_invalid_sweeps_are_rejected_naming_the_path(
    overrides: dict[str, Any], field: str, message: str
) -> None:
    data = {"base": BASE, "metric": "knn_top1", **overrides}
    errors = sweep_errors(data)
    assert field in errors, errors
    assert message in errors[field]


def test_trial_spec_applies_variant_then_search_then_seed() -> None:
    sweep = parse_sweep(
        {
            "base": BASE,
            "metric": "knn_top1",
            "search": {"spark.mask_ratio": {"grid": [0.4, 0.75]}},
            "variants": {"dense": {"spark.sparse": False, "spark.mask_ratio": 0.5}},
        },
        data_roots=[],
    )
    spec = sweep.trial_spec({"spark.mask_ratio": 0.75}, "dense", seed=7)
    assert (spec.spark.sparse, spec.spark.mask_ratio, spec.seed) == (False, 0.75, 7)
    assert spec.model == sweep.base.model


# ---------------------------------------------------------------------------- on Ray


def children(cluster: RayTestCluster, parent_run_id: str) -> list:
    client = MlflowClient(cluster.settings.tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )


@pytest.mark.slow
def test_grid_sweep_gives_nested_runs_a_table_and_a_plot(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    sweep = parse_sweep(
        {
            "name": "grid-2x2",
            "base": BASE,
            "metric": "knn_top1",
            "search": {
                "spark.mask_ratio": {"grid": [0.4, 0.75]},
                "spark.decoder_depth": {"grid": [1, 2]},
            },
            "max_concurrent_trials": 2,
        },
        data_roots=ray_cluster.settings.allowed_data_roots,
    )
    cleaners = actor_count("PlacementGroupCleaner")
    result = run_sweep(sweep, job_id="sweep-grid", settings=ray_cluster.settings)
    assert result.status == "FINISHED"
    assert len(result.records) == 4
    # Trials build their trainers in Tune's actors, which the sweep's job outlives: each
    # keeps Ray Train's placement-group cleaner.
    assert actor_count("PlacementGroupCleaner") == cleaners + 4
    assert {(r["spark.mask_ratio"], r["spark.decoder_depth"]) for r in result.records} == {
        (0.4, 1),
        (0.4, 2),
        (0.75, 1),
        (0.75, 2),
    }
    assert all(r["status"] == "FINISHED" and r["epochs"] == 2 for r in result.records)
    assert all(0 <= r["knn_top1"] <= 100 for r in result.records)

    runs = children(ray_cluster, result.run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["spark.decoder_depth"] for r in runs} == {"1", "2"}
    client = MlflowClient(ray_cluster.settings.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sparkorch.best_run_id"] in {r.info.run_id for r in runs}
    folder = Path(client.download_artifacts(result.run_id, "results", str(tmp_path)))
    table = (folder / "table.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "knn_top1" in table[0]
    assert (folder / "table.csv").read_text().count("\n") == 5
    with Image.open(folder / "metric.png") as picture:
        assert picture.size[0] > 300
    best = {a.path for a in client.list_artifacts(result.run_id, "best")}
    assert best == {"best/spec", "best/encoder"}

    # MLflow 3's views. The table as an MLflow table (the UI's table view).
    table = json.loads((folder / "table.json").read_text())
    assert table["columns"] == [table_column(c) for c in result.columns]
    assert len(table["data"]) == 4 and "spark/mask_ratio" in table["columns"]
    assert {"path": "results/table.json", "type": "table"} in json.loads(
        parent.data.tags["mlflow.loggedArtifacts"]
    )
    # Every trial: the searched values as params under the same names (compare view), its
    # dataset, rank 0's system metrics, and its encoder as a model that loads and runs.
    searched = {
        (r.data.params["spark.mask_ratio"], r.data.params["spark.decoder_depth"]) for r in runs
    }
    assert searched == {("0.4", "1"), ("0.4", "2"), ("0.75", "1"), ("0.75", "2")}
    for trial in runs:
        data = {i.tags[0].value: i.dataset.name for i in trial.inputs.dataset_inputs}
        name = "synthetic-textures-n64-s64-c4-seed0"  # pre-trained on all but the k-NN's hold-out
        assert data == {"training": f"{name}:train", "evaluation": f"{name}:val"}
        assert "system/cpu_utilization_percentage" in trial.data.metrics
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    mlflow.set_tracking_uri(ray_cluster.settings.tracking_uri)
    encoder = mlflow.pytorch.load_model(f"runs:/{runs[0].info.run_id}/encoder_model")
    with torch.no_grad():
        assert encoder(torch.randn(3, 3, 64, 64)).shape == (3, 512)  # ResNet-18's features


@pytest.mark.slow
def test_sweep_scored_by_fine_tuning_nests_each_fine_tune_under_its_trial(
    ray_cluster: RayTestCluster,
) -> None:
    """Pre-train -> fine-tune per trial; the from-scratch row (no pre-training) fine-tunes
    with the same budget from timm's initialisation."""
    base = {**BASE, "evaluation": {"method": "none"}, "optim": {**BASE["optim"], "epochs": 1}}
    finetune = {
        "data": {"train": {"kind": "synthetic", "count": 40, "size": 64, "classes": 4}},
        "recipe": {"batch_size": 16, "epochs": 1, "warmup_epochs": 0, "base_lr": 0.05},
    }
    sweep = parse_sweep(
        {
            "name": "variants",
            "base": base,
            "metric": "finetune_top1",
            "variants": {"reference": {}, "scratch": {"optim.epochs": 0}},
            "finetune": finetune,
            "max_concurrent_trials": 2,
        },
        data_roots=ray_cluster.settings.allowed_data_roots,
    )
    result = run_sweep(sweep, job_id="sweep-variants", settings=ray_cluster.settings)
    rows = {r["variant"]: r for r in result.records}
    assert set(rows) == {"reference", "scratch"}
    assert rows["scratch"]["epochs"] == 0 and rows["reference"]["epochs"] == 1
    assert all(r["status"] == "FINISHED" for r in rows.values())
    assert all(0 <= r["finetune_top1"] <= 100 for r in rows.values())

    client = MlflowClient(ray_cluster.settings.tracking_uri)
    trials = {r.data.tags["sparkorch.variant"]: r for r in children(ray_cluster, result.run_id)}
    for variant, trial in trials.items():
        (finetuned,) = client.search_runs(
            [trial.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{trial.info.run_id}'",
        )
        assert finetuned.info.status == "FINISHED"
        score = finetuned.data.metrics["final/finetune_top1"]
        assert trial.data.metrics["eval/finetune_top1"] == score
        assert rows[variant]["finetune_top1"] == round(score, 4)
        source = finetuned.data.tags.get("sparkorch.source_run_id")
        assert source == (trial.info.run_id if variant == "reference" else None)
        assert finetuned.data.params["weights.kind"] == (
            "mlflow_run" if variant == "reference" else "none"
        )
        assert trial.data.params["sweep.variant"] == variant


def test_finetune_metric_needs_a_finetune_section() -> None:
    errors = sweep_errors({"base": BASE, "metric": "finetune_top1"})
    assert "needs a finetune section" in errors["metric"]
    bad = {"data": {"train": {"kind": "synthetic", "classes": 1}}}
    errors = sweep_errors({"base": BASE, "metric": "finetune_top1", "finetune": bad})
    assert "data.train.classes" in errors["finetune"]


@pytest.mark.extended  # 80 s; make test keeps the grid and the fine-tuned sweeps
def test_asha_stops_a_lagging_trial_and_ends_its_run(ray_cluster: RayTestCluster) -> None:
    """Two trials in sequence at an lr too small to learn: the first keeps its loss near 1.0
    (per-patch normalised target), the second (loss on raw pixels, about 1.3 here) lags it
    at the first rung, so ASHA (reduction factor 2) must stop it."""
    base = {**BASE, "optim": {**BASE["optim"], "epochs": 3, "base_lr": 1e-5}}
    sweep = parse_sweep(
        {
            "name": "asha",
            "base": base,
            "metric": "knn_top1",
            "search": {"spark.norm_pix_loss": {"grid": [True, False]}},
            "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
        },
        data_roots=ray_cluster.settings.allowed_data_roots,
    )
    result = run_sweep(sweep, job_id="sweep-asha", settings=ray_cluster.settings)
    rows = {r["spark.norm_pix_loss"]: r for r in result.records}
    assert rows[True]["status"] == "FINISHED" and rows[True]["epochs"] == 3
    assert rows[False]["status"] == "STOPPED" and rows[False]["epochs"] < 3
    runs = {r.data.params["spark.norm_pix_loss"]: r for r in children(ray_cluster, result.run_id)}
    assert runs["True"].info.status == "FINISHED"
    assert runs["False"].info.status == "KILLED"  # not left RUNNING


@pytest.mark.extended
@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    import yaml

    data = {
        "name": "restore",
        "base": {**BASE, "optim": {**BASE["optim"], "epochs": 3}},
        "metric": "knn_top1",
        "search": {"spark.decoder_depth": {"grid": [1, 2]}},
        "max_concurrent_trials": 1,
    }
    sweep = parse_sweep(data, data_roots=ray_cluster.settings.allowed_data_roots)
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    job_id = "sweep-restore"
    client = MlflowClient(ray_cluster.settings.tracking_uri)

    def parent_id() -> str | None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.job_id = '{job_id}'")
        return runs[0].info.run_id if runs else None

    def finished_children() -> list:
        parent = parent_id()
        if parent is None:
            return []
        return [r for r in children(ray_cluster, parent) if r.info.status == "FINISHED"]

    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.sweep", "--spec", str(spec_file), "--job-id", job_id],
        env=ray_cluster.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not finished_children() and process.poll() is None:
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1)
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(12)  # let Tune write its experiment state after the finished trial
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    first = finished_children()
    assert len(first) == 1
    first_run = first[0]
    steps_before = len(client.get_metric_history(first_run.info.run_id, "train/step"))

    result = run_sweep(sweep, job_id=job_id, settings=ray_cluster.settings)
    assert result.status == "FINISHED" and len(result.records) == 2
    assert all(r["status"] == "FINISHED" for r in result.records)
    runs = children(ray_cluster, result.run_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # The finished trial was not run again: its run got no new steps.
    after = client.get_run(first_run.info.run_id)
    assert after.info.end_time == first_run.info.end_time
    assert len(client.get_metric_history(first_run.info.run_id, "train/step")) == steps_before


@pytest.mark.extended
@pytest.mark.slow
def test_optuna_sweep_retries_a_trial_whose_driver_died(ray_cluster: RayTestCluster) -> None:
    """Optuna samples two trials; the first trial's driver process is killed mid-training and
    ``max_failures_per_trial`` lets Tune run it again: it resumes its own MLflow run."""
    import os
    import threading

    from orchestrator.processes import kill, titled

    sweep = parse_sweep(
        {
            "name": "optuna-retry",
            "base": BASE,
            "metric": "knn_top1",
            "search": {
                "spark.mask_ratio": {"uniform": [0.5, 0.8]},
                "spark.decoder_depth": {"choice": [1, 2]},
            },
            "algorithm": "optuna",
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "max_failures_per_trial": 1,
        },
        data_roots=ray_cluster.settings.allowed_data_roots,
    )
    killed: list[int] = []
    done = threading.Event()

    storage = Path(ray_cluster.settings.storage_path)

    def kill_first_trial_driver() -> None:
        # Once a trial has registered its first checkpoint, kill the running trial's driver.
        # (Files and /proc, not MLflow's batched metrics or the state API: both lag.)
        while not done.wait(0.5):
            snapshots = storage.glob("sweep-optuna-*/checkpoint_manager_snapshot.json")
            if not any("epoch-0" in path.read_text() for path in snapshots):
                continue
            drivers = titled("ray::ImplicitFunc", below=os.getpid())
            kill(drivers)
            killed.extend(drivers)
            if killed:
                return

    def watch() -> None:
        try:
            kill_first_trial_driver()
        except Exception as error:  # reported by the assertion below, not lost in a thread
            errors.append(repr(error))

    errors: list[str] = []
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_sweep(sweep, job_id="sweep-optuna", settings=ray_cluster.settings)
    finally:
        done.set()
        watcher.join(timeout=30)
    assert killed, f"the trial driver was never killed; the watcher's errors: {errors}"
    assert result.status == "FINISHED" and len(result.records) == 2
    assert all(r["status"] == "FINISHED" and r["epochs"] == 2 for r in result.records)
    assert all(0.5 <= r["spark.mask_ratio"] <= 0.8 for r in result.records)
    assert {r["spark.decoder_depth"] for r in result.records} <= {1, 2}
    runs = children(ray_cluster, result.run_id)
    assert len(runs) == 2, "the retried trial must reopen its run, not start another"
    assert all(r.info.status == "FINISHED" for r in runs)


def test_random_search_space_samples_every_distribution() -> None:
    """algorithm: random hands Tune real sampling domains (drawn num_samples times)."""
    import random

    from ray.tune.search.sample import Categorical, Float, Integer

    from orchestrator.sweeps import SEED_KEY, param_space

    sweep = parse_sweep(
        {
            "name": "random",
            "base": BASE,
            "metric": "final_loss",
            "algorithm": "random",
            "num_samples": 5,
            "search": {
                "spark.mask_ratio": {"uniform": [0.4, 0.8]},
                "optim.base_lr": {"loguniform": [1e-4, 1e-2]},
                "spark.decoder_depth": {"randint": [1, 4]},
                "spark.hierarchy": {"choice": [3, 4]},
                "optim.warmup_epochs": {"quniform": [0, 1, 1]},
            },
        },
        data_roots=[],
    )
    space = param_space(sweep)
    assert isinstance(space["spark.mask_ratio"], Float)
    assert isinstance(space["optim.base_lr"], Float)
    assert isinstance(space["spark.decoder_depth"], Integer)
    assert isinstance(space["spark.hierarchy"], Categorical)
    random.seed(0)
    draws = [space["spark.mask_ratio"].sample() for _ in range(50)]
    assert all(0.4 <= d <= 0.8 for d in draws) and len(set(draws)) > 40
    lrs = [space["optim.base_lr"].sample() for _ in range(50)]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert {space["spark.decoder_depth"].sample() for _ in range(50)} <= {1, 2, 3}
    assert space[SEED_KEY] == sweep.seeds[0]


def test_a_sweep_whose_every_trial_failed_fails() -> None:
    from orchestrator.sweeps import Row, SweepFailed, check_some_trial_finished

    failed = Row("", {"spark.mask_ratio": 0.5}, statuses=["FAILED", "FAILED"])
    with pytest.raises(SweepFailed, match="all 3 trials failed"):
        check_some_trial_finished([failed, Row("", {"spark.mask_ratio": 0.7}, statuses=["FAILED"])])
    check_some_trial_finished([failed, Row("", {"spark.mask_ratio": 0.7}, statuses=["STOPPED"])])
    check_some_trial_finished([Row("", {}, statuses=["FAILED", "FINISHED"])])
