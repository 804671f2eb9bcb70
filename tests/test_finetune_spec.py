"""The fine-tuning job's spec: field-path errors, the recipe's defaults from the official
table, weight sources inside the data roots, and every example spec file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.kinds import detect_kind, get_kind
from orchestrator.specs import FinetuneSpec, SpecError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPEC: dict[str, Any] = {
    "model": {"backbone": "resnet18", "input_size": 64},
    "weights": {"kind": "none"},
    "data": {"train": {"kind": "synthetic", "count": 32, "size": 64, "classes": 2}},
}


def parse(data: dict[str, Any], roots: list[Path] | None = None) -> FinetuneSpec:
    return get_kind("finetune").parse(data, data_roots=roots or [])


def errors(data: dict[str, Any], roots: list[Path] | None = None) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse(data, roots)
    return dict(info.value.errors)


def test_omitted_recipe_fields_take_the_official_row() -> None:
    recipe, row = parse(SPEC).effective_recipe()
    assert row == "resnet50"  # resnet18 has no row of its own: resnet50's, and it says so
    assert (recipe.batch_size, recipe.epochs, recipe.optimizer, recipe.base_lr) == (
        2048, 300, "lamb", 2e-3,
    )  # fmt: skip
    assert recipe.input_size == 64
    convnext = parse({**SPEC, "model": {"backbone": "convnext_large", "input_size": 384}})
    recipe, row = convnext.effective_recipe()
    assert row == "convnext_large_384" and recipe.ema_decay == 0.99995
    overridden = parse({**SPEC, "recipe": {"epochs": 3, "mixup": 0.0}})
    recipe, _ = overridden.effective_recipe()
    assert (recipe.epochs, recipe.mixup, recipe.lr_scale) == (3, 0.0, 0.7)
    params = overridden.flat_params()
    assert params["recipe.epochs"] == "3" and params["recipe.table_row"] == "resnet50"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"weights": None}, "weights", ""),
        ({"weights": {"kind": "nope"}}, "weights", "pretrain_job"),
        ({"weights": {"kind": "mlflow_run", "run_id": "x"}}, "weights.mlflow_run.run_id", ""),
        ({"weights": {"kind": "file", "path": "enc.bin"}}, "weights.file.path", ".safetensors"),
        ({"recipe": {"lr": 0.1}}, "recipe.lr", "Extra inputs"),
        ({"recipe": {"base_lr": -1}}, "recipe.base_lr", "greater than 0"),
        ({"recipe": {"optimizer": "sgd"}}, "recipe.optimizer", ""),
        (
            {"recipe": {"batch_size": 2}, "resources": {"num_workers": 4}},
            "recipe.batch_size",
            "num_workers=4",
        ),
        (
            {"data": {"train": {"kind": "synthetic", "classes": 1}}},
            "data.train.classes",
            "2 or more",
        ),
        ({"model": {"backbone": "vit_base_patch16_224"}}, "model.backbone", "supported"),
        ({"evaluation": {"method": "knn"}}, "evaluation", "Extra inputs"),
    ],
)
def test_bad_fields_are_named(change: dict[str, Any], field: str, message: str) -> None:
    data = {**SPEC, **change}
    if change.get("weights", 1) is None:
        del data["weights"]
    found = errors(data)
    assert field in found, found
    assert message in found[field]


def test_weight_files_must_lie_under_a_data_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "enc.pth").write_bytes(b"")
    ok = parse({**SPEC, "weights": {"kind": "file", "path": "ckpt/enc.pth"}}, [root])
    assert ok.weights.path == str(root / "ckpt" / "enc.pth")
    (tmp_path / "outside.pth").write_bytes(b"")
    for path in (str(tmp_path / "outside.pth"), "../outside.pth", "ckpt/missing.pth"):
        found = errors({**SPEC, "weights": {"kind": "file", "path": path}}, [root])
        assert "weights.file.path" in found, path
    link = root / "link.pth"
    link.symlink_to(tmp_path / "outside.pth")
    assert (
        "outside the allowed"
        in errors({**SPEC, "weights": {"kind": "file", "path": "link.pth"}}, [root])[
            "weights.file.path"
        ]
    )


def test_the_old_one_epoch_finetune_evaluation_is_gone() -> None:
    pretrain = get_kind("pretrain")
    with pytest.raises(SpecError) as info:
        pretrain.parse(
            {"data": {"train": {"kind": "synthetic"}}, "evaluation": {"method": "finetune"}},
            data_roots=[],
        )
    assert "evaluation.method" in dict(info.value.errors)


def test_every_example_validates_as_its_kind(tmp_path: Path) -> None:
    for folder in ("imagenet/train", "imagenet/val", "imagenet100/train", "imagenet100/val"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet50_1kpretrained_timm_style.pth").write_bytes(b"")
    kinds = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kind = detect_kind(yaml.safe_load(path.read_text()), str(path))
        kind.load(path, data_roots=[tmp_path])
        kinds[path.name] = kind.name
    assert kinds["finetune-smoke.yaml"] == kinds["finetune-imagenet-resnet50.yaml"] == "finetune"
    assert kinds["pretrain-smoke.yaml"] == "pretrain" and kinds["sweep-smoke.yaml"] == "sweep"
