"""The official fine-tuning recipe's facts (keyu-tian/SparK downstream_imagenet; sources in
docs/finetune-recipe.md): the per-backbone table, layer ids and lr scales of layer-wise
decay, the no-weight-decay rule, and the schedule's values."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from spark_core.finetune import (
    FINETUNE_RECIPES,
    finetune_lr,
    finetune_param_groups,
    finetune_recipe,
    layer_id,
)


def meta_model(name: str) -> torch.nn.Module:
    """The timm network without allocating its weights (names and shapes are all we need)."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def test_resnet50_row_is_the_official_one() -> None:
    recipe, row = finetune_recipe("resnet50")
    assert row == "resnet50"
    fields = (
        recipe.batch_size, recipe.epochs, recipe.warmup_epochs, recipe.optimizer,
        recipe.base_lr, recipe.lr_scale, recipe.weight_decay, recipe.mixup, recipe.rep_aug,
        recipe.drop_path, recipe.ema_decay,
    )  # fmt: skip
    assert fields == (2048, 300, 5, "lamb", 0.002, 0.7, 0.02, 0.1, 0, 0.05, 0.9999)
    assert recipe.peak_lr() == pytest.approx(0.016)  # 0.002 x 2048 / 256
    assert (recipe.cutmix, recipe.mixup_switch_prob, recipe.label_smoothing) == (1.0, 0.5, 0.1)


def test_rows_by_name_tag_size_and_family() -> None:
    assert finetune_recipe("resnet50.a1_in1k")[1] == "resnet50"
    assert finetune_recipe("convnext_large", 384)[1] == "convnext_large_384"
    assert finetune_recipe("convnext_large", 384)[0].ema_decay == 0.99995
    assert finetune_recipe("convnext_large")[1] == "convnext_large"
    # No official row: the family's, and the caller sees which.
    assert finetune_recipe("resnet18")[1] == "resnet50"
    assert finetune_recipe("convnext_atto")[1] == "convnext_small"
    assert {r.optimizer for n, r in FINETUNE_RECIPES.items() if n.startswith("convnext")} == {
        "adamw"
    }
    with pytest.raises(ValueError, match="not a supported backbone"):
        finetune_recipe("vit_base_patch16_224")


@pytest.mark.parametrize(
    ("name", "last"), [("resnet50", 6), ("resnet101", 12), ("resnet152", 13), ("resnet200", 17)]
)
def test_resnet_depths_have_the_official_number_of_layers(name: str, last: int) -> None:
    model = meta_model(name)
    ids = {layer_id(n, model, name) for n, _ in model.named_parameters()}
    assert {n for _, n in ids} == {last}
    assert {i for i, _ in ids} == set(range(last + 2))  # 0 (stem) .. N + 1 (classifier)


def test_resnet50_groups_scale_and_decay_as_the_reference() -> None:
    model = meta_model("resnet50")
    groups = finetune_param_groups(model, "resnet50", lr_scale=0.7, weight_decay=0.02)
    by_name = {name: group for group in groups for name in group["names"]}
    expected_ids = {
        "conv1.weight": 0,
        "bn1.weight": 0,
        "layer1.2.conv3.weight": 1,
        "layer2.0.downsample.0.weight": 2,
        "layer2.3.conv1.weight": 3,  # 2 + 3 // 2
        "layer3.0.conv1.weight": 4,  # 2 + N2 (2) + 0 // 3
        "layer3.5.bn2.bias": 5,  # 2 + 2 + 5 // 3
        "layer4.2.conv3.weight": 6,
        "fc.weight": 7,
    }
    for name, expected in expected_ids.items():
        assert by_name[name]["layer_id"] == expected, name
        assert by_name[name]["lr_scale"] == pytest.approx(0.7 ** (7 - expected)), name
    assert by_name["conv1.weight"]["lr_scale"] == pytest.approx(0.0823543)
    assert by_name["fc.weight"]["lr_scale"] == 1.0
    # Weight decay on conv and linear weights only.
    assert by_name["layer1.2.conv3.weight"]["weight_decay"] == 0.02
    assert by_name["fc.weight"]["weight_decay"] == 0.02
    for name in ("bn1.weight", "layer3.5.bn2.bias", "fc.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_convnext_small_groups_scale_and_decay_as_the_reference() -> None:
    model = meta_model("convnext_small")
    groups = finetune_param_groups(model, "convnext_small", lr_scale=0.7, weight_decay=0.01)
    by_name = {name: group for group in groups for name in group["names"]}
    expected_ids = {
        "stem.0.weight": 0,
        "stages.0.blocks.2.conv_dw.weight": 1,
        "stages.1.downsample.1.weight": 2,
        "stages.1.blocks.0.mlp.fc1.weight": 2,
        "stages.2.downsample.1.weight": 3,
        "stages.2.blocks.2.mlp.fc1.weight": 3,
        "stages.2.blocks.3.mlp.fc1.weight": 4,
        "stages.2.blocks.26.mlp.fc2.weight": 11,  # 3 + 26 // 3
        "stages.3.downsample.1.weight": 12,
        "stages.3.blocks.2.mlp.fc2.weight": 12,
        "head.norm.weight": 13,
        "head.fc.weight": 13,
    }
    for name, expected in expected_ids.items():
        assert by_name[name]["layer_id"] == expected, name
        assert by_name[name]["lr_scale"] == pytest.approx(0.7 ** (13 - expected)), name
    assert by_name["stem.0.weight"]["lr_scale"] == pytest.approx(0.7**13)
    # Layer scales (gamma), norms and biases take no weight decay.
    for name in ("stages.0.blocks.0.gamma", "head.norm.weight", "head.fc.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["stages.2.blocks.3.mlp.fc1.weight"]["weight_decay"] == 0.01


def test_frozen_parameters_are_left_out() -> None:
    model = meta_model("resnet50")
    model.fc.weight.requires_grad_(False)
    groups = finetune_param_groups(model, "resnet50", lr_scale=0.7, weight_decay=0.02)
    assert "fc.weight" not in {name for group in groups for name in group["names"]}


def test_schedule_values() -> None:
    peak, warmup, total = 0.016, 10, 111
    assert finetune_lr(0, warmup, total, peak) == pytest.approx(0.005 * peak)
    assert finetune_lr(5, warmup, total, peak) == pytest.approx(
        0.005 * peak + 0.995 * peak * 5 / 10
    )
    assert finetune_lr(warmup, warmup, total, peak) == pytest.approx(peak)
    assert finetune_lr(total - 1, warmup, total, peak) == pytest.approx(0.001 * peak)
    middle = warmup + (total - 1 - warmup) // 2  # half-way through the cosine
    assert finetune_lr(middle, warmup, total, peak) == pytest.approx(
        0.001 * peak + 0.999 * peak * (0.5 + 0.5 * math.cos(math.pi * 0.5))
    )
    values = [finetune_lr(s, warmup, total, peak) for s in range(total)]
    assert values[:warmup] == sorted(values[:warmup])  # rising warm-up
    assert values[warmup:] == sorted(values[warmup:], reverse=True)  # falling cosine
    # Fractional warm-up epochs round to whole steps, as the reference does.
    assert finetune_lr(2, 2.4, total, peak) == pytest.approx(peak)
