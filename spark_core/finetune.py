"""The paper's downstream protocol: the official ImageNet fine-tuning recipe, on timm models.

Facts from keyu-tian/SparK ``downstream_imagenet`` (``arg.py``, ``lr_decay.py``,
``models/__init__.py``, ``util.py``; see ``docs/finetune-recipe.md`` for sources and line
numbers), written here for timm's own ResNet and ConvNeXt parameter names:

* :data:`FINETUNE_RECIPES`: the per-backbone table (global batch, epochs, warm-up, optimiser,
  base lr, layer decay, weight decay, mixup, repeated augmentation, drop path, EMA decay);
  :func:`finetune_recipe` picks a backbone's row, or the nearest one of its family.
* :func:`layer_id`: the official layer ids for layer-wise lr decay;
  :func:`finetune_param_groups` the parameter groups with their ``lr_scale`` and weight decay.
* :func:`finetune_lr`: the per-iteration learning rate (linear warm-up from 0.005 x peak, then
  cosine to 0.001 x peak); weight decay is constant.
* timm's building blocks set up as the reference does: :func:`train_transform` and
  :func:`eval_transform`, :func:`build_mixup` (Mixup/CutMix with label smoothing),
  :func:`build_criterion` (BCE for LAMB, soft-target CE for AdamW) and
  :func:`build_finetune_optimizer` (timm ``Lamb``/``AdamW`` with the reference's arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AutoAugment
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.models import split_model_name_tag
from timm.optim import Lamb
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from spark_core.backbones import resolve_family

# The learning rate is linear in the global batch: peak = base_lr x batch / LR_BATCH_DIVISOR.
LR_BATCH_DIVISOR = 256
# Warm-up starts at this fraction of the peak; the cosine ends at the other (util.py).
WARMUP_START_FRACTION = 0.005
FINAL_LR_FRACTION = 0.001
# Names that never take weight decay besides 1-D parameters and biases (ConvNeXt's layer
# scale is ``gamma``; the others are ViT-style tokens, kept for parity with the reference).
NO_DECAY_NAME_PARTS = ("cls_token", "pos_embed", "mask_token", "gamma")
# Evaluation crops the centre 95 % after a bicubic resize (data.py); from this size on the
# reference squashes to a square instead, and keeps timm's AutoAugment for training.
EVAL_CROP_PCT = 0.95
LARGE_INPUT = 384
# The reference's RandomErasing: after normalisation, per-pixel noise, one box (data.py).
RANDOM_ERASING = MappingProxyType({"re_prob": 0.25, "re_mode": "pixel", "re_count": 1})
# timm Lamb as util.py builds it: no clipping inside (1e7), trust ratio on every group,
# no bias correction; betas and eps are timm's defaults.
LAMB_ARGS = MappingProxyType({"max_grad_norm": 1e7, "always_adapt": True, "bias_correction": False})
OPTIMIZER_NAMES = ("lamb", "adamw")


@dataclass(frozen=True)
class FinetuneRecipe:
    """One row of the official table, plus the settings every row shares.

    Attributes:
        batch_size: global batch (all ranks together).
        epochs, warmup_epochs: schedule length, in epochs.
        optimizer: "lamb" (BCE loss on mixed targets) or "adamw" (soft-target cross-entropy).
        base_lr: lr per 256 images; see :meth:`peak_lr`.
        lr_scale: layer-wise decay, the lr of layer ``i`` is scaled by
            ``lr_scale ** (N + 1 - i)``.
        weight_decay: constant (not scheduled), none on 1-D parameters and biases.
        mixup: mixup alpha (CutMix alpha is ``cutmix``, switching half of the time).
        rep_aug: repeated-augmentation count (timm ``RepeatAugSampler``); 0 = off.
        drop_path: stochastic depth of the fine-tuned network.
        ema_decay: decay of the weights' EMA, evaluated beside the model.
        input_size: training and evaluation resolution.
    """

    batch_size: int
    epochs: int
    warmup_epochs: float
    optimizer: str
    base_lr: float
    lr_scale: float
    weight_decay: float
    mixup: float
    rep_aug: int
    drop_path: float
    ema_decay: float
    input_size: int = 224
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    clip_grad: float = 0.0  # the reference never clips while fine-tuning

    def peak_lr(self, global_batch: int | None = None) -> float:
        """``base_lr x global batch / 256`` (the recipe's batch when none is given)."""
        return self.base_lr * (global_batch or self.batch_size) / LR_BATCH_DIVISOR


def _row(
    batch: int,
    epochs: int,
    warmup: float,
    optimizer: str,
    base_lr: float,
    lr_scale: float,
    wd: float,
    mixup: float,
    rep_aug: int,
    drop_path: float,
    ema: float,
    input_size: int = 224,
) -> FinetuneRecipe:
    # The column order of the reference's table (arg.py HP_DEFAULT_NAMES).
    return FinetuneRecipe(
        batch, epochs, warmup, optimizer, base_lr, lr_scale, wd, mixup, rep_aug, drop_path, ema,
        input_size,
    )  # fmt: skip


# keyu-tian/SparK downstream_imagenet/arg.py, HP_DEFAULT_VALUES (its "adam" is AdamW).
FINETUNE_RECIPES: MappingProxyType[str, FinetuneRecipe] = MappingProxyType(
    {
        "resnet50": _row(2048, 300, 5, "lamb", 2e-3, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),
        "resnet101": _row(2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
        "resnet152": _row(2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
        "resnet200": _row(2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
        "convnext_small": _row(4096, 400, 20, "adamw", 2e-4, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),
        "convnext_base": _row(4096, 400, 20, "adamw", 1e-4, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),
        "convnext_large": _row(4096, 200, 10, "adamw", 1e-4, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),
        "convnext_large_384": _row(
            1024, 200, 20, "adamw", 6e-5, 0.7, 0.01, 0.8, 3, 0.5, 0.99995, input_size=384
        ),
    }
)
# The row a backbone without its own row takes, per family (the smallest official model).
FAMILY_DEFAULT_ROW = MappingProxyType({"resnet": "resnet50", "convnext": "convnext_small"})


def finetune_recipe(backbone: str, input_size: int = 224) -> tuple[FinetuneRecipe, str]:
    """The official recipe of ``backbone`` at ``input_size``, and the table row it came from.

    A backbone without its own row takes its family's (``resnet18`` -> ``resnet50``,
    ``convnext_tiny`` -> ``convnext_small``); compare the returned row name with the backbone
    to tell the user so. ConvNeXt-L at 384 px has a row of its own.

    Raises:
        ValueError: not a backbone of a supported family (see :func:`resolve_family`).
    """
    family = resolve_family(backbone)
    architecture, _ = split_model_name_tag(backbone)
    row = architecture if architecture in FINETUNE_RECIPES else FAMILY_DEFAULT_ROW[family.name]
    if f"{row}_{input_size}" in FINETUNE_RECIPES:
        row = f"{row}_{input_size}"
    return FINETUNE_RECIPES[row], row


# ----------------------------------------------------------------------- layer-wise lr decay


def _resnet_blocks_per_id(model: nn.Module) -> tuple[int, int]:
    """Blocks of stages 2 and 3 that share one layer id: (2, 3) for ResNet-50/101, (4, 4)
    for ResNet-152/200 (36 blocks in stage 3); other depths follow the nearer of the two."""
    return (4, 4) if len(model.layer3) >= 36 else (2, 3)


def _resnet_layer_id(name: str, model: nn.Module) -> tuple[int, int]:
    blk2, blk3 = _resnet_blocks_per_id(model)
    n2 = math.ceil(len(model.layer2) / blk2 - 1e-5)
    n3 = math.ceil(len(model.layer3) / blk3 - 1e-5)
    last = 2 + n2 + n3
    parts = name.split(".")
    if parts[0] == "layer1":
        return 1, last
    if parts[0] == "layer2":
        return 2 + int(parts[1]) // blk2, last
    if parts[0] == "layer3":
        return 2 + n2 + int(parts[1]) // blk3, last
    if parts[0] == "layer4":
        return last, last
    if parts[0] == "fc":
        return last + 1, last
    return 0, last  # the stem (conv1, bn1)


def _convnext_layer_id(name: str, model: nn.Module) -> tuple[int, int]:
    last = 12 if len(model.stages[2].blocks) > 9 else 6
    parts = name.split(".")
    if parts[0] == "stem":
        return 0, last
    if parts[0] != "stages":
        return last + 1, last  # the head's norm and classifier
    stage = int(parts[1])
    if stage == 3:
        return last, last
    if parts[2] == "downsample" or stage < 2:
        return stage + 1, last
    return 3 + int(parts[3]) // 3, last  # stage 2: three blocks per id


def layer_id(name: str, model: nn.Module, backbone: str) -> tuple[int, int]:
    """``(layer id, N)`` of a parameter of a timm ResNet or ConvNeXt, by the official rules.

    Ids run from 0 (the stem) to N (the last stage); the classifier is N + 1, so its lr is not
    scaled. ResNet: ``layer1`` 1, ``layer2`` and ``layer3`` blocks grouped 2/3 (4/4 for
    ResNet-152/200) per id, ``layer4`` N; ConvNeXt: stage 0 1, stage 1 2, stage 2 three blocks
    per id, stage 3 N, with N = 12 when stage 2 has more than 9 blocks (S/B/L) else 6.
    """
    if resolve_family(backbone).name == "resnet":
        return _resnet_layer_id(name, model)
    return _convnext_layer_id(name, model)


def takes_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Conv and linear weights do; 1-D parameters, biases and layer scales do not."""
    return not (
        param.ndim == 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAME_PARTS)
    )


def finetune_param_groups(
    model: nn.Module, backbone: str, *, lr_scale: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimiser parameter groups of the official recipe, one per (layer id, decay or not).

    Each group carries ``lr_scale`` (multiply the scheduled lr by it) and its constant
    ``weight_decay`` (0 for the no-decay groups), and, for inspection, ``layer_id`` and the
    parameter ``names``. Frozen parameters are left out.
    """
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index, last = layer_id(name, model, backbone)
        decay = takes_weight_decay(name, param)
        group = groups.setdefault(
            (index, decay),
            {
                "params": [],
                "names": [],
                "layer_id": index,
                "lr_scale": lr_scale ** (last + 1 - index),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


# ---------------------------------------------------------------------------- schedule


def finetune_lr(step: int, warmup_steps: float, total_steps: int, peak_lr: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based), before each group's scale.

    Linear warm-up from ``0.005 x peak`` over ``round(warmup_steps)`` steps, then a cosine from
    the peak to exactly ``0.001 x peak`` at the last step (``total_steps - 1``).
    """
    warmup = round(warmup_steps)
    if step < warmup:
        start = WARMUP_START_FRACTION * peak_lr
        return start + (peak_lr - start) * step / warmup
    progress = (step - warmup) / max(total_steps - 1 - warmup, 1)
    final = FINAL_LR_FRACTION * peak_lr
    return final + (peak_lr - final) * (0.5 + 0.5 * math.cos(math.pi * progress))


# ------------------------------------------------------------------- timm building blocks


def train_transform(input_size: int) -> transforms.Compose:
    """The reference's training transform, PIL image -> normalised ``(3, S, S)`` tensor.

    timm's ImageNet training pipeline: RandomResizedCrop (scale 0.08-1, bicubic), horizontal
    flip, AutoAugment ``v0`` -- replaced by torchvision's ``TrivialAugmentWide`` (bicubic)
    below 384 px --, normalisation, RandomErasing (p 0.25, pixel mode). No colour jitter
    (timm skips it when auto-augmenting).
    """
    pipeline = create_transform(
        input_size,
        is_training=True,
        auto_augment="v0",
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        **RANDOM_ERASING,
    )
    if input_size < LARGE_INPUT:
        pipeline.transforms = [
            transforms.TrivialAugmentWide(interpolation=InterpolationMode.BICUBIC)
            if isinstance(t, AutoAugment)
            else t
            for t in pipeline.transforms
        ]
    return pipeline


def eval_transform(input_size: int) -> transforms.Compose:
    """The reference's evaluation transform, PIL image -> normalised ``(3, S, S)`` tensor.

    Below 384 px: bicubic resize of the shorter side to ``floor(S / 0.95)`` (224 -> 235),
    centre crop ``S``. From 384 px: bicubic resize to ``(S, S)``, no crop.
    """
    if input_size < LARGE_INPUT:
        return create_transform(
            input_size, is_training=False, interpolation="bicubic", crop_pct=EVAL_CROP_PCT
        )
    return transforms.Compose(
        [
            transforms.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def build_mixup(recipe: FinetuneRecipe, num_classes: int) -> Mixup:
    """timm ``Mixup`` with the reference's settings: every batch mixed, CutMix (alpha
    ``recipe.cutmix``) half of the time, Mixup (alpha ``recipe.mixup``) otherwise, one lambda
    per batch, label smoothing ``recipe.label_smoothing``. With ``mixup == 0`` the batch is not
    mixed but the targets are still smoothed one-hot vectors, as in the reference.

    Call it on an even batch (see :func:`even_batch`); targets come back ``(B, num_classes)``.
    """
    mixup = Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        mode="batch",
        label_smoothing=recipe.label_smoothing,
        num_classes=num_classes,
    )
    mixup.mixup_enabled = recipe.mixup > 0.0
    return mixup


def even_batch(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An odd batch gets its first sample prepended (the reference's ``BatchMixup``): batch
    mixing pairs sample ``i`` with ``B - 1 - i`` and needs an even ``B``."""
    if images.shape[0] % 2 == 0:
        return images, labels
    return torch.cat((images[:1], images)), torch.cat((labels[:1], labels))


def build_criterion(recipe: FinetuneRecipe) -> nn.Module:
    """The loss on mixed soft targets: binary cross-entropy (mean over ``B x classes``) for
    the LAMB recipes, soft-target cross-entropy for the AdamW ones. Smoothing is already in
    the targets (:func:`build_mixup`), so the BCE adds none."""
    if recipe.optimizer == "lamb":
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=None)
    return SoftTargetCrossEntropy()


def build_finetune_optimizer(
    groups: list[dict[str, Any]], recipe: FinetuneRecipe
) -> torch.optim.Optimizer:
    """timm ``Lamb`` (:data:`LAMB_ARGS`) or torch ``AdamW`` (timm 0.5.4's ``AdamW``, which the
    reference used, is the same algorithm with betas (0.9, 0.999), eps 1e-8) over the groups of
    :func:`finetune_param_groups`; the engine writes each group's lr every step."""
    if recipe.optimizer not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer={recipe.optimizer!r}: use one of {', '.join(OPTIMIZER_NAMES)}")
    plain = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if recipe.optimizer == "lamb":
        return Lamb(plain, lr=0.0, weight_decay=0.0, **LAMB_ARGS)
    return torch.optim.AdamW(plain, lr=0.0, weight_decay=0.0, foreach=True)


__all__ = [
    "FINETUNE_RECIPES",
    "FinetuneRecipe",
    "build_criterion",
    "build_finetune_optimizer",
    "build_mixup",
    "eval_transform",
    "even_batch",
    "finetune_lr",
    "finetune_param_groups",
    "finetune_recipe",
    "layer_id",
    "takes_weight_decay",
    "train_transform",
]
