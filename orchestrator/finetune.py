"""One fine-tuning job: the paper's downstream protocol on Ray Train, tracked in one MLflow run.

:func:`run_finetune` resolves where the weights come from (a pre-training job or MLflow run
of this service, a file under the data roots, or none), checks that they fit the classifier
before anything starts, opens (or reopens) the job's MLflow run, fits a Ray Train trainer
named after the job id whose workers run :class:`spark_core.finetune_engine.FinetuneEngine`
(rank 0 logs the training metrics and the machine's system metrics), then logs the best and
last weights, the whole last checkpoint and the fine-tuned classifier as an MLflow model
(loadable with ``mlflow.pytorch.load_model``), and links the run and its source pre-training
run both ways. The run's datasets are the training and validation images.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.cluster import ray_session
from orchestrator.datasets import finetune_datasets
from orchestrator.lifecycle import check_job_id, new_job_id
from orchestrator.pretrain import JobResult, fit_interruptibly
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import JOB_ID_TAG, FinetuneSpec, ship, unship
from orchestrator.startup import StartupClock, alongside
from orchestrator.tracking import (
    GLOBAL_BATCH_TAG,
    TOTAL_STEPS_TAG,
    DataSplit,
    MetricsLogger,
    RunRef,
    client_for,
    dataset_input,
    log_datasets,
    log_file,
    log_metrics,
    log_model_once,
    open_job_run,
    run_ended_by_outcome,
    set_tags,
    system_metrics,
    worker_tags,
)
from orchestrator.training import (
    RayReporter,
    build_trainer,
    resume_from_checkpoint,
    threads_per_worker,
    time_first_step,
    worker_clock,
    worker_device,
)

logger = logging.getLogger(__name__)

FINETUNE_CHECKPOINT_FILE = "finetune.pt"
SOURCE_RUN_TAG = "sparkorch.source_run_id"
SOURCE_TAG = "sparkorch.source"
# On the source pre-training run: one tag per fine-tune, the value its run id.
FINETUNE_TAG_PREFIX = "sparkorch.finetune."
MODEL_NAME = "classifier"
MODEL_URI_TAG = "sparkorch.model_uri"
WEIGHTS_ARTIFACT_DIR = "weights"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"


@dataclass
class FinetuneResult(JobResult):
    source: str = ""
    model_uri: str | None = None


# ------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a job's weights are, as plain data every worker can read them from: an MLflow
    run's encoder artifact, a file under the data roots, or nothing (from scratch)."""

    kind: str  # "mlflow_run" | "file" | "none"
    ref: str = ""
    tracking_uri: str = ""

    def describe(self) -> str:
        return {"mlflow_run": f"MLflow run {self.ref}", "file": self.ref}.get(
            self.kind, "none (from scratch)"
        )

    def read(self) -> dict[str, torch.Tensor] | None:
        """The state dict (never unpickling objects), or None for from scratch."""
        from spark_core.weights import read_weights_file

        if self.kind == "none":
            return None
        if self.kind == "file":
            return read_weights_file(self.ref)
        from orchestrator.tracking import export_encoder_artifact
        from spark_core.weights import WeightsError

        with tempfile.TemporaryDirectory(prefix="sparkorch-weights-") as folder:
            try:
                path = export_encoder_artifact(self.tracking_uri, self.ref, Path(folder))
            except FileNotFoundError as error:
                raise WeightsError(f"weights: {error}") from None
            return read_weights_file(path)


def find_job_run_id(tracking_uri: str, job_id: str) -> str:
    """The MLflow run of a job of this service (searched in every experiment by its tag)."""
    client = client_for(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, filter_string=f"tags.{JOB_ID_TAG} = '{job_id}'", max_results=2
    )
    if not runs:
        raise ValueError(
            f"weights.job_id: no MLflow run of job {job_id!r} (was it a pre-training job of "
            "this service, and has it started?)"
        )
    return runs[0].info.run_id


def resolve_weights(spec: FinetuneSpec, settings: OrchestratorSettings) -> ResolvedWeights:
    source = spec.weights
    if source.kind == "pretrain_job":
        run_id = find_job_run_id(settings.tracking_uri, source.job_id)
        return ResolvedWeights("mlflow_run", run_id, settings.tracking_uri)
    if source.kind == "mlflow_run":
        return ResolvedWeights("mlflow_run", source.run_id, settings.tracking_uri)
    if source.kind == "file":
        return ResolvedWeights("file", source.path)
    return ResolvedWeights("none")


def build_classifier(spec: FinetuneSpec, num_classes: int, drop_path: float) -> torch.nn.Module:
    """``timm.create_model(backbone, num_classes, drop_path_rate)``, seeded by the spec."""
    import timm

    torch.manual_seed(spec.seed)
    return timm.create_model(
        spec.model.backbone, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path
    )


def check_weights(spec: FinetuneSpec, weights: ResolvedWeights) -> Any:
    """Load the weights into the classifier once on the driver, before any worker starts:
    a wrong file fails the job at once, naming the keys (see ``spark_core.weights``)."""
    from spark_core.weights import load_source_weights

    model = build_classifier(spec, num_classes=2, drop_path=0.0)
    return load_source_weights(model, weights.read(), source=weights.describe())


# ------------------------------------------------------------------------------ workers


@dataclass(frozen=True)
class FinetuneWorkerConfig:
    """Everything a worker needs, as plain data (Ray pickles it to every worker)."""

    spec: dict[str, Any]
    job_id: str
    run: dict[str, str]
    dataset_cache: str
    weights: dict[str, str]
    startup: dict[str, Any] | None = None  # the driver's StartupClock.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune_report(engine: Any, m: Any) -> dict[str, Any]:
    """What a fine-tuning worker reports to Ray Train at an epoch's end."""
    return {
        "epoch": m.epoch + 1,
        "step": m.step,
        "loss": m.loss,
        "finetune_top1": engine.summary.finetune_top1,
    }


class EvalLogger:
    """Rank 0: each epoch's training accuracy and lr, and the evaluation when there is one
    (``val/top1``, ``val/top5``, ``val/ema_top1``, ``val/ema_top5``, ``val/best_top1``), at
    step = the 0-based epoch, as ``epoch/loss``."""

    def __init__(self, ref: RunRef) -> None:
        self.ref = ref

    def on_step(self, metrics: Any) -> None:
        return None

    def on_epoch_end(self, engine: Any, m: Any) -> None:
        values = {"epoch/train_top1": m.train_top1, "epoch/lr": m.lr}
        if m.eval is not None:
            values.update({f"val/{k}": v for k, v in asdict(m.eval).items()})
            values["val/best_top1"] = engine.summary.finetune_top1
        log_metrics(self.ref, values, step=m.epoch)


def finetune_worker(config: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of a fine-tuning job's trainer."""
    import ray.train

    from spark_core.finetune_engine import FinetuneEngine
    from spark_core.weights import load_source_weights

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    worker = FinetuneWorkerConfig(**config)
    spec: FinetuneSpec = unship(worker.spec)
    rank = ray.train.get_context().get_world_rank()
    clock = worker_clock(worker.startup, rank)
    threads_per_worker(spec.resources.cpus_per_worker)
    train, val, classes = finetune_datasets(spec, Path(worker.dataset_cache))
    recipe, _ = spec.effective_recipe()
    model = build_classifier(spec, len(classes), recipe.drop_path)
    weights = ResolvedWeights(**worker.weights)
    load_source_weights(model, weights.read(), source=weights.describe())
    ref = RunRef(**worker.run)
    with ExitStack() as rank0:
        callbacks: list[Any] = []
        if rank == 0:
            metrics_logger = MetricsLogger(ref, log_every=spec.runtime.log_every)
            callbacks += [rank0.enter_context(metrics_logger), EvalLogger(ref)]
            rank0.enter_context(system_metrics(ref))
        callbacks.append(
            RayReporter(
                rank,
                spec.checkpoint.every_epochs,
                recipe.epochs,
                checkpoint_file=FINETUNE_CHECKPOINT_FILE,
                report=finetune_report,
            )
        )
        engine = FinetuneEngine(model, _engine_config(spec, len(classes)), callbacks=callbacks)
        if rank == 0:
            steps = engine.steps_per_epoch(train) * recipe.epochs
            tags = {TOTAL_STEPS_TAG: str(steps), GLOBAL_BATCH_TAG: str(engine.global_batch)}
            set_tags(ref, {**tags, **worker_tags()})
        resume_from_checkpoint(engine, ref, rank, FINETUNE_CHECKPOINT_FILE)
        time_first_step(engine, clock, ref)
        engine.fit(train, val)


def _engine_config(spec: FinetuneSpec, num_classes: int) -> Any:
    """The engine's configuration: the effective recipe and the spec's runtime."""
    from spark_core.finetune_engine import FinetuneConfig

    recipe, _ = spec.effective_recipe()
    return FinetuneConfig(
        backbone=spec.model.backbone,
        num_classes=num_classes,
        recipe=recipe,
        precision=spec.runtime.precision,
        channels_last=spec.runtime.channels_last,
        compile=spec.runtime.compile,
        seed=spec.seed,
        log_every=spec.runtime.log_every,
        loader_workers=spec.data.loader_workers,
        device=str(worker_device(spec.resources.gpus_per_worker > 0)),
    )


# ------------------------------------------------------------------------------- driver


def _best_classifier(spec: FinetuneSpec, state: dict[str, Any]) -> torch.nn.Module:
    """The classifier with the checkpoint's best weights (its last when none was best)."""
    model = build_classifier(spec, state["config"]["num_classes"], 0.0)
    model.load_state_dict(state["best"] or state["model"])
    return model


def _log_results(ref: RunRef, spec: FinetuneSpec, checkpoint: Any) -> tuple[dict, str]:
    """Log the last checkpoint, the best weights and the MLflow model (see
    :func:`~orchestrator.tracking.log_model_once`); returns (state, model URI). A job run
    again after it finished logs no second model (nor model version)."""
    from spark_core.checkpoint import save_weights
    from spark_core.finetune_engine import read_finetune_checkpoint

    with checkpoint.as_directory() as folder:
        path = Path(folder) / FINETUNE_CHECKPOINT_FILE
        state = read_finetune_checkpoint(path)
        log_file(ref, path, CHECKPOINT_ARTIFACT_DIR)
    summary = state["extra"]["summary"]
    with tempfile.TemporaryDirectory(prefix="sparkorch-finetuned-") as folder:
        for name, weights in (("best", state["best"]), ("last", state["model"])):
            if weights is None:
                continue
            file = Path(folder) / f"{spec.model.backbone}-finetuned-{name}.safetensors"
            metadata = {"backbone": spec.model.backbone, "source": summary["best_source"]}
            save_weights(weights, file, metadata)
            log_file(ref, file, WEIGHTS_ARTIFACT_DIR)
    model_uri = log_model_once(
        ref,
        lambda: _best_classifier(spec, state),
        name=MODEL_NAME,
        input_size=spec.model.input_size,
        uri_tag=MODEL_URI_TAG,
        registered_model_name=spec.name if spec.tracking.register_model else None,
    )
    return state, model_uri


def _log_data_inputs(spec: FinetuneSpec, ref: RunRef) -> None:
    """The run's datasets: "training" and "validation" (``data.val``, or the held-out
    ``data.val_fraction`` of ``data.train``, split by ``data.split_seed``)."""
    data = spec.data
    if data.val is not None:
        inputs = [dataset_input(data.train, "training"), dataset_input(data.val, "validation")]
    else:
        train, val = (DataSplit(p, data.val_fraction, data.split_seed) for p in ("train", "val"))
        inputs = [
            dataset_input(data.train, "training", train),
            dataset_input(data.train, "validation", val),
        ]
    log_datasets(ref, inputs)


def _link_source(ref: RunRef, weights: ResolvedWeights) -> None:
    """Tag the fine-tune with its source run, and the source with this fine-tune."""
    tags = {SOURCE_TAG: weights.describe()}
    if weights.kind == "mlflow_run":
        tags[SOURCE_RUN_TAG] = weights.ref
        client_for(ref.tracking_uri).set_tag(weights.ref, FINETUNE_TAG_PREFIX + ref.run_id, "1")
    set_tags(ref, tags)


def _fit_and_finish(
    spec: FinetuneSpec,
    job_id: str,
    ref: RunRef,
    settings: OrchestratorSettings,
    weights: ResolvedWeights,
    startup: StartupClock | None = None,
) -> FinetuneResult:
    start = time.perf_counter()
    if startup is not None:
        startup.mark("fit_called")
    worker = FinetuneWorkerConfig(
        spec=ship(spec, settings.allowed_data_roots),
        job_id=job_id,
        run={"tracking_uri": ref.tracking_uri, "experiment_id": ref.experiment_id,
             "run_id": ref.run_id},
        dataset_cache=str(settings.dataset_cache),
        weights=asdict(weights),
        startup=startup.to_dict() if startup is not None else None,
    )  # fmt: skip
    trainer = build_trainer(
        finetune_worker, worker.to_dict(), spec, job_id=job_id, settings=settings
    )
    result = fit_interruptibly(trainer)
    if result.checkpoint is None:
        raise RuntimeError("the fine-tuning ended without a checkpoint")
    state, model_uri = _log_results(ref, spec, result.checkpoint)
    extra = state["extra"]
    summary = extra["summary"]
    metrics = {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for moment in ("initial", "last"):
        metrics.update({f"{moment}_{k}": v for k, v in (summary.get(moment) or {}).items()})
    epochs = int(extra["epoch"])
    log_metrics(ref, {f"final/{k}": v for k, v in metrics.items()}, step=epochs)
    set_tags(ref, {"sparkorch.best_source": summary["best_source"]})
    return FinetuneResult(
        job_id=job_id,
        run_id=ref.run_id,
        experiment_id=ref.experiment_id,
        tracking_uri=ref.tracking_uri,
        status="FINISHED",
        metrics=metrics,
        epochs=epochs,
        steps=int(extra["global_step"]),
        wall_time_s=time.perf_counter() - start,
        source=weights.describe(),
        model_uri=model_uri,
    )


def run_finetune(
    spec: FinetuneSpec,
    *,
    job_id: str | None = None,
    settings: OrchestratorSettings | None = None,
    on_run_open: Any = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    startup: StartupClock | None = None,
) -> FinetuneResult:
    """Run (or resume) one fine-tuning job to the end; see the module docstring.

    ``startup``: the driver's clock; rank 0 logs its ``startup/*`` metrics after the first
    step (see :mod:`orchestrator.startup`).

    Raises:
        ValueError: the weights cannot be found or do not fit the classifier (before any
            run is opened).
        JobCancelled / KeyboardInterrupt / SystemExit: the run is ended KILLED, then the
            error re-raised; anything else ends it FAILED.
    """
    settings = settings or OrchestratorSettings()
    job_id = check_job_id(job_id or new_job_id())
    weights = resolve_weights(spec, settings)
    report = check_weights(spec, weights)
    ref, reopened = open_job_run(
        spec, job_id, settings, parent_run_id=parent_run_id, extra_tags=extra_tags
    )
    if reopened:
        logger.info("job %s ran before: resuming MLflow run %s", job_id, ref.run_id)
    else:
        _link_source(ref, weights)
        set_tags(ref, {"sparkorch.kind": "finetune", "sparkorch.weights_layout": report.layout})
    if startup is not None:
        startup.mark("run_opened")
    if on_run_open is not None:
        on_run_open(job_id, ref)
    with run_ended_by_outcome(ref):
        datasets = alongside(lambda: _log_data_inputs(spec, ref), "log the datasets")
        with datasets, ray_session(settings):
            return _fit_and_finish(spec, job_id, ref, settings, weights, startup)
