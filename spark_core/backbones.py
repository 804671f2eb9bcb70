"""Backbone families SparK supports, and the sparse encoder built from a timm model.

The encoder is an unmodified timm network (``timm.create_model``), read through
timm's feature API (``feature_info`` and ``forward_intermediates``), made sparse
by :func:`spark_core.sparse.sparsify_`. Its state-dict keys are timm's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from timm.models import split_model_name_tag
from torch import nn

from spark_core.masking import MaskContext
from spark_core.sparse import sparsify_

# Feature strides SparK decodes from, largest map first.
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
# Children of a timm model that the feature path never runs (classifier parts).
HEAD_CHILDREN: frozenset[str] = frozenset({"head", "global_pool", "fc", "classifier", "norm"})


@dataclass(frozen=True)
class BackboneFamily:
    """A family of timm models with the recipe defaults the reference uses for it."""

    name: str
    prefixes: tuple[str, ...]
    densify_norm: str
    lamb_betas: tuple[float, float]
    examples: str


BACKBONE_FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        name="resnet",
        prefixes=("resnet", "resnext", "wide_resnet", "seresnet", "seresnext"),
        densify_norm="bn",
        lamb_betas=(0.9, 0.95),
        examples="resnet18, resnet50, resnet50d, resnext50_32x4d, wide_resnet50_2, seresnet50",
    ),
    BackboneFamily(
        name="convnext",
        prefixes=("convnext",),
        densify_norm="ln",
        lamb_betas=(0.9, 0.999),
        examples="convnext_atto ... convnext_xlarge, convnextv2_*",
    ),
)


def supported_families_text() -> str:
    return "; ".join(
        f"{family.name}: names starting with {', '.join(p + '*' for p in family.prefixes)} "
        f"(e.g. {family.examples})"
        for family in BACKBONE_FAMILIES
    )


def resolve_family(backbone: str) -> BackboneFamily:
    """The family of a timm model name.

    Raises:
        ValueError: the name is not a timm model of a supported family; lists the families.
    """
    family = next(
        (f for f in BACKBONE_FAMILIES if any(backbone.startswith(p) for p in f.prefixes)), None
    )
    if family is None or not _is_timm_name(backbone):
        reason = "is not a supported backbone" if family is None else "is not a timm model name"
        raise ValueError(
            f"backbone={backbone!r} {reason}. Supported families: {supported_families_text()}. "
            "See timm.list_models('resnet*') / timm.list_models('convnext*') for exact names."
        )
    return family


def _is_timm_name(backbone: str) -> bool:
    """An architecture name, or one with a pretrained tag ("resnet50.a1_in1k": same network)."""
    architecture, tag = split_model_name_tag(backbone)
    if tag:
        return backbone in timm.list_models(architecture, pretrained=True)
    return backbone in timm.list_models()


class SparseEncoder(nn.Module):
    """A timm backbone returning its stride-4/8/16/32 feature maps, sparse when asked.

    Attributes:
        model: the timm model (classifier pruned); its ``state_dict`` uses timm's keys.
        channels: feature channels, largest map first (ResNet-50: 256, 512, 1024, 2048).
        stride: total stride of the last map (32), the SparK patch size.
    """

    def __init__(
        self,
        backbone: str,
        *,
        sparse: bool,
        mask_context: MaskContext,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        resolve_family(backbone)
        model = timm.create_model(
            backbone, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate
        )
        indices = _feature_indices(model, backbone)
        full_keys = model.state_dict()
        model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        # Parts pruned for pre-training (e.g. ConvNeXt's head norm) at timm's own init, so an
        # exported encoder still loads into timm with only the classifier missing.
        kept = set(model.state_dict())
        self.pruned_state: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in full_keys.items() if k not in kept
        }
        if sparse:
            model = sparsify_(model, mask_context, skip=HEAD_CHILDREN)
        self.model = model
        self.backbone = backbone
        self.sparse = sparse
        self.feature_indices = indices
        self.channels = [model.feature_info[i]["num_chs"] for i in indices]
        self.stride = FEATURE_STRIDES[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) masked images -> feature maps at strides 4, 8, 16, 32 (largest first)."""
        return self.model.forward_intermediates(
            x, indices=self.feature_indices, intermediates_only=True, stop_early=True
        )


def _feature_indices(model: nn.Module, backbone: str) -> list[int]:
    reductions = [info["reduction"] for info in model.feature_info]
    indices = [reductions.index(s) for s in FEATURE_STRIDES if s in reductions]
    if len(indices) != len(FEATURE_STRIDES):
        raise ValueError(
            f"backbone={backbone!r} has feature strides {reductions}; SparK needs maps at "
            f"strides {list(FEATURE_STRIDES)}"
        )
    return indices
