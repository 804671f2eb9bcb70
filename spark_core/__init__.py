"""spark_core: a faithful, fast SparK (sparse masked image modelling) library for timm CNNs.

Public entry points::

    from spark_core import build_spark
    model = build_spark("resnet18", 96)
    out = model(images)            # out.loss, out.pred, out.active

The names below load their module on first use (PEP 562), so ``import spark_core.data`` or
``spark_core.checkpoint`` does not import timm and the model: a job driver that only ships
a spec to its workers starts faster.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spark_core.backbones import BACKBONE_FAMILIES, resolve_family
    from spark_core.masking import MaskContext, random_mask, upsample_mask
    from spark_core.model import SparK, SparKConfig, SparKOutput, build_spark

_EXPORTS = MappingProxyType(
    {
        "BACKBONE_FAMILIES": "spark_core.backbones",
        "resolve_family": "spark_core.backbones",
        "MaskContext": "spark_core.masking",
        "random_mask": "spark_core.masking",
        "upsample_mask": "spark_core.masking",
        "SparK": "spark_core.model",
        "SparKConfig": "spark_core.model",
        "SparKOutput": "spark_core.model",
        "build_spark": "spark_core.model",
    }
)

__all__ = [
    "BACKBONE_FAMILIES",
    "MaskContext",
    "SparK",
    "SparKConfig",
    "SparKOutput",
    "build_spark",
    "random_mask",
    "resolve_family",
    "upsample_mask",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spark_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
