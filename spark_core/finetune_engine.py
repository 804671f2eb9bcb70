"""The fine-tuning engine: the paper's downstream protocol, run epoch by epoch.

The recipe (:mod:`spark_core.finetune`) on a timm classifier, one process or one DDP rank:

* data: the reference's training and evaluation transforms; a ``DistributedSampler`` (drop
  last) or, with ``rep_aug > 0``, timm's ``RepeatAugSampler``; the last batch may be partial
  as in the reference; an odd batch gets its first sample repeated for batch mixing;
* step: Mixup/CutMix with smoothed targets, BCE (LAMB) or soft-target CE (AdamW), timm
  ``Lamb``/``AdamW`` with layer-wise lr scales, the per-iteration schedule written into every
  group, optional grad clipping (the reference never clips), EMA of all weights and buffers
  (timm ``ModelEmaV3``) after every step. Nothing is read back to the host inside the step;
  losses are fetched every ``log_every`` steps and after each epoch's first;
* evaluation: top-1/top-5 of the model and of its EMA after the epochs the reference
  evaluates (every 5th in the first third, then every epoch; always the last); the result is
  the best top-1 of either, as the paper reports;
* DDP: batch norms synchronised across workers (the reference's SyncBN), the evaluation set
  split contiguously between ranks and counts summed;
* exact resume at epoch boundaries: everything random in epoch ``e`` is seeded from
  ``(seed, e)`` (data order, each sample's augmentation from its index, mixing, drop path),
  and a checkpoint holds model, EMA, optimizer and the history.

The EMA starts from the loaded weights. (The reference builds it before loading the
checkpoint, from the random initialisation; at its length, 187,800 steps at decay 0.9999,
the start weighs ``e^-18.8``, so both agree there, and on short budgets this one is useful.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.data.distributed_sampler import RepeatAugSampler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from spark_core.checkpoint import atomic_write
from spark_core.engine import (
    PRECISIONS,
    SampleSeeded,
    StepMetrics,
    derive_seed,
    seed_epoch,
    world_info,
)
from spark_core.finetune import (
    FinetuneRecipe,
    build_criterion,
    build_finetune_optimizer,
    build_mixup,
    even_batch,
    finetune_lr,
    finetune_param_groups,
)
from spark_core.sparse import synchronize_batch_norms

logger = logging.getLogger(__name__)

FINETUNE_CHECKPOINT_FORMAT = "spark_core/finetune-1"
# Below this many images an epoch is one repeated pass (timm's RepeatAugSampler would
# otherwise round the epoch down to zero samples).
REPEAT_AUG_ROUND = 256
TOP_K = (1, 5)
FINETUNE_PRECISIONS = ("fp32", "bf16")


class PositionedSampler(Sampler[tuple[int, int]]):
    """``(index, position in the epoch)`` of a rank's sampler, for :class:`SampleSeeded`.

    timm's ``RepeatAugSampler`` deals the epoch's list (each index repeated) round-robin,
    ``indices[rank::world]``, so the ``p``-th index of rank ``r`` sits at ``p * world + r``:
    every repeat of an image gets its own augmentation, on whichever rank it lands.
    """

    def __init__(self, sampler: Any, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield index, position * self.world_size + self.rank

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def evaluated_epochs(epochs: int) -> frozenset[int]:
    """0-based epochs after which the reference evaluates: every 5th in the first third,
    every one after it (``range(0, ep // 3, 5) | range(ep // 3, ep)``)."""
    return frozenset(range(0, epochs // 3, 5)) | frozenset(range(epochs // 3, epochs))


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune: the recipe, plus what is not part of it.

    ``recipe.batch_size`` is the global batch; each of ``W`` ranks takes
    ``batch_size // W`` and the peak lr follows that effective global batch.

    Attributes:
        backbone: the timm model name (for the layer ids).
        num_classes: classifier width.
        recipe: the protocol's hyper-parameters (:func:`spark_core.finetune.finetune_recipe`,
            overridden with :func:`dataclasses.replace`).
        eval_batch_size: per rank (default: twice the training batch, as the reference).
    """

    backbone: str
    num_classes: int
    recipe: FinetuneRecipe
    eval_batch_size: int | None = None
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    loader_workers: int = 0
    device: str = "cpu"
    sync_batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}: needs at least 1 class")
        if self.precision not in FINETUNE_PRECISIONS:
            raise ValueError(
                f"precision={self.precision!r}: use one of {', '.join(FINETUNE_PRECISIONS)} "
                "(fp16 would need loss scaling)"
            )
        if self.recipe.epochs < 0 or self.recipe.batch_size < 1 or self.log_every < 1:
            raise ValueError("recipe.epochs >= 0, recipe.batch_size >= 1 and log_every >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return cls(**{**data, "recipe": FinetuneRecipe(**data["recipe"])})


@dataclass
class Accuracy:
    """Top-1 and top-5 (%) of the model and of its EMA on the evaluation set."""

    top1: float
    top5: float
    ema_top1: float
    ema_top5: float

    @property
    def best_top1(self) -> float:
        return max(self.top1, self.ema_top1)


@dataclass
class FinetuneEpoch:
    """One epoch's metrics (host floats); ``eval`` when the epoch was evaluated."""

    epoch: int
    step: int
    loss: float
    train_top1: float
    lr: float
    epoch_time: float
    images_per_sec: float
    eval: Accuracy | None = None


@dataclass
class FinetuneSummary:
    """The result the paper reports and where it came from.

    ``finetune_top1`` is the best top-1 of the model or its EMA over the evaluations: the
    one before training (``initial``, as the reference's ``max_acc`` starts from it) and
    those after the evaluated epochs; ``best_source`` says which ("model" or "ema") and
    ``best_epoch`` when (epochs done: 0 = before training).
    """

    finetune_top1: float = math.nan
    best_epoch: int = 0
    best_source: str = ""
    initial: Accuracy | None = None
    last: Accuracy | None = None
    best_model_top1: float = math.nan
    best_ema_top1: float = math.nan

    def metrics(self) -> dict[str, float]:
        values = {
            "finetune_top1": self.finetune_top1,
            "best_epoch": float(self.best_epoch),
            "best_model_top1": self.best_model_top1,
            "best_ema_top1": self.best_ema_top1,
        }
        if self.last is not None:
            values.update({f"last_{k}": v for k, v in asdict(self.last).items()})
        return values


class FinetuneCallback(Protocol):
    def on_step(self, metrics: StepMetrics) -> None: ...

    def on_epoch_end(self, engine: FinetuneEngine, metrics: FinetuneEpoch) -> None: ...


@dataclass
class _Pending:
    step: int
    epoch: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor
    progress: float
    images: int


@dataclass
class _Window:
    pending: list[_Pending] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)


def top_k_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct predictions at each k of :data:`TOP_K` (k capped at the class count):
    ``(len(TOP_K),)`` counts, on the logits' device. ``logits (B, C)``, ``labels (B,)``."""
    k = min(max(TOP_K), logits.shape[1])
    top = logits.topk(k, dim=1).indices == labels[:, None]
    return torch.stack([top[:, : min(kk, k)].any(dim=1).sum() for kk in TOP_K])


class FinetuneEngine:
    """Runs fine-tuning epochs of a timm classifier (one process, or one DDP rank).

    Load the source weights into ``model`` before building the engine (the EMA copies them).

    Args:
        model: a timm ResNet/ConvNeXt classifier with ``num_classes`` outputs (unwrapped).
        config: the recipe and run settings.
        callbacks: receive step and epoch metrics (rank 0 decides what to log).
    """

    def __init__(
        self,
        model: nn.Module,
        config: FinetuneConfig,
        *,
        callbacks: Sequence[FinetuneCallback] = (),
    ) -> None:
        self.config = config
        recipe = config.recipe
        self.device = torch.device(config.device)
        self.rank, self.world_size = world_info()
        self.batch_size = recipe.batch_size // self.world_size
        if self.batch_size < 1:
            raise ValueError(
                f"recipe.batch_size={recipe.batch_size} is below the {self.world_size} workers: "
                "raise the batch size or use fewer workers"
            )
        self.global_batch = self.batch_size * self.world_size
        self.peak_lr = recipe.peak_lr(self.global_batch)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(self.model, decay=recipe.ema_decay)
        self.forward_module: nn.Module = self.model
        if self.world_size > 1:
            if config.sync_batchnorm:
                synchronize_batch_norms(self.model)
            device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.forward_module = torch.compile(self.forward_module)
        groups = finetune_param_groups(
            self.model, config.backbone, lr_scale=recipe.lr_scale, weight_decay=recipe.weight_decay
        )
        self.optimizer = build_finetune_optimizer(groups, recipe)
        self.criterion = build_criterion(recipe)
        self.mixup = build_mixup(recipe, config.num_classes)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast_dtype = PRECISIONS[config.precision]
        self.callbacks = list(callbacks)
        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.summary = FinetuneSummary()
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ data

    def train_loader(self, dataset: Dataset) -> DataLoader:
        """Sharded, epoch-seeded, augmented batches of ``batch_size // world`` images."""
        seeded = SampleSeeded(dataset, self.config.seed)
        recipe = self.config.recipe
        if recipe.rep_aug > 0:
            repeated = RepeatAugSampler(
                seeded,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=True,
                num_repeats=recipe.rep_aug,
                selected_round=REPEAT_AUG_ROUND if len(seeded) >= REPEAT_AUG_ROUND else 0,
            )
            sampler: Any = PositionedSampler(repeated, self.rank, self.world_size)
        else:
            sampler = DistributedSampler(
                seeded,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=True,
                seed=self.config.seed,
                drop_last=True,
            )
        if len(sampler) < 1:
            raise ValueError(
                f"the training set of {len(dataset)} images leaves none for each of "
                f"{self.world_size} workers: add images or use fewer workers"
            )
        return DataLoader(
            seeded,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.config.loader_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )

    def steps_per_epoch(self, dataset: Dataset) -> int:
        """Optimiser steps per epoch on ``dataset`` (the sampler's share, last batch partial)."""
        return len(self.train_loader(dataset))

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """This rank's contiguous share of the evaluation set (no padding, no repeats)."""
        size = len(dataset)  # type: ignore[arg-type]
        start = size * self.rank // self.world_size
        stop = size * (self.rank + 1) // self.world_size
        return DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=self.config.eval_batch_size or 2 * self.batch_size,
            shuffle=False,
            num_workers=self.config.loader_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _seed_epoch(self, loader: DataLoader, epoch: int) -> None:
        # Mixing draws from numpy, drop path from torch: both seeded per epoch and rank.
        seed_epoch(loader, derive_seed(self.config.seed, epoch, self.rank, 7), epoch)

    # ------------------------------------------------------------------ step

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _set_lr(self, steps_per_epoch: int) -> float:
        recipe = self.config.recipe
        lr = finetune_lr(
            self.global_step,
            recipe.warmup_epochs * steps_per_epoch,
            max(recipe.epochs * steps_per_epoch, 1),
            self.peak_lr,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step; (loss, correct count, grad norm) as device tensors.

        ``images (B, 3, S, S)``, ``labels (B,)``; a prediction counts as correct when it is
        either label mixed into its image (the reference's training accuracy).
        """
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        batch = images.shape[0]
        images, labels = even_batch(images, labels)
        images, targets = self.mixup(images, labels)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self.forward_module(images)
        loss = self.criterion(logits.float(), targets)
        loss.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.config.recipe.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(
                self._params, self.config.recipe.clip_grad, grad_norm, foreach=True
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # A constant decay from the first step (the reference's ModelEmaV2); with a step,
        # timm's V3 copies the model outright on the first two.
        self.ema.update(self.model)
        # The batch's own samples only (an odd batch's repeated first one is at the front).
        # As the reference: a hit when the prediction is either of the two mixed labels.
        own = slice(images.shape[0] - batch, None)
        predicted = logits.argmax(dim=1)
        hit = (predicted == labels) | (predicted == labels.flip(0))
        correct = hit[own].sum()
        return loss.detach(), correct, grad_norm.detach()

    # ------------------------------------------------------------------ epochs

    def fit(self, train_set: Dataset, val_set: Dataset) -> FinetuneSummary:
        """Run the remaining epochs (``self.epoch`` .. ``recipe.epochs - 1``)."""
        loader = self.train_loader(train_set)
        val_loader = self.eval_loader(val_set)
        due = evaluated_epochs(self.config.recipe.epochs)
        if self.epoch == 0 and self.summary.initial is None:
            self.summary.initial = self.evaluate(val_loader)
            self._record(self.summary.initial, epochs_done=0)
        while self.epoch < self.config.recipe.epochs:
            metrics = self.train_one_epoch(loader)
            if metrics.epoch in due:
                metrics.eval = self.evaluate(val_loader)
                self._record(metrics.eval, epochs_done=metrics.epoch + 1)
            self.history.append(asdict(metrics))
            for callback in self.callbacks:
                callback.on_epoch_end(self, metrics)
        return self.summary

    def train_one_epoch(self, loader: DataLoader) -> FinetuneEpoch:
        epoch = self.epoch
        self._seed_epoch(loader, epoch)
        self.model.train()
        steps = len(loader)
        start = time.perf_counter()
        window = _Window()
        losses, corrects, seen = [], [], 0
        lr = 0.0
        for i, (images, labels) in enumerate(loader):
            lr = self._set_lr(steps)
            loss, correct, grad_norm = self.train_step(images, labels)
            losses.append(loss)
            corrects.append(correct)
            seen += images.shape[0]
            window.pending.append(
                _Pending(
                    self.global_step, epoch, lr, loss, grad_norm, (i + 1) / steps,
                    images.shape[0] * self.world_size,
                )
            )  # fmt: skip
            self.global_step += 1
            # An epoch's first step goes out at once: a new job shows its first step.
            if i == 0 or len(window.pending) >= self.config.log_every or i + 1 == steps:
                self._flush(window)
                window = _Window()
        totals = torch.stack([torch.stack(losses).sum(), torch.stack(corrects).sum().float()])
        totals = torch.cat([totals, torch.tensor([len(losses), seen], device=totals.device)])
        if self.world_size > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, correct_sum, batches, images = totals.tolist()
        elapsed = time.perf_counter() - start
        self.epoch += 1
        return FinetuneEpoch(
            epoch=epoch,
            step=self.global_step,
            loss=loss_sum / max(batches, 1),
            train_top1=100.0 * correct_sum / max(images, 1),
            lr=lr,
            epoch_time=elapsed,
            images_per_sec=images / max(elapsed, 1e-9),
        )

    def _flush(self, window: _Window) -> None:
        """One host transfer for the window's losses, then the callbacks."""
        values = torch.stack([torch.stack([p.loss, p.grad_norm.float()]) for p in window.pending])
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
            values = values / self.world_size
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        rate = sum(p.images for p in window.pending) / elapsed
        for pending, (loss, grad_norm) in zip(window.pending, values.tolist(), strict=True):
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"fine-tuning loss is {loss} at step {pending.step} (epoch {pending.epoch}); "
                    "lower recipe.base_lr or check the source weights"
                )
            metrics = StepMetrics(
                epoch=pending.epoch,
                step=pending.step,
                loss=loss,
                lr=pending.lr,
                weight_decay=self.config.recipe.weight_decay,
                grad_norm=grad_norm,
                images_per_sec=rate,
                epoch_progress=pending.progress,
            )
            for callback in self.callbacks:
                callback.on_step(metrics)

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> Accuracy:
        """Top-1/top-5 (%) of the model and of the EMA on ``loader`` (summed over ranks)."""
        counts = torch.zeros(2, len(TOP_K) + 1, device=self.device)
        for row, net in enumerate((self.model, self.ema.module)):
            was_training = net.training
            net.eval()
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                if self.config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    logits = net(images)
                counts[row, :-1] += top_k_correct(logits.float(), labels)
                counts[row, -1] += labels.shape[0]
            net.train(was_training)
        if self.world_size > 1:
            torch.distributed.all_reduce(counts)
        (top1, top5, n), (ema1, ema5, _) = counts.tolist()
        scale = 100.0 / max(n, 1)
        return Accuracy(top1 * scale, top5 * scale, ema1 * scale, ema5 * scale)

    def _record(self, acc: Accuracy, *, epochs_done: int) -> None:
        summary = self.summary
        if epochs_done:
            summary.last = acc
        summary.best_model_top1 = _nanmax(summary.best_model_top1, acc.top1)
        summary.best_ema_top1 = _nanmax(summary.best_ema_top1, acc.ema_top1)
        if math.isnan(summary.finetune_top1) or acc.best_top1 > summary.finetune_top1:
            source = "ema" if acc.ema_top1 > acc.top1 else "model"
            net = self.ema.module if source == "ema" else self.model
            summary.finetune_top1 = acc.best_top1
            summary.best_epoch = epochs_done
            summary.best_source = source
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain containers (``weights_only``)."""
        return {
            "format": FINETUNE_CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best": self.best_state,
            "extra": {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "summary": _summary_dict(self.summary),
                "history": self.history,
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the training state atomically (call on rank 0)."""
        path = Path(path)
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def resume(self, path: str | Path) -> bool:
        """Continue from a checkpoint of :meth:`save`; False when the file does not exist."""
        path = Path(path)
        if not path.exists():
            return False
        state = read_finetune_checkpoint(path, map_location=self.device)
        saved = FinetuneConfig.from_dict(state["config"])
        if (saved.backbone, saved.num_classes) != (self.config.backbone, self.config.num_classes):
            raise ValueError(
                f"{path}: a fine-tune of {saved.backbone} with {saved.num_classes} classes, "
                f"not {self.config.backbone} with {self.config.num_classes}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_state = state.get("best")
        extra = state["extra"]
        self.epoch = int(extra["epoch"])
        self.global_step = int(extra["global_step"])
        self.summary = _summary_from(extra["summary"])
        self.history = list(extra["history"])
        logger.info("resumed fine-tuning at epoch %d, step %d", self.epoch, self.global_step)
        return True


def read_finetune_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """A checkpoint of :meth:`FinetuneEngine.save`, read without unpickling objects."""
    try:
        state = torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as error:  # UnpicklingError and friends: name the file
        raise ValueError(f"{path}: not a readable fine-tuning checkpoint: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FINETUNE_CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a fine-tuning checkpoint ({FINETUNE_CHECKPOINT_FORMAT})")
    return state


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else max(a, b)


def _summary_dict(summary: FinetuneSummary) -> dict[str, Any]:
    return asdict(summary)


def _summary_from(data: dict[str, Any]) -> FinetuneSummary:
    def accuracy(key: str) -> Accuracy | None:
        return Accuracy(**data[key]) if data.get(key) else None

    return replace(FinetuneSummary(**data), last=accuracy("last"), initial=accuracy("initial"))


__all__ = [
    "Accuracy",
    "FinetuneConfig",
    "FinetuneEngine",
    "FinetuneEpoch",
    "FinetuneSummary",
    "evaluated_epochs",
    "read_finetune_checkpoint",
    "top_k_correct",
]
