"""Pre-training jobs on a real local Ray cluster, tracked in a real MLflow store.

Every test here runs Ray Train V2 ``TorchTrainer`` jobs (DDP over gloo) end to end; they are
slow (tens of seconds each) and share one Ray head (``ray_cluster`` in conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from conftest import RayTestCluster, actor_count, checkpoint_registered
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator.pretrain import run_pretrain
from orchestrator.specs import PretrainSpec, parse_spec

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 4  # 64 images, global batch 16


def tiny_spec(cluster: RayTestCluster, **sections: Any) -> PretrainSpec:
    """ResNet-18 at 64 px with a narrow decoder on 64 generated images, 2 workers."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"backbone": "resnet18", "input_size": 64},
        "spark": {"decoder_width": 64},
        "data": {"train": {"kind": "synthetic", "count": 64, "size": 64, "classes": 4}},
        "optim": {
            "global_batch_size": 16,
            "epochs": 2,
            "warmup_epochs": 1,
            "base_lr": 0.05,
            "log_every": 1,
        },
        "resources": {"num_workers": 2},
        "evaluation": {"method": "none"},
        "tracking": {"reconstruction_every": 1, "reconstruction_images": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **values}
        else:
            data[section] = values
    return parse_spec(data, data_roots=cluster.settings.allowed_data_roots)


def client(cluster: RayTestCluster) -> MlflowClient:
    return MlflowClient(cluster.settings.tracking_uri)


def step_history(cluster: RayTestCluster, run_id: str) -> list[int]:
    """``train/step`` values in the order they were logged (1-based global steps)."""
    history = client(cluster).get_metric_history(run_id, "train/step")
    return [int(m.value) for m in sorted(history, key=lambda m: (m.timestamp, m.value))]


def wait_for(predicate, timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def find_run(cluster: RayTestCluster, job_id: str) -> Any:
    mlflow_client = client(cluster)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return None
    runs = mlflow_client.search_runs(experiments, filter_string=f"tags.job_id = '{job_id}'")
    return runs[0] if runs else None


def latest_step(cluster: RayTestCluster, job_id: str) -> int:
    run = find_run(cluster, job_id)
    return int(run.data.metrics.get("train/step", 0)) if run is not None else 0


# --------------------------------------------------------------------------- the happy path


def test_two_worker_job_learns_and_leaves_a_complete_mlflow_record(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    spec = tiny_spec(
        ray_cluster,
        optim={"epochs": 3},
        data={"train": {"kind": "synthetic", "count": 96, "size": 64, "classes": 4}},
        evaluation={"method": "knn"},
        tags={"purpose": "test"},
        tracking={"register_model": True},
    )
    cleaners = actor_count("PlacementGroupCleaner")
    result = run_pretrain(spec, job_id="happy-path", settings=ray_cluster.settings)
    assert result.status == "FINISHED"
    assert result.epochs == 3 and result.steps == 3 * 4  # 72 pre-training images / 16

    mlflow_client = client(ray_cluster)
    run = mlflow_client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["job_id"] == "happy-path" and tags["purpose"] == "test"
    assert tags["sparkorch.num_workers"] == "2" and tags["sparkorch.device"] == "cpu"
    assert tags["sparkorch.version.torch"] == torch.__version__
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["resources.num_workers"] == "2"
    assert params["spark.mask_ratio"] == "0.6"

    epoch_losses = [
        m.value
        for m in sorted(
            mlflow_client.get_metric_history(result.run_id, "epoch/loss"), key=lambda m: m.step
        )
    ]
    assert len(epoch_losses) == 3
    assert epoch_losses[-1] < epoch_losses[0]
    assert step_history(ray_cluster, result.run_id) == list(range(1, 13))
    for key in ("train/lr", "train/weight_decay", "train/grad_norm", "train/images_per_sec"):
        assert len(mlflow_client.get_metric_history(result.run_id, key)) == 12, key
    assert 0.0 <= run.data.metrics["eval/knn_top1"] <= 100.0
    # Ray Train started what the job needs: no dataset manager (the job reads its own files),
    # no placement-group cleaner (the job's end frees its placement group).
    assert _actor_classes() >= {"TrainController", "RayTrainWorker"}
    assert "DatasetManager" not in _actor_classes()
    assert actor_count("PlacementGroupCleaner") == cleaners

    artifacts = {a.path for a in mlflow_client.list_artifacts(result.run_id)}
    assert {"spec", "encoder", "checkpoint", "images"} <= artifacts
    spec_dir = Path(mlflow_client.download_artifacts(result.run_id, "spec", str(tmp_path)))
    assert yaml.safe_load((spec_dir / "spec.yaml").read_text()) == spec.model_dump(mode="json")
    images = [a.path for a in mlflow_client.list_artifacts(result.run_id, "images")]
    assert any("reconstruction" in path for path in images)
    versions = mlflow_client.search_model_versions(f"name = '{spec.name}'")
    assert [v.run_id for v in versions] == [result.run_id]
    assert versions[0].source == result.model_uri  # the logged model, loadable by models:/

    # The exported encoder loads into timm with only the classifier missing.
    from orchestrator.cli import main as sparkctl

    os.environ["SPARKORCH_HOME"] = str(ray_cluster.settings.home)
    try:
        assert sparkctl(["export", result.run_id, str(tmp_path / "enc.safetensors")]) == 0
    finally:
        del os.environ["SPARKORCH_HOME"]
    net = timm.create_model("resnet18", num_classes=4)
    missing, unexpected = net.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


@pytest.mark.extended  # 65 s; tests/test_engine_ddp.py checks this equality without Ray
def test_two_workers_match_one_worker_with_the_same_global_batch(
    ray_cluster: RayTestCluster,
) -> None:
    """DDP with synchronised sparse BN sees the same global batch, masks and augmentation."""
    overrides = {"optim": {"epochs": 1}, "tracking": {"reconstruction_every": 0}}
    one = run_pretrain(
        tiny_spec(ray_cluster, resources={"num_workers": 1}, **overrides),
        job_id="match-1-worker",
        settings=ray_cluster.settings,
    )
    two = run_pretrain(
        tiny_spec(ray_cluster, resources={"num_workers": 2}, **overrides),
        job_id="match-2-workers",
        settings=ray_cluster.settings,
    )
    mlflow_client = client(ray_cluster)

    def losses(run_id: str) -> torch.Tensor:
        history = mlflow_client.get_metric_history(run_id, "train/loss")
        return torch.tensor([m.value for m in sorted(history, key=lambda m: m.step)])

    single, ddp = losses(one.run_id), losses(two.run_id)
    assert len(single) == len(ddp) == STEPS_PER_EPOCH
    torch.testing.assert_close(ddp, single, rtol=2e-3, atol=1e-4)


# ------------------------------------------------------------------------ failures


def _worker_pids() -> list[int]:
    from ray.util.state import list_actors

    # The limit matters: the state API cuts the actor list before it filters by class, and
    # a long test session leaves hundreds of dead actors.
    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return [a.pid for a in actors if a.pid]


@pytest.mark.extended
def test_a_killed_worker_is_replaced_and_training_continues_from_the_checkpoint(
    ray_cluster: RayTestCluster,
) -> None:
    spec = tiny_spec(
        ray_cluster,
        optim={"epochs": 6},
        failures={"max_failures": 1},
        tracking={"reconstruction_every": 0},
    )
    job_id = "kill-a-worker"
    outcome: dict[str, Any] = {}
    # Workers of an earlier test may still be shutting down: they are not this job's.
    earlier = set(_worker_pids())

    def run() -> None:
        try:
            outcome["result"] = run_pretrain(spec, job_id=job_id, settings=ray_cluster.settings)
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    # After the first checkpoint (end of epoch 1, step 4), kill one worker process.
    wait_for(
        lambda: (
            checkpoint_registered(ray_cluster, job_id)
            and latest_step(ray_cluster, job_id) >= STEPS_PER_EPOCH + 2
        ),
        timeout=240,
    )
    pids = sorted(set(_worker_pids()) - earlier)
    assert len(pids) == 2, (pids, earlier)
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.status == "FINISHED" and result.steps == 6 * STEPS_PER_EPOCH

    steps = step_history(ray_cluster, result.run_id)
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) == 1, steps  # exactly one recovery
    resumed_at = steps[restarts[0]]
    # Resumed after a checkpointed epoch, not from step 1.
    assert resumed_at > 1 and (resumed_at - 1) % STEPS_PER_EPOCH == 0, steps
    assert steps[-1] == 6 * STEPS_PER_EPOCH
    assert client(ray_cluster).get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.extended
def test_a_job_stopped_with_sigterm_is_killed_and_resumes_under_the_same_id(
    ray_cluster: RayTestCluster, tmp_path: Path
) -> None:
    spec = tiny_spec(ray_cluster, optim={"epochs": 5}, tracking={"reconstruction_every": 0})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    job_id = "stop-and-resume"
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.pretrain", "--spec", str(spec_file), "--job-id", job_id],
        env=ray_cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                (
                    checkpoint_registered(ray_cluster, job_id)
                    and latest_step(ray_cluster, job_id) >= 2 * STEPS_PER_EPOCH + 1
                )
                or process.poll() is not None
            ),
            timeout=240,
        )
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    run = find_run(ray_cluster, job_id)
    assert run is not None and run.info.status == "KILLED"
    run_id = run.info.run_id
    stopped_at = step_history(ray_cluster, run_id)[-1]

    result = run_pretrain(spec, job_id=job_id, settings=ray_cluster.settings)
    assert result.status == "FINISHED" and result.run_id == run_id  # same MLflow run
    steps = step_history(ray_cluster, run_id)
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_at = steps[restart]
    assert 1 < resumed_at <= stopped_at and (resumed_at - 1) % STEPS_PER_EPOCH == 0, steps
    assert steps[-1] == 5 * STEPS_PER_EPOCH
    assert client(ray_cluster).get_run(run_id).info.status == "FINISHED"


def test_a_failing_job_ends_failed_in_mlflow(ray_cluster: RayTestCluster) -> None:
    folder = ray_cluster.settings.allowed_data_roots[0] / "unreadable"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            (folder / label / f"img{i}.png").write_bytes(b"not a png")
    spec = tiny_spec(
        ray_cluster,
        data={"train": {"kind": "image_folder", "path": str(folder)}},
        optim={"global_batch_size": 4},
    )
    with pytest.raises(Exception, match="could be read"):
        run_pretrain(spec, job_id="bad-images", settings=ray_cluster.settings)
    run = find_run(ray_cluster, "bad-images")
    assert run is not None and run.info.status == "FAILED"


# ---------------------------------------------------------------------------- clusters


def _actor_classes() -> set[str]:
    """The class of every actor the cluster has seen."""
    from ray.util.state import list_actors

    return {a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False)}


def _train_workers() -> dict[str, str]:
    """Actor id -> node id of every Ray Train worker the cluster has seen."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.actor_id: a.node_id for a in actors}


@pytest.mark.extended  # a second Ray node: a cluster rehearsal
def test_workers_spread_over_two_nodes(ray_cluster: RayTestCluster) -> None:
    node = ray_cluster.cluster.add_node(num_cpus=2, object_store_memory=128 * 1024 * 1024)
    ray_cluster.cluster.wait_for_nodes()
    try:
        before = _train_workers()
        spec = tiny_spec(
            ray_cluster,
            optim={"epochs": 1},
            resources={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
            tracking={"reconstruction_every": 0},
        )
        result = run_pretrain(spec, job_id="two-nodes", settings=ray_cluster.settings)
        assert result.status == "FINISHED" and result.steps == STEPS_PER_EPOCH
        new = {k: v for k, v in _train_workers().items() if k not in before}
        assert len(new) == 2, new
        assert set(new.values()) == {ray_cluster.cluster.head_node.node_id, node.node_id}
    finally:
        ray_cluster.cluster.remove_node(node)


# ------------------------------------------------------------------------ mlflow server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` (one worker) on SQLite, serving artifacts itself."""
    import urllib.request

    from conftest import free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115 - closed with the process
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return process.poll() is not None  # stop waiting if it died

    try:
        wait_for(healthy, timeout=180, interval=1.0)
        assert process.poll() is None, (root / "server.log").read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.extended  # an MLflow server process besides the cluster: 55 s
def test_a_job_tracked_on_an_mlflow_server(
    ray_cluster: RayTestCluster, mlflow_server: str, tmp_path: Path
) -> None:
    settings = ray_cluster.settings.model_copy(update={"mlflow_tracking_uri": mlflow_server})
    spec = tiny_spec(
        ray_cluster,
        optim={"epochs": 1},
        resources={"num_workers": 1},
        tracking={"reconstruction_every": 1, "reconstruction_images": 2},
    )
    result = run_pretrain(spec, job_id="server-tracked", settings=settings)
    server = MlflowClient(mlflow_server)
    run = server.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["job_id"] == "server-tracked"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(server.get_metric_history(result.run_id, "train/loss")) == STEPS_PER_EPOCH
    local = server.download_artifacts(result.run_id, result.encoder_artifact, str(tmp_path))
    state = load_file(local)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
