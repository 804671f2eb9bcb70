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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from timm.models import split_model_name_tag
from torch import nn

from spark_core.backbones import resolve_family

# The learning rate is linear in the global batch: peak = base_lr x batch / LR_BATCH_DIVISOR.
LR_BATCH_DIVISOR = 256
# Warm-up starts at this fraction of the peak; the cosine ends at the other (util.py).
WARMUP_START_FRACTION = 0.005
FINAL_LR_FRACTION = 0.001
# Names that never take weight decay besides 1-D parameters and biases (ConvNeXt's layer
# scale is ``gamma``; the others are ViT-style tokens, kept for parity with the reference).
NO_DECAY_NAME_PARTS = ("cls_token", "pos_embed", "mask_token", "gamma")


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


__all__ = [
    "FINETUNE_RECIPES",
    "FinetuneRecipe",
    "finetune_lr",
    "finetune_param_groups",
    "finetune_recipe",
    "layer_id",
    "takes_weight_decay",
]
