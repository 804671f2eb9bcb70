"""Fine-tuning jobs on a real local Ray cluster, tracked in a real MLflow store.

A two-worker fine-tuning job (DDP over gloo) of an exported SparK encoder runs the paper's
protocol and leaves its record: per-epoch metrics, weights, checkpoint and an MLflow model
loadable by URI. (A fine-tune of a pre-training job by its id, with the two-way link between
the runs, runs over REST in test_api_ray.py.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from conftest import RayTestCluster, checkpoint_registered
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator.finetune import run_finetune
from orchestrator.kinds import get_kind
from orchestrator.specs import SpecError
from orchestrator.tracking import (
    CUSTOM_MODEL_DEVELOPMENT,
    EXPERIMENT_KIND_TAG,
    DataSplit,
    dataset_input,
)
from spark_core import build_spark
from spark_core.checkpoint import export_encoder

pytestmark = pytest.mark.slow

TRAIN_IMAGES = 80  # 64 fine-tuned on, 16 held out (val_fraction 0.2)


def finetune_spec(cluster: RayTestCluster, weights: dict[str, Any], **sections: Any):
    data: dict[str, Any] = {
        "name": "tiny-finetune",
        "model": {"backbone": "resnet18", "input_size": 64},
        "weights": weights,
        "data": {"train": {"kind": "synthetic", "count": TRAIN_IMAGES, "size": 64, "classes": 4}},
        "recipe": {"batch_size": 16, "epochs": 2, "warmup_epochs": 1, "base_lr": 0.05},
        "runtime": {"log_every": 2},
        "resources": {"num_workers": 2},
        **sections,
    }
    return get_kind("finetune").parse(data, data_roots=cluster.settings.allowed_data_roots)


@pytest.fixture(scope="module")
def encoder_file(ray_cluster: RayTestCluster) -> Path:
    """A SparK ResNet-18's exported encoder (timm layout) under the data root."""
    torch.manual_seed(0)
    model = build_spark("resnet18", 64, decoder_width=64)
    path = Path(ray_cluster.settings.allowed_data_roots[0]) / "encoders" / "resnet18.safetensors"
    return export_encoder(model, path)


def test_two_worker_finetune_job_leaves_a_complete_record(
    ray_cluster: RayTestCluster, encoder_file: Path
) -> None:
    spec = finetune_spec(ray_cluster, {"kind": "file", "path": str(encoder_file)})
    result = run_finetune(spec, job_id="finetune-happy", settings=ray_cluster.settings)
    assert result.status == "FINISHED" and result.epochs == 2
    assert result.steps == 2 * 4  # 64 images / 2 workers = 32 each, batch 8 -> 4 per epoch

    client = MlflowClient(ray_cluster.settings.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sparkorch.source"] == str(encoder_file)
    assert run.data.tags["sparkorch.weights_layout"] == "timm"
    params = run.data.params
    assert params["recipe.optimizer"] == "lamb" and params["recipe.table_row"] == "resnet50"
    assert params["recipe.mixup"] == "0.1" and params["recipe.batch_size"] == "16"

    # Evaluated after both epochs (2 // 3 = 0: every epoch is in the last two thirds);
    # epoch metrics at step = the 0-based epoch, as epoch/loss.
    for key in ("val/top1", "val/ema_top1", "epoch/train_top1", "epoch/loss", "epoch/lr"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    best = max(
        m.value
        for key in ("val/top1", "val/ema_top1")
        for m in client.get_metric_history(result.run_id, key)
    )
    assert result.metrics["finetune_top1"] == pytest.approx(best)
    assert run.data.metrics["final/finetune_top1"] == pytest.approx(best)
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 8

    artifacts = {a.path for a in client.list_artifacts(result.run_id, "weights")}
    assert artifacts == {
        "weights/resnet18-finetuned-best.safetensors",
        "weights/resnet18-finetuned-last.safetensors",
    }
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoint")] == [
        "checkpoint/finetune.pt"
    ]

    # The classifier as an MLflow model: loadable by URI, the best weights, 4 classes.
    mlflow.set_tracking_uri(ray_cluster.settings.tracking_uri)
    model = mlflow.pytorch.load_model(result.model_uri)  # a torch.export program
    best_file = client.download_artifacts(
        result.run_id, "weights/resnet18-finetuned-best.safetensors"
    )
    best_state = load_file(best_file)
    for key, value in model.state_dict().items():
        assert torch.equal(value, best_state[key]), key
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(images).shape == (2, 4)
    logged = mlflow.models.get_model_info(result.model_uri)
    model_record = mlflow.get_logged_model(logged.model_id)
    assert model_record.experiment_id == run.info.experiment_id  # not MLflow's "Default"
    assert model_record.source_run_id == result.run_id
    assert logged.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 64, 64)

    # MLflow 3's views: the experiment's kind, the datasets, rank 0's system metrics.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    for context, part in (("training", "train"), ("validation", "val")):
        expected = dataset_input(spec.data.train, context, DataSplit(part, 0.2, 0)).dataset
        assert inputs[context].name == f"synthetic-textures-n{TRAIN_IMAGES}-s64-c4-seed0:{part}"
        assert inputs[context].digest == expected.digest
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )


def test_weights_that_do_not_fit_fail_before_any_run_opens(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    import timm

    data_root = Path(ray_cluster.settings.allowed_data_roots[0])
    wrong = data_root / "resnet34.pth"
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), wrong)
    spec = finetune_spec(ray_cluster, {"kind": "file", "path": str(wrong)})
    with pytest.raises(ValueError, match=r"layer1\.2"):
        run_finetune(spec, job_id="finetune-wrong", settings=ray_cluster.settings)
    client = MlflowClient(ray_cluster.settings.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, filter_string="tags.job_id = 'finetune-wrong'")


def test_weight_files_outside_the_data_roots_are_refused(ray_cluster: RayTestCluster) -> None:
    with pytest.raises(SpecError, match=r"weights.file.path.*outside the allowed data roots"):
        finetune_spec(ray_cluster, {"kind": "file", "path": "/etc/passwd.pth"})


@pytest.mark.extended
def test_a_stopped_finetune_job_resumes_under_the_same_id(
    ray_cluster: RayTestCluster, encoder_file: Path, tmp_path: Path
) -> None:
    """SIGTERM ends the job KILLED after a checkpoint; the same job id then continues from
    Ray Train's checkpoint in the same MLflow run and finishes every epoch."""
    spec = finetune_spec(
        ray_cluster,
        {"kind": "file", "path": str(encoder_file)},
        recipe={"batch_size": 16, "epochs": 4, "warmup_epochs": 1, "base_lr": 0.05},
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    job_id = "finetune-stop-resume"
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.finetune", "--spec", str(spec_file), "--job-id", job_id],
        env=ray_cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_registered(ray_cluster, job_id) and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    client = MlflowClient(ray_cluster.settings.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, filter_string=f"tags.job_id = '{job_id}'")
    assert run.info.status == "KILLED"

    result = run_finetune(spec, job_id=job_id, settings=ray_cluster.settings)
    assert result.status == "FINISHED" and result.run_id == run.info.run_id
    assert result.epochs == 4 and result.steps == 4 * 4
    assert "train/resumed_at_step" in client.get_run(result.run_id).data.metrics
    evaluated = client.get_metric_history(result.run_id, "val/top1")
    assert {m.step for m in evaluated} >= {1, 2, 3}
