"""The driver of one pre-training job: a data-parallel trainer on Ray, tracked in one MLflow run.

:func:`run_pretrain` opens (or, for a job id seen before, reopens) the job's MLflow run and
logs the datasets it reads, fits a Ray Train V2 trainer
(:func:`~orchestrator.training.build_trainer`) named after the job id (so running the same
id again resumes from its latest checkpoint), evaluates the final encoder as a Ray task,
logs the encoder weights (timm layout), the encoder as an MLflow model (a timm feature
extractor, optionally registered), the full checkpoint and the evaluation, and ends the
MLflow run FINISHED, FAILED or KILLED (on :class:`JobCancelled` / ``KeyboardInterrupt``).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.cluster import ray_session
from orchestrator.lifecycle import check_job_id, new_job_id
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import PretrainSpec, ship
from orchestrator.startup import StartupClock, alongside
from orchestrator.training import WorkerConfig, build_trainer, train_worker

# MLflow (orchestrator.tracking) loads inside the functions that use it: the driver starts
# Ray Train first and opens the MLflow run while the workers start (see run_pretrain).
if TYPE_CHECKING:
    from orchestrator.tracking import RunRef

logger = logging.getLogger(__name__)

ENCODER_ARTIFACT_DIR = "encoder"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"
# The encoder as an MLflow model: runs:/<run id>/encoder_model (a timm network, no classifier).
ENCODER_MODEL_NAME = "encoder_model"
ENCODER_MODEL_URI_TAG = "sparkorch.encoder_model_uri"


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
    model_uri: str | None = None


def _trainer(
    spec: PretrainSpec,
    job_id: str,
    settings: OrchestratorSettings,
    callbacks: Sequence[Any] = (),
    startup: StartupClock | None = None,
):
    """The job's trainer; rank 0 finds the MLflow run, which the driver opens meanwhile, by
    the job id (:func:`~orchestrator.tracking.locate_run`)."""
    if startup is not None:
        startup.mark("fit_called")
    worker = WorkerConfig(
        spec=ship(spec, settings.allowed_data_roots),
        job_id=job_id,
        run={
            "tracking_uri": settings.tracking_uri,
            "experiment": settings.experiment_for(spec),
            "job_id": job_id,
        },
        dataset_cache=str(settings.dataset_cache),
        startup=startup.to_dict() if startup is not None else None,
    )
    return build_trainer(
        train_worker, worker.to_dict(), spec, job_id=job_id, settings=settings, callbacks=callbacks
    )


def _log_final_artifacts(
    spec: PretrainSpec, ref: RunRef, checkpoint: Any | None
) -> tuple[str, str, dict[str, Any]]:
    """Log the encoder (timm layout, and as an MLflow model) and the full checkpoint;
    returns (encoder path, model URI, training state)."""
    from orchestrator.evaluation import final_model
    from orchestrator.tracking import log_file, log_model_once
    from spark_core.checkpoint import CHECKPOINT_FILE, export_encoder, read_checkpoint

    model = final_model(spec, checkpoint)
    state: dict[str, Any] = {}
    encoder_name = f"{spec.model.backbone}-spark-encoder.safetensors"
    with tempfile.TemporaryDirectory(prefix="sparkorch-final-") as folder:
        encoder = export_encoder(model, Path(folder) / encoder_name)
        log_file(ref, encoder, ENCODER_ARTIFACT_DIR)
        if checkpoint is not None:
            # One local copy for both (a checkpoint on remote storage is downloaded each time).
            with checkpoint.as_directory() as ckpt_dir:
                path = Path(ckpt_dir) / CHECKPOINT_FILE
                log_file(ref, path, CHECKPOINT_ARTIFACT_DIR)
                state = read_checkpoint(path).get("extra", {})
    model_uri = log_model_once(
        ref,
        lambda: encoder_network(spec, model),
        name=ENCODER_MODEL_NAME,
        input_size=spec.model.input_size,
        uri_tag=ENCODER_MODEL_URI_TAG,
        registered_model_name=spec.name if spec.tracking.register_model else None,
    )
    return f"{ENCODER_ARTIFACT_DIR}/{encoder_name}", model_uri, state


def encoder_network(spec: PretrainSpec, model: Any) -> Any:
    """The pre-trained encoder as the plain timm network a researcher uses: ``timm``'s
    ``backbone`` without a classifier (``num_classes=0``: images -> pooled features of
    ``num_features`` channels), holding the SparK encoder's weights (every key)."""
    import timm

    from spark_core.checkpoint import encoder_state_dict

    network = timm.create_model(spec.model.backbone, pretrained=False, num_classes=0)
    network.load_state_dict(encoder_state_dict(model), strict=True)
    return network.eval()


def _log_data_inputs(spec: PretrainSpec, ref: RunRef) -> None:
    """The run's datasets: the images pre-training reads ("training": less the evaluation's
    hold-out, if any) and those the evaluation scores on ("evaluation")."""
    from orchestrator.tracking import DataSplit, dataset_input, log_datasets

    data, evaluation = spec.data, spec.evaluation
    evaluates = evaluation.method != "none"
    holdout = evaluates and data.eval is None and data.holdout
    split = {part: DataSplit(part, evaluation.val_fraction, spec.seed) for part in ("train", "val")}
    inputs = [dataset_input(data.train, "training", split["train"] if holdout else None)]
    if evaluates and data.eval is not None:
        inputs.append(dataset_input(data.eval, "evaluation"))
    elif holdout:
        inputs.append(dataset_input(data.train, "evaluation", split["val"]))
    log_datasets(ref, inputs)


class BackgroundFit:
    """``trainer.fit()`` in a helper thread, started at once; :meth:`result` waits in Python.

    A signal handler that raises (SIGTERM -> :class:`JobCancelled`) then interrupts a plain
    ``join`` instead of Ray's blocking C call, where the exception would be mangled.
    Leaving ``ray_session`` afterwards disconnects the driver, which stops the run's actors,
    also of a fit nobody waits for any more.
    """

    def __init__(self, trainer: Any) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._fit, args=(trainer,), name="ray-train-fit", daemon=True
        )
        self._thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            self._outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the waiting thread by result()
            self._outcome["error"] = error

    def result(self) -> Any:
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


def fit_interruptibly(trainer: Any) -> Any:
    """``trainer.fit()``, interruptible by signals (see :class:`BackgroundFit`)."""
    return BackgroundFit(trainer).result()


def _finish(
    spec: PretrainSpec,
    job_id: str,
    ref: RunRef,
    settings: OrchestratorSettings,
    fit: BackgroundFit,
    start: float,
) -> PretrainResult:
    """Wait for training, then log the final artifacts and the evaluation."""
    result = fit.result()
    # The model's code (timm) loads only now: the driver needs it after training, and
    # importing it before would delay the workers' start by seconds.
    from orchestrator.evaluation import run_evaluation
    from orchestrator.tracking import log_metrics

    checkpoint = result.checkpoint
    encoder, model_uri, state = _log_final_artifacts(spec, ref, checkpoint)
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
        model_uri=model_uri,
    )


def run_pretrain(
    spec: PretrainSpec,
    *,
    job_id: str | None = None,
    settings: OrchestratorSettings | None = None,
    on_run_open: Any = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    extra_params: dict[str, str] | None = None,
    trainer_callbacks: Sequence[Any] = (),
    startup: StartupClock | None = None,
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
        extra_params: more MLflow params of a new run (a sweep's trial: its variant).
        trainer_callbacks: Ray Train callbacks (a sweep's trial: Tune's report callback).
        startup: the driver's clock; rank 0 logs its ``startup/*`` metrics after the first
            step (see :mod:`orchestrator.startup`).

    Raises:
        JobCancelled / KeyboardInterrupt / SystemExit: the run is ended KILLED, then the
            error re-raised.
        Exception: anything else ends the run FAILED and is re-raised (Ray Train's
            ``TrainingFailedError`` carries the workers' error).
    """
    settings = settings or OrchestratorSettings()
    job_id = check_job_id(job_id or new_job_id())
    with ray_session(settings):
        # Ray Train first: its controller and workers take seconds to start (processes, and
        # PyTorch imported in each), which this driver spends on opening the MLflow run.
        start = time.perf_counter()
        fit = BackgroundFit(_trainer(spec, job_id, settings, trainer_callbacks, startup))
        from orchestrator.tracking import log_metrics, open_job_run, run_ended_by_outcome

        ref, reopened = open_job_run(
            spec,
            job_id,
            settings,
            parent_run_id=parent_run_id,
            extra_tags=extra_tags,
            extra_params=extra_params,
        )
        if reopened:
            logger.info("job %s ran before: resuming MLflow run %s", job_id, ref.run_id)
        with run_ended_by_outcome(ref):
            if startup is not None:  # rank 0 logs the other marks: its clock left before this
                startup.mark("run_opened")
                log_metrics(ref, startup.metrics(["run_opened"]), step=0)
            if on_run_open is not None:
                on_run_open(job_id, ref)
            with alongside(lambda: _log_data_inputs(spec, ref), "log the datasets"):
                return _finish(spec, job_id, ref, settings, fit, start)
