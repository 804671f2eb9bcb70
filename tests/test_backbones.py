"""Every supported timm family builds, and each kind of layer stays sparse-correct."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import perturb_norms_and_biases_

from spark_core import build_spark
from spark_core.backbones import BACKBONE_FAMILIES
from spark_core.masking import upsample_mask

ALL_NAMES = sorted(
    {n for family in BACKBONE_FAMILIES for p in family.prefixes for n in timm.list_models(p + "*")}
)

# One small model per distinct set of layer types (stems, SE, GN, FRN, EvoNorm, blur,
# anti-aliasing, pre-activation, BYOB blocks, ConvNeXt v1/v2 norms and MLPs).
REPRESENTATIVES = (
    "resnet18d",
    "resnet26t",
    "resnetaa34d",
    "resnetblur18",
    "seresnet18",
    "resnet50_gn",
    "resnetrs50",
    "resnext26ts",
    "seresnext26ts",
    "resnetv2_18",
    "resnetv2_50x1_bit",
    "resnetv2_50d_evos",
    "resnetv2_50d_frn",
    "resnet50_clip",
    "convnext_atto_ols",
    "convnext_atto_rms",
    "convnext_zepto_rms",
    "convnextv2_atto",
)


@pytest.mark.slow
def test_every_family_member_builds() -> None:
    assert len(ALL_NAMES) > 100
    for name in ALL_NAMES:
        with torch.device("meta"):
            model = build_spark(name, 64, decoder_width=64)
        assert len(model.encoder.channels) == 4, name


def _masked(feature: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return feature.masked_fill(upsample_mask(active, tuple(feature.shape[2:])), 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_layer_kinds_stay_sparse_correct(name: str) -> None:
    torch.manual_seed(0)
    model = perturb_norms_and_biases_(build_spark(name, 64, decoder_width=64)).train()
    twin = copy.deepcopy(model)
    images = torch.randn(3, 3, 64, 64)
    active = model.generate_mask(3)
    active[2] = True
    pixel_mask = upsample_mask(active, (64, 64))
    changed = torch.where(pixel_mask, images, 50 * torch.randn_like(images))
    features = model.encode(images, active)
    for feature, other in zip(features, twin.encode(changed, active), strict=True):
        assert torch.count_nonzero(_masked(feature, active)) == 0
        torch.testing.assert_close(feature, other, rtol=1e-5, atol=1e-5)

    dense = timm.create_model(name, num_classes=0).eval()
    dense.load_state_dict(model.encoder.model.state_dict(), strict=False)
    model.eval()
    all_visible = torch.ones(3, 1, 2, 2, dtype=torch.bool)
    ours = model.encode(images, all_visible)
    theirs = dense.forward_intermediates(
        images, indices=model.encoder.feature_indices, intermediates_only=True
    )
    for a, b in zip(ours, theirs, strict=True):
        # Deep GN/StdConv stacks accumulate float rounding differently: compare to scale.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
