"""spark_core: a faithful, fast SparK (sparse masked image modelling) library for timm CNNs.

Public entry points::

    from spark_core import build_spark
    model = build_spark("resnet18", 96)
    out = model(images)            # out.loss, out.pred, out.active
"""

from spark_core.backbones import BACKBONE_FAMILIES, resolve_family
from spark_core.masking import MaskContext, random_mask, upsample_mask
from spark_core.model import SparK, SparKConfig, SparKOutput, build_spark

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
