"""MLflow records of pre-training jobs: one run per job, tagged with its job id.

The driver owns the run's life (creates or reopens it, logs the spec, the final artifacts and
the evaluation, and ends it FINISHED, FAILED or KILLED); rank 0 of the Ray Train workers logs
the training metrics and reconstruction pictures into it through :class:`MetricsLogger`.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import JOB_ID_TAG, PretrainSpec, is_reserved_tag

logger = logging.getLogger(__name__)

TOTAL_STEPS_TAG = "sparkorch.total_steps"
# One point per checkpoint restore (value = the global step it resumed at).
RESUMED_AT_STEP = "train/resumed_at_step"
GLOBAL_BATCH_TAG = "sparkorch.global_batch_size"
# Set on a run stopped from outside (a sweep's scheduler) just before it is ended KILLED.
STOPPED_TAG = "sparkorch.stopped"
ACTIVE_STATUSES = frozenset({"RUNNING", "SCHEDULED"})
_BATCH_LIMIT = 100  # MLflow's log_batch accepts at most 100 params / 1000 metrics per call


@dataclass(frozen=True)
class RunRef:
    tracking_uri: str
    experiment_id: str
    run_id: str


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:") or "://" not in tracking_uri


def ensure_experiment(client: MlflowClient, name: str, settings: OrchestratorSettings) -> str:
    """The id of experiment ``name``, created when missing.

    On the embedded SQLite store its artifacts go under ``$SPARKORCH_HOME/mlartifacts``
    (MLflow would otherwise use ``./mlruns`` of whatever folder the process started in); a
    tracking server decides for itself.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if _is_local_store(settings.tracking_uri):
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        location = (settings.artifact_root / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another job: use it
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_job_run(client: MlflowClient, experiment_id: str, job_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{JOB_ID_TAG} = '{job_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def git_commit() -> str | None:
    """The source tree's commit, when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_tags(spec: PretrainSpec) -> dict[str, str]:
    import mlflow
    import ray
    import timm
    import torch

    resources = spec.resources
    device = "cuda" if resources.gpus_per_worker > 0 else "cpu"
    tags = {
        "sparkorch.version.torch": torch.__version__,
        "sparkorch.version.timm": timm.__version__,
        "sparkorch.version.ray": ray.__version__,
        "sparkorch.version.mlflow": mlflow.__version__,
        "sparkorch.version.python": platform.python_version(),
        "sparkorch.device": device,
        "sparkorch.num_workers": str(resources.num_workers),
        "sparkorch.host": platform.node(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def open_run(
    settings: OrchestratorSettings,
    *,
    job_id: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, str],
    document: dict[str, Any],
    document_name: str = "spec",
) -> tuple[RunRef, bool]:
    """Create the run of ``job_id``, or reopen it when the job ran before.

    Returns ``(run, reopened)``. A new run gets ``tags``, ``params`` and the document as
    ``<document_name>/<document_name>.yaml`` and ``.json`` artifacts.
    """
    client = client_for(settings.tracking_uri)
    experiment_id = ensure_experiment(client, experiment, settings)
    run_id = find_job_run(client, experiment_id, job_id)
    if run_id is not None:
        if STOPPED_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, STOPPED_TAG)  # runs again: no longer stopped
        client.update_run(run_id, status="RUNNING")
        return RunRef(settings.tracking_uri, experiment_id, run_id), True
    # The service's own tags last, so that no caller's tag (a spec's) replaces the job id the
    # resume lookup above searches by, or the run name (MLflow refuses a differing one).
    own = {JOB_ID_TAG: job_id, MLFLOW_RUN_NAME: run_name}
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **own})
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), _BATCH_LIMIT):
        client.log_batch(run_id, params=items[start : start + _BATCH_LIMIT])
    text = yaml.safe_dump(document, sort_keys=False)
    client.log_text(run_id, text, f"{document_name}/{document_name}.yaml")
    client.log_dict(run_id, document, f"{document_name}/{document_name}.json")
    return RunRef(settings.tracking_uri, experiment_id, run_id), False


def open_job_run(
    spec: PretrainSpec,
    job_id: str,
    settings: OrchestratorSettings,
    *,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> tuple[RunRef, bool]:
    """The MLflow run of a pre-training job (nested under ``parent_run_id`` in a sweep)."""
    tags = {**_spec_tags(spec), **environment_tags(spec), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return open_run(
        settings,
        job_id=job_id,
        experiment=spec.tracking.experiment or settings.mlflow_experiment,
        run_name=spec.name,
        tags=tags,
        params=spec.flat_params(),
        document=spec.model_dump(mode="json"),
    )


def _spec_tags(spec: PretrainSpec) -> dict[str, str]:
    """The spec's tags less the keys the service writes itself.

    Putting the service's tags last is not enough: some it sets only at times (a parent run
    id in a sweep, the stop mark, the step counts at training start), and a spec's tag of
    such a name would stand in for it meanwhile. Validation refuses these keys; this keeps
    a spec that skipped it from redirecting the run.
    """
    reserved = [k for k in spec.tags if is_reserved_tag(k)]
    if reserved:
        logger.warning("spec %s: dropped reserved tag keys %s", spec.name, sorted(reserved))
    return {k: v for k, v in spec.tags.items() if k not in reserved}


def end_run(ref: RunRef, status: str) -> None:
    """End the run as FINISHED, FAILED or KILLED (never left RUNNING).

    A run someone else already ended KILLED (a sweep whose scheduler stopped the trial, a
    cancel) is not turned FAILED: that failure is the stop's echo, e.g. a stopped trial's
    driver winding down after its sweep has marked it. The two run in different processes,
    so the check alone can race with the stop (checked, then stopped, then written FAILED);
    :func:`mark_stopped` tags the run before ending it, and a FAILED written after that
    tag is put back to KILLED here. Every interleaving thus ends KILLED.
    """
    RunStatus.from_string(status)  # rejects unknown names
    client = client_for(ref.tracking_uri)
    if status == "FAILED" and client.get_run(ref.run_id).info.status == "KILLED":
        logger.info("MLflow run %s was already ended KILLED: left so, not FAILED", ref.run_id)
        return
    client.set_terminated(ref.run_id, status=status)
    if status == "FAILED" and STOPPED_TAG in client.get_run(ref.run_id).data.tags:
        logger.info("MLflow run %s was stopped meanwhile: ended KILLED, not FAILED", ref.run_id)
        client.set_terminated(ref.run_id, status="KILLED")


def mark_stopped(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run KILLED from outside its job (e.g. the trial a scheduler stopped); see
    :func:`end_run` for why the tag goes first."""
    client.set_tag(run_id, STOPPED_TAG, reason)
    client.set_terminated(run_id, status="KILLED")


def log_metrics(ref: RunRef, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client_for(ref.tracking_uri).log_batch(ref.run_id, metrics=batch)


def set_tags(ref: RunRef, tags: Mapping[str, str]) -> None:
    client_for(ref.tracking_uri).log_batch(
        ref.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]
    )


def log_file(ref: RunRef, path: str | Path, artifact_path: str | None = None) -> None:
    client_for(ref.tracking_uri).log_artifact(ref.run_id, str(path), artifact_path)


class MetricsLogger:
    """An engine callback for rank 0: step and epoch metrics, and reconstruction pictures.

    Step metrics arrive in windows of ``log_every`` steps and go out in one ``log_batch``.
    Names: ``train/loss``, ``train/lr``, ``train/weight_decay``, ``train/grad_norm``,
    ``train/images_per_sec``, ``train/epoch`` (fractional), ``train/step`` (step = global
    step); ``epoch/loss``, ``epoch/time_s``, ``epoch/images_per_sec`` (step = epoch).
    """

    def __init__(
        self,
        ref: RunRef,
        *,
        log_every: int,
        reconstruction: ReconstructionPreview | None = None,
    ) -> None:
        self.client = client_for(ref.tracking_uri)
        self.run_id = ref.run_id
        self.log_every = log_every
        self.reconstruction = reconstruction
        self._pending: list[Metric] = []

    def on_step(self, m: Any) -> None:
        now = int(time.time() * 1000)
        values = {
            "train/loss": m.loss,
            "train/lr": m.lr,
            "train/weight_decay": m.weight_decay,
            "train/grad_norm": m.grad_norm,
            "train/images_per_sec": m.images_per_sec,
            "train/epoch": m.epoch + m.epoch_progress,
            "train/step": m.step + 1,
        }
        self._pending.extend(Metric(k, float(v), now, m.step) for k, v in values.items())
        if len(self._pending) >= self.log_every * len(values) or m.epoch_progress >= 1.0:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []

    def on_epoch_end(self, engine: Any, m: Any) -> None:
        self.flush()
        now = int(time.time() * 1000)
        values = {
            "epoch/loss": m.loss,
            "epoch/time_s": m.epoch_time,
            "epoch/images_per_sec": m.images_per_sec,
        }
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, m.epoch) for k, v in values.items()]
        )
        if self.reconstruction is not None and self.reconstruction.due(m.epoch):
            image = self.reconstruction.render(engine.model)
            self.client.log_image(self.run_id, image, key="reconstruction", step=m.epoch)


class ReconstructionPreview:
    """Fixed images and masks, drawn as input | masked | reconstruction every N epochs."""

    def __init__(self, images: Any, every: int, seed: int) -> None:
        import torch

        self.images = images
        self.every = every
        self.generator_seed = seed
        self._torch = torch

    def due(self, epoch: int) -> bool:
        """Whether to draw after 0-based ``epoch`` (every ``every`` epochs, counting from 1)."""
        return self.every > 0 and (epoch + 1) % self.every == 0

    def render(self, model: Any) -> Any:
        from spark_core.viz import reconstruction_grid

        device = next(model.parameters()).device
        images = self.images.to(device)
        generator = self._torch.Generator(device=device).manual_seed(self.generator_seed)
        active = model.generate_mask(images.shape[0], generator=generator, device=device)
        inputs, masked, recon = model.reconstruct(images, active)
        return reconstruction_grid(inputs.cpu(), masked.cpu(), recon.cpu(), active=active.cpu())


def export_encoder_artifact(tracking_uri: str, run_id: str, out: Path) -> Path:
    """Copy the run's ``encoder/*.safetensors`` to ``out`` (a file, or an existing folder)."""
    import shutil

    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        files = [a.path for a in client.list_artifacts(run_id, "encoder")]
    except MlflowException as error:
        raise ValueError(f"run {run_id!r}: {error.message}") from None
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        raise FileNotFoundError(
            f"run {run_id!r} has no encoder weights (it did not finish, or is not a "
            "pre-training run)"
        )
    target = out / Path(weights[0]).name if out.is_dir() else out
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparkorch-export-") as folder:
        local = client.download_artifacts(run_id, weights[0], folder)
        shutil.move(local, target)
    return target


def find_children(ref: RunRef) -> list[Any]:
    """The runs nested under ``ref`` (a sweep's trials)."""
    client = client_for(ref.tracking_uri)
    return client.search_runs(
        [ref.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{ref.run_id}'",
        max_results=5000,
    )
