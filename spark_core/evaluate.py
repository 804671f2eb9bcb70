"""Quick looks at a pre-trained encoder on frozen features: linear probe and kNN.

The paper's fine-tuning protocol is :mod:`spark_core.finetune_engine`.

* :func:`spark_feature_fn` / :func:`timm_feature_fn` -- image batch -> last feature map.
* :func:`extract_features` -- run a feature function over a loader, globally pooled.
* :func:`linear_probe` -- standardised features + a linear classifier (MAE-style probe).
* :func:`knn_top1` -- cosine-similarity weighted k-nearest-neighbour vote (DINO recipe).
* :func:`evaluate_encoder` -- any of the above on a SparK model, by method name.

Everything is deterministic for a given ``seed`` (and, for the data, a seeded loader).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from spark_core.model import SparK

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
Batches = Iterable[Any]


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode inside the block; restore every submodule's own flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def spark_feature_fn(model: SparK) -> FeatureFn:
    """Dense features of a SparK encoder: ``images (B, 3, H, W) -> (B, C, H/32, W/32)``.

    Every patch is visible (mask of ones), so the sparse encoder computes what the dense
    timm backbone computes. Each call runs in eval mode (running BatchNorm statistics) without
    gradients and restores the model's previous train/eval flags.
    """
    if not isinstance(model, SparK):
        raise TypeError(f"model: expected a SparK model, got {type(model).__name__}")

    def features(images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        active = torch.ones(
            b, 1, h // model.stride, w // model.stride, dtype=torch.bool, device=images.device
        )
        with _eval_mode(model), torch.no_grad():
            return model.encode(images, active)[-1]

    return features


def timm_feature_fn(net: nn.Module) -> FeatureFn:
    """Features of a plain timm model via ``net.forward_features``: ``(B, 3, H, W) -> (B, C,
    h, w)`` (CNNs). Runs in eval mode without gradients, restoring the previous mode."""
    if not callable(getattr(net, "forward_features", None)):
        raise TypeError(
            f"net: expected a timm model with a forward_features method, got {type(net).__name__}"
        )

    def features(images: torch.Tensor) -> torch.Tensor:
        with _eval_mode(net), torch.no_grad():
            return net.forward_features(images)

    return features


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


#: Global pooling of a (B, C, h, w) map to (B, C), by name.
POOLINGS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {"avg": _avg_pool, "max": _max_pool}
)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Sequence) or len(batch) < 2:
        raise ValueError(
            f"loader: each batch must be an (images, labels) pair, got {type(batch).__name__}"
        )
    images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels, dtype=torch.long)


def extract_features(
    encoder_fn: FeatureFn,
    loader: Batches,
    *,
    device: str | torch.device = "cpu",
    pool: str = "avg",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Globally pooled features and labels of every batch of ``loader``.

    Args:
        encoder_fn: ``images (B, 3, H, W) -> (B, C, h, w)`` feature map (``(B, C)`` is taken
            as already pooled), e.g. from :func:`spark_feature_fn`.
        loader: iterable of ``(images (B, 3, H, W), labels (B,))`` batches.
        device: where the images are sent before ``encoder_fn``.
        pool: global pooling, one of :data:`POOLINGS` (``"avg"``, ``"max"``).

    Returns:
        ``(features (N, C) float32 on CPU, labels (N,) int64 on CPU)``.
    """
    if pool not in POOLINGS:
        raise ValueError(f"pool={pool!r}: allowed values are {', '.join(POOLINGS)}")
    pool_fn = POOLINGS[pool]
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in loader:
            images, batch_labels = _split_batch(batch)
            out = encoder_fn(images.to(device, non_blocking=True))
            if out.ndim == 4:
                out = pool_fn(out)
            elif out.ndim != 2:
                raise ValueError(
                    f"encoder_fn: expected a (B, C, h, w) or (B, C) output, got shape "
                    f"{tuple(out.shape)}"
                )
            feats.append(out.float().cpu())
            labels.append(batch_labels.cpu())
    if not feats:
        raise ValueError("loader: yielded no batches (empty dataset, or drop_last too strict?)")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Classifiers on frozen features
# --------------------------------------------------------------------------------------------


def _check_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
) -> int:
    """Validate shapes and labels; return the number of classes."""
    for name, feats, labels in (
        ("train", train_feats, train_labels),
        ("val", val_feats, val_labels),
    ):
        if feats.ndim != 2:
            raise ValueError(f"{name}_feats: expected (N, C), got shape {tuple(feats.shape)}")
        if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
            raise ValueError(
                f"{name}_labels: expected shape ({feats.shape[0]},) to match {name}_feats, "
                f"got {tuple(labels.shape)}"
            )
        if feats.shape[0] == 0:
            raise ValueError(f"{name}_feats: no samples")
        if labels.is_floating_point() or int(labels.min()) < 0:
            raise ValueError(
                f"{name}_labels: expected non-negative integer class labels (flat, unlabelled "
                "folders give -1 and cannot be evaluated)"
            )
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"val_feats: feature width {val_feats.shape[1]} differs from train_feats' "
            f"{train_feats.shape[1]}"
        )
    return int(max(int(train_labels.max()), int(val_labels.max()))) + 1


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(dim=1) == labels).sum()) / labels.shape[0] * 100.0


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (percent) on val of a linear classifier on frozen features.

    Features are standardised with the train set's per-dimension mean and standard deviation
    (MAE's BatchNorm without affine, with fixed statistics), then a linear layer is trained with
    AdamW and a cosine learning-rate decay on shuffled mini-batches, on the CPU. The weight init
    and the shuffling come from a ``torch.Generator`` seeded with ``seed``: equal inputs and seed
    give an equal result.

    Args:
        train_feats: (N, C) training features.
        train_labels: (N,) int labels in ``[0, K)``.
        val_feats: (M, C) validation features.
        val_labels: (M,) int labels.
        epochs: passes over the training features, ``>= 1``.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: mini-batch size (``>= N`` means full batch).
        seed: seed of the init and the shuffling.
    """
    num_classes = _check_features(train_feats, train_labels, val_feats, val_labels)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    x_train = train_feats.detach().float().cpu()
    x_val = val_feats.detach().float().cpu()
    y_train = train_labels.detach().long().cpu()
    y_val = val_labels.detach().long().cpu()
    mean = x_train.mean(dim=0, keepdim=True)
    std = (x_train.var(dim=0, unbiased=False, keepdim=True) + 1e-6).sqrt()
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std

    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        return _top1(head(x_val), y_val)


def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of a cosine-similarity weighted kNN classifier (DINO recipe).

    Features are L2-normalised; each val sample's ``k`` most similar train samples vote for
    their class with weight ``exp(similarity / temperature)``. ``k`` larger than the train set
    is clamped to its size.

    Args:
        train_feats: (N, C) training features.
        train_labels: (N,) int labels in ``[0, K)``.
        val_feats: (M, C) validation features.
        val_labels: (M,) int labels.
        k: neighbours, ``>= 1``.
        temperature: softmax-like temperature of the vote weights, ``> 0``.
        chunk_size: val samples per similarity block (bounds memory to chunk_size x N).
    """
    num_classes = _check_features(train_feats, train_labels, val_feats, val_labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    train = F.normalize(train_feats.detach().float(), dim=1)
    val = F.normalize(val_feats.detach().float().to(train.device), dim=1)
    y_train = train_labels.detach().long().to(train.device)
    y_val = val_labels.detach().long().to(train.device)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, val.shape[0], chunk_size):
        sim = val[start : start + chunk_size] @ train.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, y_train[top_idx], weights)
        correct += int((votes.argmax(dim=1) == y_val[start : start + chunk_size]).sum())
    return correct / val.shape[0] * 100.0


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Evaluate a SparK model by method name
# --------------------------------------------------------------------------------------------


@dataclass
class _EvalContext:
    """What the evaluation methods share; features are extracted once, on first use."""

    model: SparK
    train_loader: Batches
    val_loader: Batches
    device: torch.device
    seed: int
    _features: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_feats, train_labels, val_feats, val_labels)``."""
        if self._features is None:
            fn = spark_feature_fn(self.model)
            train = extract_features(fn, self.train_loader, device=self.device)
            val = extract_features(fn, self.val_loader, device=self.device)
            self._features = (*train, *val)
        return self._features  # type: ignore[return-value]


def _run_linear_probe(ctx: _EvalContext) -> float:
    return linear_probe(*ctx.features(), seed=ctx.seed)


def _run_knn(ctx: _EvalContext) -> float:
    return knn_top1(*ctx.features())


#: Evaluation methods of :func:`evaluate_encoder`; result key is ``f"{name}_top1"``.
EVAL_METHODS: Mapping[str, Callable[[_EvalContext], float]] = MappingProxyType(
    {"linear_probe": _run_linear_probe, "knn": _run_knn}
)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def evaluate_encoder(
    model: SparK,
    train_loader: Batches,
    val_loader: Batches,
    *,
    methods: Sequence[str] = ("linear_probe", "knn"),
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate a SparK model's encoder with each of ``methods`` (see :data:`EVAL_METHODS`).

    ``"linear_probe"`` and ``"knn"`` use dense, globally average-pooled stride-32 features
    (extracted once, eval mode). The model is not modified: every submodule's train/eval flag
    is restored afterwards.

    Args:
        model: the SparK model, already on ``device``.
        train_loader: ``(images (B, 3, H, W), labels (B,))`` batches to fit on (use a
            deterministic transform and ordering for reproducible features).
        val_loader: same, to score on.
        methods: names from :data:`EVAL_METHODS`.
        device: where the images go.
        seed: seed of the probe.

    Returns:
        ``{f"{method}_top1": accuracy in percent}`` in the order of ``methods``.
    """
    if isinstance(methods, str):
        methods = (methods,)
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"methods={tuple(methods)!r}: unknown or empty; allowed values are "
            f"{', '.join(EVAL_METHODS)}"
        )
    device = torch.device(device)
    model_device = _model_device(model)
    if not _same_device(model_device, device):
        raise ValueError(
            f"device={str(device)!r} but the model is on {model_device}; move it first "
            f"(model.to({str(device)!r})) or pass device={str(model_device)!r}"
        )
    ctx = _EvalContext(model, train_loader, val_loader, device, seed)
    results: dict[str, float] = {}
    with _eval_mode(model):
        for method in dict.fromkeys(methods):
            results[f"{method}_top1"] = EVAL_METHODS[method](ctx)
            logger.info("evaluate_encoder: %s top-1 %.2f%%", method, results[f"{method}_top1"])
    return results
