"""What the MLflow UI shows of a job, on a real (SQLite) store and without Ray: the experiment's
kind, the run's datasets, the encoder as a loadable (and registered) model, system metrics
and a sweep's results table. (The Ray job tests check the same records on real jobs.)"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import mlflow
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator import tracking
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import parse_spec
from orchestrator.tracking import (
    CUSTOM_MODEL_DEVELOPMENT,
    EXPERIMENT_KIND_TAG,
    DataSplit,
    client_for,
    dataset_input,
    ensure_experiment,
    log_datasets,
    open_job_run,
    system_metrics,
)

SPEC = {
    "name": "dashboard-tiny",
    "model": {"backbone": "resnet18", "input_size": 64},
    "spark": {"decoder_width": 64},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
    "optim": {"global_batch_size": 16, "epochs": 1, "warmup_epochs": 0},
    "evaluation": {"method": "none"},
}


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OrchestratorSettings:
    # The versions and host are beside the point, and reading them imports Ray.
    monkeypatch.setattr(tracking, "environment_tags", lambda spec: {"sparkorch.host": "here"})
    (tmp_path / "home" / "data").mkdir(parents=True)
    return OrchestratorSettings(home=tmp_path / "home")


def test_experiments_are_tagged_for_the_model_training_view(
    settings: OrchestratorSettings,
) -> None:
    client = client_for(settings.tracking_uri)
    created = ensure_experiment(client, "new-one", settings)
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT
    # One made before the tag (or by hand) gets it when a job opens a run in it ...
    where = (settings.artifact_root / "by-hand").as_uri()  # not ./mlruns of the working dir
    old = client.create_experiment("made-before", artifact_location=where)
    spec = parse_spec({**SPEC, "tracking": {"experiment": "made-before"}}, data_roots=[])
    ref, _ = open_job_run(spec, "job-in-old", settings)
    assert ref.experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT
    # ... but a kind someone chose stays.
    genai = {EXPERIMENT_KIND_TAG: "genai_development"}
    chosen = client.create_experiment("chosen", artifact_location=where, tags=genai)
    assert ensure_experiment(client, "chosen", settings) == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_encoder_is_a_loadable_registered_model_beside_its_weights(
    settings: OrchestratorSettings, tmp_path: Path
) -> None:
    """runs:/ and models:/<name>/<version> load a timm network (no classifier) with the
    SparK encoder's weights; the version's source is the logged model; a second finish of
    the same run logs no second model."""
    from orchestrator.pretrain import ENCODER_MODEL_NAME, _log_final_artifacts

    spec = parse_spec({**SPEC, "tracking": {"register_model": True}}, data_roots=[])
    ref, _ = open_job_run(spec, "job-encoder", settings)
    environment = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    encoder, model_uri, _ = _log_final_artifacts(spec, ref, checkpoint=None)
    # MLflow's fluent globals are put back: later jobs and subprocesses keep their store.
    assert {k: os.environ.get(k) for k in environment} == environment
    again, uri_again, _ = _log_final_artifacts(spec, ref, checkpoint=None)
    assert (again, uri_again) == (encoder, model_uri)

    client = MlflowClient(settings.tracking_uri)
    (version,) = client.search_model_versions(f"name = '{spec.name}'")
    assert version.source == model_uri and version.run_id == ref.run_id
    logged = client.search_logged_models(experiment_ids=[ref.experiment_id])
    assert [m.source_run_id for m in logged].count(ref.run_id) == 1  # the store is shared

    weights = load_file(client.download_artifacts(ref.run_id, encoder, str(tmp_path)))
    reference = timm.create_model("resnet18", num_classes=0)
    reference.load_state_dict(weights)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(images)
    assert expected.shape == (3, reference.num_features)
    mlflow.set_tracking_uri(settings.tracking_uri)
    for uri in (f"runs:/{ref.run_id}/{ENCODER_MODEL_NAME}", f"models:/{spec.name}/1"):
        network = mlflow.pytorch.load_model(uri)
        with torch.no_grad():
            torch.testing.assert_close(network(images), expected, rtol=1e-4, atol=1e-4)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 64, 64)
    assert mlflow.get_logged_model(info.model_id).experiment_id == ref.experiment_id


def test_datasets_are_run_inputs_with_a_digest_of_the_listing(
    settings: OrchestratorSettings, tmp_path: Path
) -> None:
    spec = parse_spec(SPEC, data_roots=[])
    ref, _ = open_job_run(spec, "job-data", settings)
    folder = tmp_path / "home" / "data" / "pets"
    for name, size in (("cat/a.png", 10), ("dog/b.jpg", 20), (".hidden/c.png", 5)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)
    (folder / "notes.txt").write_text("not an image")
    train = parse_spec(
        {**SPEC, "data": {"train": {"kind": "image_folder", "path": str(folder)}}},
        data_roots=[tmp_path / "home" / "data"],
    ).data.train
    split = DataSplit("val", 0.2, 0)
    inputs = [
        dataset_input(train, "training"),
        dataset_input(train, "validation", split),
        dataset_input(spec.data.train, "evaluation"),
    ]
    log_datasets(ref, inputs)
    log_datasets(ref, inputs)  # a job run again adds nothing
    logged = client_for(ref.tracking_uri).get_run(ref.run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in logged}
    assert sorted(by_context) == ["evaluation", "training", "validation"] and len(logged) == 3
    folder_set = by_context["training"]
    assert folder_set.name == "data/pets" and folder_set.source_type == "local"
    assert json.loads(folder_set.source) == {"uri": str(folder)}
    assert json.loads(folder_set.profile) == {"source_images": 2, "bytes": 30}
    assert by_context["validation"].name == "data/pets:val"
    assert by_context["validation"].digest != folder_set.digest
    synthetic = by_context["evaluation"]
    assert synthetic.source_type == "synthetic"
    assert json.loads(synthetic.source)["uri"].startswith("synthetic://textures?count=32")

    # The digest follows the listing (names and sizes), not the contents.
    (folder / "cat" / "a.png").write_bytes(b"y" * 10)
    assert dataset_input(train, "training").dataset.digest == folder_set.digest
    (folder / "cat" / "a.png").write_bytes(b"y" * 11)
    assert dataset_input(train, "training").dataset.digest != folder_set.digest


def test_system_metrics_are_logged_to_the_runs_store_even_for_a_short_block(
    settings: OrchestratorSettings,
) -> None:
    spec = parse_spec(SPEC, data_roots=[])
    ref, _ = open_job_run(spec, "job-system", settings)
    mlflow.set_tracking_uri("sqlite:///nowhere-else.db")  # the monitor must not use this
    try:
        with system_metrics(ref, interval_s=0.2):
            time.sleep(0.7)
        with system_metrics(ref, interval_s=30):  # shorter than one interval: still a point
            time.sleep(0.1)
    finally:
        mlflow.set_tracking_uri(None)
    client = client_for(ref.tracking_uri)
    history = client.get_metric_history(ref.run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert len(steps) >= 3 and steps == list(range(len(steps))), steps  # resumed, not restarted
    metrics = client.get_run(ref.run_id).data.metrics
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= set(metrics)
    assert not Path("nowhere-else.db").exists()


def test_a_sweep_table_is_an_mlflow_table_rewritten_not_appended(
    settings: OrchestratorSettings,
) -> None:
    from orchestrator.sweeps import TABLE_ARTIFACT, log_results_table

    spec = parse_spec(SPEC, data_roots=[])
    ref, _ = open_job_run(spec, "job-sweep", settings)
    client = client_for(ref.tracking_uri)
    columns = ["spark.mask_ratio", "knn_top1", "status"]
    records = [
        {"spark.mask_ratio": 0.4, "knn_top1": 50.0, "status": "FINISHED"},
        {"spark.mask_ratio": 0.75, "knn_top1": math.nan, "status": "FAILED"},
    ]
    expected = [[0.4, 50.0, "FINISHED"], [0.75, None, "FAILED"]]
    for _ in range(2):  # the second time: the sweep run again
        log_results_table(client, ref.run_id, columns, records)
        path = client.download_artifacts(ref.run_id, TABLE_ARTIFACT)
        table = json.loads(Path(path).read_text())
        # pandas' "split" layout, as log_table writes it; no dots, which the UI would nest
        assert table["columns"] == ["spark/mask_ratio", "knn_top1", "status"]
        assert table["data"] == expected
    logged = json.loads(client.get_run(ref.run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": TABLE_ARTIFACT, "type": "table"}]
