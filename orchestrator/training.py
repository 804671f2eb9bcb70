"""What each Ray Train worker runs: one DDP rank of :class:`spark_core.engine.PretrainEngine`.

Ray Train has already set up the process group (gloo on CPU, NCCL on GPU); the engine wraps
the model in DDP with synchronised batch-norm statistics and shards the data. At the end of
every epoch every rank calls ``ray.train.report`` (a barrier); rank 0 attaches the whole
training state as a checkpoint every ``checkpoint.every_epochs`` epochs and at the last one.
A restarted worker group, or a job run again under the same id, resumes from the latest
checkpoint that Ray Train holds. Rank 0 alone talks to MLflow: training metrics through a
:class:`~orchestrator.tracking.MetricsLogger` (never waiting on the server inside the step
loop) and the machine's system metrics while it trains; both are delivered and stopped when
the worker's loop ends, also on an error.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import PretrainSpec, unship
from orchestrator.startup import FirstStepMark, StartupClock
from orchestrator.torch_backend import TorchProcessGroup

# PyTorch, MLflow (orchestrator.tracking) and the model load inside the functions that use
# them: the driver imports this module to hand train_worker to Ray Train and must reach
# ``fit`` without them, and only rank 0 talks to MLflow.
if TYPE_CHECKING:
    import torch

    from orchestrator.tracking import MetricsLogger, RunRef
    from spark_core.engine import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, as plain data (Ray pickles it to every worker); ``spec`` is
    the job's spec as :func:`orchestrator.specs.ship` packs it."""

    spec: dict[str, Any]
    job_id: str
    run: dict[str, str]  # where rank 0 finds the MLflow run: see tracking.locate_run
    dataset_cache: str
    startup: dict[str, Any] | None = None  # the driver's StartupClock.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrain_report(engine: Any, m: Any) -> dict[str, Any]:
    """What a pre-training worker reports to Ray Train at an epoch's end."""
    return {
        "epoch": m.epoch + 1,
        "step": m.step,
        "loss": m.loss,
        "epoch_time_s": m.epoch_time,
        "images_per_sec": m.images_per_sec,
    }


class RayReporter:
    """Engine callback: ``ray.train.report`` on every rank at every epoch end (a barrier);
    rank 0 attaches the engine's whole training state, saved as ``checkpoint_file``, every
    ``every`` epochs and at the last one.

    Args:
        report: ``(engine, epoch metrics) -> dict`` of what to report.
    """

    def __init__(
        self,
        rank: int,
        every: int,
        total_epochs: int,
        *,
        checkpoint_file: str,
        report: Callable[[Any, Any], dict[str, Any]] = pretrain_report,
    ) -> None:
        self.rank = rank
        self.every = every
        self.total_epochs = total_epochs
        self.checkpoint_file = checkpoint_file
        self.report = report

    def on_step(self, metrics: Any) -> None:
        return None

    def on_epoch_end(self, engine: Any, m: Any) -> None:
        import ray.train

        metrics = self.report(engine, m)
        due = (m.epoch + 1) % self.every == 0 or m.epoch + 1 == self.total_epochs
        if self.rank == 0 and due:
            with tempfile.TemporaryDirectory(prefix="sparkorch-ckpt-") as folder:
                engine.save(Path(folder) / self.checkpoint_file)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(folder),
                    checkpoint_dir_name=f"epoch-{m.epoch + 1:05d}",
                )
        else:
            ray.train.report(metrics)


def build_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    spec: Any,
    *,
    job_id: str,
    settings: OrchestratorSettings,
    callbacks: Sequence[Any] = (),
) -> Any:
    """The job's data-parallel PyTorch trainer, a :class:`~orchestrator.job_trainer.JobTrainer`
    with the process group of :mod:`orchestrator.torch_backend` (``TorchTrainer``'s parts,
    without PyTorch in this driver or in Ray Train's controller): named after the job id
    (running the id again resumes from its latest checkpoint), sized by ``spec.resources``,
    ``FailureConfig`` from ``spec.failures`` (worker-group restarts resume from the last
    checkpoint), keeping ``spec.checkpoint.keep`` checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from orchestrator.job_trainer import JobTrainer

    resources = spec.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return JobTrainer(
        train_loop,
        train_loop_config=loop_config,
        backend_config=TorchProcessGroup.for_devices(use_gpu),
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=resources.placement_strategy,
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=settings.storage_path,
            failure_config=FailureConfig(max_failures=spec.failures.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )


def worker_device(use_gpu: bool) -> torch.device:
    """This Ray Train worker's device."""
    import torch

    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def threads_per_worker(cpus_per_worker: float) -> None:
    """Each worker reserved ``cpus_per_worker`` CPUs; more intra-op threads would
    oversubscribe."""
    import torch

    threads = max(int(cpus_per_worker), 1)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def train_worker(config: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of the job's trainer."""
    import ray.train
    import torch

    from orchestrator.datasets import pretrain_dataset
    from spark_core import build_spark
    from spark_core.checkpoint import CHECKPOINT_FILE
    from spark_core.engine import PretrainEngine

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines
    worker = WorkerConfig(**config)
    spec: PretrainSpec = unship(worker.spec)
    rank = ray.train.get_context().get_world_rank()
    clock = worker_clock(worker.startup, rank)
    threads_per_worker(spec.resources.cpus_per_worker)
    cache = Path(worker.dataset_cache)
    dataset = pretrain_dataset(spec, cache)
    device = worker_device(spec.derived().use_gpu)

    torch.manual_seed(spec.seed)  # the same initial weights everywhere (DDP also broadcasts)
    model = build_spark(**spec.build_kwargs())
    with ExitStack() as rank0:
        callbacks: list[Any] = []
        ref = None
        if rank == 0:
            from orchestrator.tracking import locate_run, system_metrics

            ref = locate_run(worker.run)
            callbacks.append(rank0.enter_context(_rank0_logger(spec, ref, cache, len(dataset))))
            rank0.enter_context(system_metrics(ref))
        callbacks.append(
            RayReporter(
                rank,
                spec.checkpoint.every_epochs,
                spec.optim.epochs,
                checkpoint_file=CHECKPOINT_FILE,
            )
        )
        engine = PretrainEngine(model, _engine_config(spec, device), callbacks=callbacks)
        resume_from_checkpoint(engine, ref, rank, CHECKPOINT_FILE)
        time_first_step(engine, clock, ref)
        engine.fit(dataset)


def worker_clock(startup: dict[str, Any] | None, rank: int) -> StartupClock | None:
    """Rank 0's copy of the driver's startup clock, marked ``worker_started`` (None on the
    other ranks, or without a clock)."""
    clock = StartupClock.from_dict(startup) if rank == 0 else None
    if clock is not None:
        clock.mark("worker_started")
    return clock


def time_first_step(engine: Any, clock: StartupClock | None, ref: RunRef | None) -> None:
    """Mark ``model_ready`` and log the ``startup/*`` metrics after the first step; only for
    a fresh start (a worker group restored from a checkpoint is not the job's start) on
    rank 0 (the only rank with a clock and a run)."""
    if clock is None or ref is None or engine.global_step > 0:
        return
    from orchestrator.tracking import log_metrics

    clock.mark("model_ready")
    engine.callbacks.append(FirstStepMark(clock, lambda values: log_metrics(ref, values, step=0)))


def _rank0_logger(spec: PretrainSpec, ref: RunRef, cache: Path, images: int) -> MetricsLogger:
    """Rank 0's metrics logger (and the run's step-count tags, read by progress)."""
    from orchestrator.datasets import preview_images, steps_per_epoch
    from orchestrator.tracking import (
        GLOBAL_BATCH_TAG,
        TOTAL_STEPS_TAG,
        MetricsLogger,
        ReconstructionPreview,
        set_tags,
        worker_tags,
    )

    total_steps = steps_per_epoch(images, spec) * spec.optim.epochs
    set_tags(
        ref,
        {
            TOTAL_STEPS_TAG: str(total_steps),
            GLOBAL_BATCH_TAG: str(spec.optim.global_batch_size),
            **worker_tags(),
        },
    )
    preview = None
    if spec.tracking.reconstruction_every:
        pictures = preview_images(spec, cache, spec.tracking.reconstruction_images)
        preview = ReconstructionPreview(pictures, spec.tracking.reconstruction_every, spec.seed)
    return MetricsLogger(ref, log_every=spec.optim.log_every, reconstruction=preview)


def resume_from_checkpoint(
    engine: Any, ref: RunRef | None, rank: int, checkpoint_file: str
) -> None:
    """Restore the engine from Ray Train's latest checkpoint, if there is one; rank 0 (the
    rank with a ``ref``) marks the run with one ``train/resumed_at_step`` point per
    restore."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        engine.resume(Path(folder) / checkpoint_file)
    logger.info("rank %d resumed at epoch %d, step %d", rank, engine.epoch, engine.global_step)
    if ref is not None:
        from orchestrator.tracking import RESUMED_AT_STEP, log_metrics

        log_metrics(ref, {RESUMED_AT_STEP: engine.global_step}, step=engine.global_step)


def _engine_config(spec: PretrainSpec, device: torch.device) -> EngineConfig:
    return spec.engine_config(device=str(device))
