"""Facts of the reference pre-training recipe that need no model code (nor timm): what a job
driver reads while it records its spec, before its workers build anything."""

from __future__ import annotations

from types import MappingProxyType

# Stochastic depth of the reference pre-training recipe, per architecture (keyu-tian/SparK,
# pretrain/README and scripts); every other backbone pre-trains without drop path.
REFERENCE_DROP_PATH = MappingProxyType(
    {
        "resnet50": 0.05,
        "resnet101": 0.08,
        "resnet152": 0.10,
        "resnet200": 0.15,
        "convnext_small": 0.2,
        "convnext_base": 0.3,
        "convnext_large": 0.4,
    }
)


def reference_drop_path(backbone: str) -> float:
    """The reference recipe's pre-training drop-path rate of ``backbone`` (0 when it has none).

    A pretrained tag names the same network: ``resnet50.a1_in1k`` -> 0.05 (timm's names
    carry their tag after the first dot, as ``timm.models.split_model_name_tag`` reads them).
    """
    architecture = backbone.split(".", 1)[0]
    return REFERENCE_DROP_PATH.get(architecture, 0.0)
