"""The driver of one pre-training job: a ``TorchTrainer`` on Ray, tracked in one MLflow run.

:func:`run_pretrain` opens (or, for a job id seen before, reopens) the job's MLflow run,
fits a Ray Train V2 ``TorchTrainer`` named after the job id (so running the same id again
resumes from its latest checkpoint), evaluates the final encoder as a Ray task, logs the
encoder weights, the full checkpoint and the evaluation, and ends the MLflow run FINISHED,
FAILED or KILLED (on :class:`JobCancelled` / ``KeyboardInterrupt``).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cluster import ray_session
from orchestrator.evaluation import final_model, run_evaluation
from orchestrator.lifecycle import JobCancelled, check_job_id, new_job_id
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import PretrainSpec, ship
from orchestrator.tracking import RunRef, end_run, log_file, log_metrics, open_job_run
from orchestrator.training import CHECKPOINT_FILE, WorkerConfig, build_trainer, train_worker
from spark_core.checkpoint import export_encoder

logger = logging.getLogger(__name__)

ENCODER_ARTIFACT_DIR = "encoder"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"


@dataclass
class JobResult:
    """What a training job (pre-training, fine-tuning) ended with, and where it is tracked."""

    job_id: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    steps: int = 0
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PretrainResult(JobResult):
    encoder_artifact: str | None = None
    checkpoint_path: str | None = None


def _trainer(
    spec: PretrainSpec,
    job_id: str,
    ref: RunRef,
    settings: OrchestratorSettings,
    callbacks: Sequence[Any] = (),
):
    worker = WorkerConfig(
        spec=ship(spec, settings.allowed_data_roots),
        job_id=job_id,
        run={
            "tracking_uri": ref.tracking_uri,
            "experiment_id": ref.experiment_id,
            "run_id": ref.run_id,
        },
        dataset_cache=str(settings.dataset_cache),
    )
    return build_trainer(
        train_worker, worker.to_dict(), spec, job_id=job_id, settings=settings, callbacks=callbacks
    )


def _log_final_artifacts(
    spec: PretrainSpec, ref: RunRef, checkpoint: Any | None
) -> tuple[str, dict[str, Any]]:
    """Log the encoder (timm layout) and the full checkpoint; returns (encoder path, state)."""
    model = final_model(spec, checkpoint)
    state: dict[str, Any] = {}
    encoder_name = f"{spec.model.backbone}-spark-encoder.safetensors"
    with tempfile.TemporaryDirectory(prefix="sparkorch-final-") as folder:
        encoder = export_encoder(model, Path(folder) / encoder_name)
        log_file(ref, encoder, ENCODER_ARTIFACT_DIR)
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                log_file(ref, Path(ckpt_dir) / CHECKPOINT_FILE, CHECKPOINT_ARTIFACT_DIR)
            from spark_core.checkpoint import read_checkpoint

            with checkpoint.as_directory() as ckpt_dir:
                state = read_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE).get("extra", {})
    return f"{ENCODER_ARTIFACT_DIR}/{encoder_name}", state


def _register_encoder(spec: PretrainSpec, ref: RunRef, artifact: str) -> None:
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking import client_for

    client = client_for(ref.tracking_uri)
    with suppress(MlflowException):  # already registered: add a version
        client.create_registered_model(spec.name)
    source = f"{client.get_run(ref.run_id).info.artifact_uri}/{artifact}"
    client.create_model_version(spec.name, source=source, run_id=ref.run_id)


def fit_interruptibly(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread while the main thread waits in Python.

    A signal handler that raises (SIGTERM -> :class:`JobCancelled`) then interrupts a plain
    ``join`` instead of Ray's blocking C call, where the exception would be mangled.
    Leaving ``ray_session`` afterwards disconnects the driver, which stops the run's actors.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the main thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _fit_and_finish(
    spec: PretrainSpec,
    job_id: str,
    ref: RunRef,
    settings: OrchestratorSettings,
    trainer_callbacks: Sequence[Any] = (),
) -> PretrainResult:
    start = time.perf_counter()
    result = fit_interruptibly(_trainer(spec, job_id, ref, settings, trainer_callbacks))
    checkpoint = result.checkpoint
    encoder, state = _log_final_artifacts(spec, ref, checkpoint)
    roots = [str(p) for p in settings.allowed_data_roots]
    metrics = {
        f"eval/{k}": v
        for k, v in run_evaluation(spec, roots, str(settings.dataset_cache), checkpoint).items()
    }
    epochs = int(state.get("epoch", 0))
    final = {**metrics, "final/epochs": epochs}
    if state.get("last_epoch_loss") is not None:
        final["final/loss"] = float(state["last_epoch_loss"])
    log_metrics(ref, final, step=epochs)
    if spec.tracking.register_model:
        _register_encoder(spec, ref, encoder)
    return PretrainResult(
        job_id=job_id,
        run_id=ref.run_id,
        experiment_id=ref.experiment_id,
        tracking_uri=ref.tracking_uri,
        status="FINISHED",
        metrics=final,
        epochs=epochs,
        steps=int(state.get("global_step", 0)),
        wall_time_s=time.perf_counter() - start,
        encoder_artifact=encoder,
        checkpoint_path=checkpoint.path if checkpoint is not None else None,
    )


def run_pretrain(
    spec: PretrainSpec,
    *,
    job_id: str | None = None,
    settings: OrchestratorSettings | None = None,
    on_run_open: Any = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    trainer_callbacks: Sequence[Any] = (),
) -> PretrainResult:
    """Run (or resume) one pre-training job to the end; see the module docstring.

    Args:
        spec: the validated job.
        job_id: names the Ray Train run and tags the MLflow run; a new UUID when None.
        settings: where to track, store and run (default: from the environment).
        on_run_open: called with ``(job_id, RunRef)`` once the MLflow run exists (the CLI
            uses it to follow progress).
        parent_run_id: nest the MLflow run under this one (a sweep's trial).
        extra_tags: more MLflow tags (a sweep's trial: variant, trial id).
        trainer_callbacks: Ray Train callbacks (a sweep's trial: Tune's report callback).

    Raises:
        JobCancelled / KeyboardInterrupt / SystemExit: the run is ended KILLED, then the
            error re-raised.
        Exception: anything else ends the run FAILED and is re-raised (Ray Train's
            ``TrainingFailedError`` carries the workers' error).
    """
    settings = settings or OrchestratorSettings()
    job_id = check_job_id(job_id or new_job_id())
    ref, reopened = open_job_run(
        spec, job_id, settings, parent_run_id=parent_run_id, extra_tags=extra_tags
    )
    if reopened:
        logger.info("job %s ran before: resuming MLflow run %s", job_id, ref.run_id)
    if on_run_open is not None:
        on_run_open(job_id, ref)
    status = "FAILED"
    try:
        with ray_session(settings):
            result = _fit_and_finish(spec, job_id, ref, settings, trainer_callbacks)
        status = "FINISHED"
        return result
    except (JobCancelled, KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        end_run(ref, status)
