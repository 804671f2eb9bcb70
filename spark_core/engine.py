"""The pre-training engine: the reference recipe, run epoch by epoch.

* LAMB (timm's, foreach) or AdamW, the reference parameter groups (no weight decay on
  1-D parameters, biases, mask tokens and layer-scale ``gamma``), global grad-norm clip;
* per-iteration schedules: linear lr warm-up from 0.005 x peak, cosine to 0.001 x peak;
  weight decay cosine from ``weight_decay`` to ``weight_decay_end``;
* fp32 / bf16 / fp16 autocast (fp16 with a grad scaler), channels_last, optional
  ``torch.compile``;
* exact resume at epoch boundaries: everything random in epoch ``e`` is seeded from
  ``(seed, e)``: the data order, each sample's augmentation (from its index) and the masks
  of the global batch (each rank takes its own rows), so for a fixed global batch the run
  sees the same images and masks whatever the number of DDP workers or loader processes;
  drop-path is seeded per rank;
* DDP: under an initialised multi-worker process group the engine wraps the model in
  ``DistributedDataParallel`` itself, after synchronising every batch norm's statistics
  across workers (the reference's SyncBatchNorm);
* the input decoded and augmented by PIL in the loader workers (``decoder="cpu"``, the
  reference), or on the training device (``decoder="gpu"``: the workers read encoded JPEGs
  and draw each sample's crop and flip, :class:`~spark_core.gpu_input.DeviceAugment` decodes
  and augments the batch before the step; see :mod:`spark_core.gpu_input`);
* metrics through callbacks. The step itself never reads a value back to the host:
  losses and grad norms stay on the device and are fetched in one transfer every
  ``log_every`` steps, and after each epoch's first step (a new job shows its first step).
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spark_core.backbones import resolve_family
from spark_core.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from spark_core.gpu_input import input_decoder
from spark_core.model import SparK
from spark_core.optim import Lamb, clip_factor, compiled_or_eager
from spark_core.runtime import autocast_is_native, cudnn_autotuning
from spark_core.sparse import synchronize_batch_norms

logger = logging.getLogger(__name__)

PRECISIONS: Mapping[str, torch.dtype | None] = MappingProxyType(
    {
        "fp32": None,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }
)
NO_WEIGHT_DECAY_KEYS: tuple[str, ...] = ("mask_token", "gamma", "cls_token", "pos_embed")
REFERENCE_BATCH = 256


def peak_lr(base_lr: float, global_batch_size: int) -> float:
    """The reference's linear scaling rule: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch_size / REFERENCE_BATCH


def lr_wd_at(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    peak: float,
    weight_decay: float,
    weight_decay_end: float,
) -> tuple[float, float]:
    """Learning rate and weight decay of iteration ``step`` (0-based), as the reference."""
    if step < warmup_steps:
        lr = 0.005 * peak + 0.995 * peak * step / warmup_steps
    else:
        span = max(total_steps - 1 - warmup_steps, 1)
        ratio = min((step - warmup_steps) / span, 1.0)
        lr = 0.001 * peak + 0.999 * peak * (0.5 + 0.5 * math.cos(math.pi * ratio))
    ratio = min(step / max(total_steps - 1, 1), 1.0)
    wd = weight_decay_end + (weight_decay - weight_decay_end) * (
        0.5 + 0.5 * math.cos(math.pi * ratio)
    )
    return lr, wd


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Reference groups: no decay on 1-D params, biases, mask tokens and ``gamma``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            param.ndim <= 1
            or name.endswith(".bias")
            or any(k in name for k in NO_WEIGHT_DECAY_KEYS)
        )
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay_scale": 1.0},
        {"params": no_decay, "weight_decay_scale": 0.0},
    ]


def _lamb(
    groups: list[dict], lr: float, betas: tuple[float, float], compile: bool
) -> torch.optim.Optimizer:
    # timm adapts (trust ratio) the groups that have weight decay: the decay group here.
    for group in groups:
        group["adapt"] = group["weight_decay_scale"] > 0
    return Lamb(groups, lr=lr, betas=betas, weight_decay=0.0, compile=compile)


def _adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], compile: bool
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=0.0, foreach=True)


OptimizerFactory = Callable[[list[dict], float, tuple[float, float], bool], torch.optim.Optimizer]
OPTIMIZERS: Mapping[str, OptimizerFactory] = MappingProxyType(
    {
        "lamb": _lamb,
        "adamw": _adamw,
    }
)


def build_optimizer(
    model: SparK,
    name: str = "lamb",
    *,
    betas: tuple[float, float] | None = None,
    compile: bool = False,
) -> torch.optim.Optimizer:
    """Optimizer over the reference parameter groups; lr and wd are set per iteration.

    ``betas`` default to the reference's: (0.9, 0.95) for ResNets, (0.9, 0.999) for ConvNeXt.
    ``compile`` fuses LAMB's update with torch.compile (see :mod:`spark_core.optim`).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: allowed values are {', '.join(OPTIMIZERS)}")
    if betas is None:
        betas = resolve_family(model.config.backbone).lamb_betas
    return OPTIMIZERS[name](param_groups(model), 0.0, betas, compile)


# The training state's file name in a checkpoint folder (the engine's and Ray Train's).


@dataclass(frozen=True)
class EngineConfig:
    """How to train (the model's own config lives in :class:`~spark_core.SparKConfig`).

    ``batch_size`` is per process; ``global_batch_size`` (default: batch x world size)
    sets the peak lr through :func:`peak_lr`. ``loader_workers`` is the DataLoader's worker
    processes per rank (not the number of ranks). ``decoder`` is where images are decoded and
    augmented (a key of :data:`~spark_core.gpu_input.INPUT_DECODERS`): ``"cpu"`` in the loader
    workers, from a dataset of tensors; ``"gpu"`` on ``device``, from a
    :class:`~spark_core.gpu_input.EncodedJpegDataset`.
    """

    epochs: int = 1
    batch_size: int = 16
    global_batch_size: int | None = None
    optimizer: str = "lamb"
    base_lr: float = 2e-4
    betas: tuple[float, float] | None = None
    warmup_epochs: float = 40.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 5.0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_optimizer: bool = False
    seed: int = 0
    log_every: int = 10
    loader_workers: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    sync_batchnorm: bool = True
    cudnn_benchmark: bool = True
    decoder: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "base_lr": self.base_lr > 0,
            "warmup_epochs": self.warmup_epochs >= 0,
            "clip_grad": self.clip_grad >= 0,
            "log_every": self.log_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision={self.precision!r}: allowed values are {', '.join(PRECISIONS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={self.optimizer!r}: allowed values are {', '.join(OPTIMIZERS)}"
            )
        input_decoder(self.decoder)  # ValueError naming the allowed values


@dataclass
class StepMetrics:
    """Metrics of one optimisation step (host floats, delivered every ``log_every`` steps)."""

    epoch: int
    step: int
    loss: float
    lr: float
    weight_decay: float
    grad_norm: float
    images_per_sec: float
    epoch_progress: float


@dataclass
class EpochMetrics:
    epoch: int
    step: int
    loss: float
    epoch_time: float
    images_per_sec: float


class EngineCallback(Protocol):
    def on_step(self, metrics: StepMetrics) -> None: ...

    def on_epoch_end(self, engine: PretrainEngine, metrics: EpochMetrics) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def derive_seed(*parts: int) -> int:
    seed = 0x5EED
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return seed


def world_info() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SampleSeeded(Dataset):
    """Seeds torch's CPU generator and Python's ``random`` from ``(seed, epoch, index)``
    around each sample (timm's crops and erasing draw from ``random``).

    Augmentation then depends on the sample only, not on which rank or loader process reads
    it; the caller's generator states are restored afterwards. Set :attr:`epoch` per epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        # (index, position): the same image drawn again in an epoch (repeated augmentation)
        # gets its own augmentation, seeded by where it sits in the epoch.
        index, *position = key if isinstance(key, tuple) else (key,)
        state = torch.default_generator.get_state()
        python_state = random.getstate()
        seed = derive_seed(self.seed, self.epoch, index, 3, *position)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.default_generator.set_state(state)
            random.setstate(python_state)


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed what epoch ``epoch`` draws from: torch, numpy and Python's ``random`` with
    ``seed`` (this rank's), the loader's order (sampler epoch, shuffling generator) and each
    sample's augmentation (:class:`SampleSeeded`)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if isinstance(loader.dataset, SampleSeeded):
        loader.dataset.epoch = epoch
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(derive_seed(seed, 2))


@dataclass
class _PendingStep:
    step: int
    epoch: int
    lr: float
    wd: float
    loss: torch.Tensor
    grad_norm: torch.Tensor
    progress: float


@dataclass
class _Window:
    """Device tensors of the steps since the last host transfer."""

    pending: list[_PendingStep] = field(default_factory=list)
    start_time: float = field(default_factory=time.perf_counter)
    images: int = 0


class PretrainEngine:
    """Runs SparK pre-training epochs (one process, or one DDP rank).

    Args:
        model: the SparK model (unwrapped).
        config: training settings.
        forward_module: what to call for the forward pass, e.g. a DDP wrapper of ``model``;
            defaults to ``model`` (compiled when ``config.compile``).
        callbacks: receive step and epoch metrics (rank 0 decides what to log).
    """

    def __init__(
        self,
        model: SparK,
        config: EngineConfig,
        *,
        forward_module: nn.Module | None = None,
        callbacks: Sequence[EngineCallback] = (),
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.rank, self.world_size = world_info()
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if forward_module is None and self.world_size > 1:
            forward_module = self._wrap_ddp()
        self.forward_module = forward_module or self.model
        if config.compile:
            self.forward_module = torch.compile(self.forward_module)
        self.optimizer = build_optimizer(
            self.model, config.optimizer, betas=config.betas, compile=config.compile_optimizer
        )
        # Compiled, the per-tensor norms (foreach=False) fuse; eager, foreach kernels are faster.
        eager_norm = functools.partial(torch.nn.utils.get_total_norm, foreach=True)
        fusable_norm = functools.partial(torch.nn.utils.get_total_norm, foreach=False)
        self._grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] = (
            compiled_or_eager(fusable_norm, eager_norm) if config.compile_optimizer else eager_norm
        )
        self.autocast_dtype = PRECISIONS[config.precision]
        if not autocast_is_native(self.device, self.autocast_dtype):
            logger.warning(
                "precision=%r on %s: this device has no %s convolution kernels, so each step "
                "runs on slow fallbacks (an AVX2-only CPU: 10-15x slower than fp32); "
                "use precision='fp32' here",
                config.precision,
                self.device,
                config.precision,
            )
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.callbacks = list(callbacks)
        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.mask_generator = torch.Generator(device=self.device)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        global_batch = config.global_batch_size or config.batch_size * self.world_size
        self.peak_lr = peak_lr(config.base_lr, global_batch)
        self.last_epoch_loss: float | None = None
        self.input_decoder = input_decoder(config.decoder)
        # Turns a loader batch into the model's input (B, 3, H, W): the stacked images, or
        # the encoded files decoded and augmented on the device.
        self.batch_images = self.input_decoder.batch_to_images(
            self.model.config.input_size, self.device
        )

    def _wrap_ddp(self) -> nn.Module:
        if self.config.sync_batchnorm:
            synchronize_batch_norms(self.model)
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume at the next epoch boundary (besides model/optimizer)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "engine_config": asdict(self.config),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "last_epoch_loss": self.last_epoch_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.last_epoch_loss = state.get("last_epoch_loss")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, path: str | Path) -> Path:
        """Whole model + optimizer + engine state (call on rank 0 only)."""
        return save_checkpoint(self.model, path, optimizer=self.optimizer, extra=self.state_dict())

    def resume(self, path: str | Path) -> bool:
        """Load a checkpoint written by :meth:`save`; False when the file does not exist."""
        path = Path(path)
        if not path.exists():
            return False
        extra = load_checkpoint(
            self.model, path, optimizer=self.optimizer, map_location=self.device
        )
        self.load_state_dict(extra)
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)
        return True

    # ------------------------------------------------------------------ data

    def build_loader(self, dataset: Dataset) -> DataLoader:
        """Sharded, epoch-seeded loader: each rank sees its own part of every epoch; batches
        are collated as ``config.decoder`` needs them."""
        dataset = SampleSeeded(dataset, self.config.seed)
        sampler = DistributedSampler(
            dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.config.seed,
            drop_last=True,
        )
        if len(sampler) < self.config.batch_size:
            raise ValueError(
                f"dataset of {len(dataset)} images gives {len(sampler)} per worker, fewer than "
                f"batch_size={self.config.batch_size}: lower the batch size or add images"
            )
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.loader_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            collate_fn=self.input_decoder.collate_fn,
            generator=torch.Generator(),
            persistent_workers=False,
        )

    def _seed_epoch(self, loader: DataLoader, epoch: int) -> None:
        seed_epoch(loader, derive_seed(self.config.seed, epoch, self.rank), epoch)
        self.mask_generator.manual_seed(derive_seed(self.config.seed, epoch, 1))

    # ------------------------------------------------------------------ step

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _set_schedule(self, steps_per_epoch: int) -> tuple[float, float]:
        lr, wd = lr_wd_at(
            self.global_step,
            total_steps=max(self.config.epochs * steps_per_epoch, 1),
            warmup_steps=round(self.config.warmup_epochs * steps_per_epoch),
            peak=self.peak_lr,
            weight_decay=self.config.weight_decay,
            weight_decay_end=self.config.weight_decay_end,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd * group.get("weight_decay_scale", 1.0)
        return lr, wd

    def train_step(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns (loss, grad norm) as device tensors (no host sync)."""
        images = images.to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The masks of the whole global batch, of which this rank takes its sampler's rows
        # (DistributedSampler deals samples round-robin).
        active = self.model.generate_mask(
            images.shape[0] * self.world_size, generator=self.mask_generator, device=self.device
        )[self.rank :: self.world_size]
        # Only CUDA reads the flag; setting it on every device keeps the behaviour testable.
        with cudnn_autotuning(self.config.cudnn_benchmark):
            with self._autocast():
                loss = self.forward_module(images, active).loss
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = self._grad_norm(grads)
        step_kwargs = self._clip(grads, grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer, **step_kwargs)
            self.scaler.update()
        else:
            self.optimizer.step(**step_kwargs)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm.detach()

    def _clip(self, grads: list[torch.Tensor], grad_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clip at ``config.clip_grad``: inside LAMB's update when it can, else in place."""
        if self.config.clip_grad <= 0:
            return {}
        factor = clip_factor(grad_norm, self.config.clip_grad)
        if isinstance(self.optimizer, Lamb):
            return {"grad_scale": factor}
        torch._foreach_mul_(grads, factor)
        return {}

    # ------------------------------------------------------------------ epochs

    def fit(self, dataset: Dataset) -> list[EpochMetrics]:
        """Run the remaining epochs (``self.epoch`` .. ``config.epochs - 1``)."""
        loader = self.build_loader(dataset)
        history = []
        checkpoint_path = self.checkpoint_path
        while self.epoch < self.config.epochs:
            metrics = self.train_one_epoch(loader)
            history.append(metrics)
            done = self.epoch == self.config.epochs
            if (
                checkpoint_path
                and self.rank == 0
                and (self.epoch % self.config.checkpoint_every == 0 or done)
            ):
                self.save(checkpoint_path)
            for callback in self.callbacks:
                callback.on_epoch_end(self, metrics)
        return history

    @property
    def checkpoint_path(self) -> Path | None:
        if self.config.checkpoint_dir is None:
            return None
        return Path(self.config.checkpoint_dir) / CHECKPOINT_FILE

    def train_one_epoch(self, loader: DataLoader) -> EpochMetrics:
        epoch = self.epoch
        self._seed_epoch(loader, epoch)
        self.model.train()
        steps = len(loader)
        start = time.perf_counter()
        window = _Window()
        losses: list[torch.Tensor] = []
        for i, batch in enumerate(loader):
            images = self.batch_images(batch)
            lr, wd = self._set_schedule(steps)
            loss, grad_norm = self.train_step(images)
            losses.append(loss)
            window.pending.append(
                _PendingStep(self.global_step, epoch, lr, wd, loss, grad_norm, (i + 1) / steps)
            )
            window.images += images.shape[0] * self.world_size
            self.global_step += 1
            # An epoch's first step goes out at once: a new job shows its first step.
            if i == 0 or len(window.pending) >= self.config.log_every or i + 1 == steps:
                self._flush(window)
                window = _Window()
        elapsed = time.perf_counter() - start
        mean_loss = torch.stack(losses).mean().item() if losses else float("nan")
        self.epoch += 1
        self.last_epoch_loss = mean_loss
        images_seen = steps * self.config.batch_size * self.world_size
        return EpochMetrics(epoch, self.global_step, mean_loss, elapsed, images_seen / elapsed)

    def _flush(self, window: _Window) -> None:
        """One host transfer for the window's metrics, then the callbacks."""
        values = torch.stack(
            [torch.stack([p.loss.float(), p.grad_norm.float()]) for p in window.pending]
        )
        if self.world_size > 1:
            # Report the global batch's loss (the mean of the ranks': every sample masks
            # the same number of patches); one collective per window, not per step.
            torch.distributed.all_reduce(values)
            values = values / self.world_size
        values = values.tolist()
        elapsed = max(time.perf_counter() - window.start_time, 1e-9)
        throughput = window.images / elapsed
        for pending, (loss, grad_norm) in zip(window.pending, values, strict=True):
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {pending.step} (epoch {pending.epoch}); lower the "
                    "learning rate, use bf16 instead of fp16, or check the input data"
                )
            metrics = StepMetrics(
                epoch=pending.epoch,
                step=pending.step,
                loss=loss,
                lr=pending.lr,
                weight_decay=pending.wd,
                grad_norm=grad_norm,
                images_per_sec=throughput,
                epoch_progress=pending.progress,
            )
            for callback in self.callbacks:
                callback.on_step(metrics)


class ProgressBar:
    """A one-line progress display on stderr: epoch, step, loss, img/s, ETA.

    Redraws in place on a terminal. Elsewhere (logs, CI) it writes a line at most every
    ``min_interval`` seconds, plus the last step of every epoch.
    """

    def __init__(
        self,
        total_epochs: int,
        steps_per_epoch: int,
        images_per_step: int,
        stream=None,
        min_interval: float = 10.0,
    ) -> None:
        self.total_steps = max(total_epochs * steps_per_epoch, 1)
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.total_epochs = total_epochs
        self.images_per_step = max(images_per_step, 1)
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self.min_interval = 0.0 if self.interactive else min_interval
        self._last_write = float("-inf")

    def on_step(self, m: StepMetrics) -> None:
        remaining = max(self.total_steps - (m.step + 1), 0)
        epoch_end = (m.step + 1) % self.steps_per_epoch == 0
        now = time.monotonic()
        if not epoch_end and now - self._last_write < self.min_interval:
            return
        self._last_write = now
        steps_per_sec = m.images_per_sec / self.images_per_step
        eta = remaining / steps_per_sec if steps_per_sec > 0 else float("nan")
        line = (
            f"epoch {m.epoch + 1}/{self.total_epochs}  step {m.step + 1}/{self.total_steps}  "
            f"loss {m.loss:.4f}  lr {m.lr:.2e}  {m.images_per_sec:.1f} img/s  "
            f"ETA {format_duration(eta)}"
        )
        end = "\r" if self.interactive and remaining else "\n"
        self.stream.write(line + end)
        self.stream.flush()

    def on_epoch_end(self, engine: PretrainEngine, metrics: EpochMetrics) -> None:
        return None


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` of a duration (the standard library's), ``?`` when it is not finite (an
    ETA before any rate)."""
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"
