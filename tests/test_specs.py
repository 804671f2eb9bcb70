"""Tests for orchestrator.specs (PretrainSpec validation) and orchestrator.settings.

Fast: no Ray, no training. Data folders are built under pytest's tmp_path and passed as
``data_roots``; settings read a monkeypatched environment.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import (
    MAX_SPEC_BYTES,
    ImageFolderData,
    PretrainSpec,
    SpecError,
    SyntheticData,
    load_spec,
    parse_spec,
)
from spark_core import build_spark
from spark_core.engine import EngineConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SECTIONS = {
    "name",
    "tags",
    "seed",
    "model",
    "spark",
    "data",
    "optim",
    "resources",
    "checkpoint",
    "failures",
    "evaluation",
    "tracking",
}
# The smallest change to the defaults that passes the cross-field checks: the reference
# batch of 4096 does not fit the default 256 synthetic images.
BASE: dict[str, Any] = {
    "optim": {"global_batch_size": 32},
    "data": {"train": {}},  # synthetic by default; a "path" makes it a folder
}
SETTINGS_ENV = (
    "SPARKORCH_HOME",
    "SPARKORCH_DATA_ROOTS",
    "SPARKORCH_MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_URI",
    "SPARKORCH_MLFLOW_EXPERIMENT",
    "SPARKORCH_MLFLOW_UI_URL",
    "SPARKORCH_RAY_ADDRESS",
    "RAY_ADDRESS",
    "SPARKORCH_RAY_STORAGE",
    "SPARKORCH_RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_TOKEN_PATH",
    "SPARKORCH_RAY_NUM_CPUS",
)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``overrides`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec_errors(data: Any, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, **kwargs)
    assert info.value.errors, "SpecError without errors"
    return info.value.errors


def error_for(errors: list[tuple[str, str]], path: str) -> str:
    messages = [message for field, message in errors if field == path]
    assert messages, f"no error for {path!r} in {errors}"
    return messages[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """Two data roots with folders in them, a folder outside both, and links."""
    root, root2, outside = tmp_path / "root", tmp_path / "root2", tmp_path / "outside"
    (root / "imgs" / "cls").mkdir(parents=True)
    (root2 / "other").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "imgs", target_is_directory=True)
    (root / "afile").write_text("not a folder")
    return {"root": root, "root2": root2, "outside": outside}


# ------------------------------------------------------------------------------ defaults


def test_empty_spec_names_the_missing_data_section() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({}, data_roots=[])
    assert info.value.errors == [("data", "Field required")]


def test_defaults_are_the_reference_recipe() -> None:
    spec = parse_spec(BASE, data_roots=[])
    assert spec.name == "spark-pretrain"
    assert spec.tags == {}
    assert spec.seed == 0
    assert (spec.model.backbone, spec.model.input_size, spec.model.drop_path_rate) == (
        "resnet50",
        224,
        None,
    )
    # Omitted drop path = the reference recipe's per-backbone value (ResNet-50: 0.05).
    assert spec.model.effective_drop_path_rate() == 0.05
    assert spec.build_kwargs()["drop_path_rate"] == 0.05
    assert spec.spark.model_dump() == {
        "mask_ratio": 0.6,
        "sparse": True,
        "hierarchy": 4,
        "mask_token": True,
        "densify_norm": "auto",
        "decoder_width": 768,
        "decoder_depth": 2,
        "norm_pix_loss": True,
    }
    optim = spec.optim
    assert (optim.optimizer, optim.base_lr, optim.epochs, optim.warmup_epochs) == (
        "lamb",
        2e-4,
        1600,
        40.0,
    )
    assert (optim.weight_decay, optim.weight_decay_end, optim.clip_grad) == (0.04, 0.2, 5.0)
    assert optim.precision == "fp32"
    assert isinstance(spec.data.train, SyntheticData)
    assert spec.data.train.count == 256
    assert spec.data.eval is None
    assert spec.data.holdout is True
    assert spec.resources.num_workers == 1
    assert spec.resources.gpus_per_worker == 0.0
    assert spec.evaluation.method == "linear_probe"
    assert spec.tracking.experiment is None


def test_spec_is_frozen() -> None:
    spec = parse_spec(BASE, data_roots=[])
    with pytest.raises(ValueError, match="frozen"):
        spec.seed = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------- derived


@pytest.mark.parametrize(
    ("base_lr", "global_batch", "workers", "peak", "per_worker"),
    [
        (2e-4, 4096, 32, 2e-4 * 16, 128),
        (0.1, 32, 2, 0.0125, 16),
        (1e-3, 256, 1, 1e-3, 256),
        (0.5, 12, 3, 0.5 * 12 / 256, 4),
    ],
)
def test_derived_peak_lr_and_per_worker_batch(
    base_lr: float, global_batch: int, workers: int, peak: float, per_worker: int
) -> None:
    spec = parse_spec(
        {
            "optim": {"base_lr": base_lr, "global_batch_size": global_batch},
            "resources": {"num_workers": workers},
            "data": {"train": {"count": max(256, 2 * global_batch)}},
        },
        data_roots=[],
    )
    derived = spec.derived()
    assert math.isclose(derived.peak_lr, peak, rel_tol=1e-12)
    assert derived.per_worker_batch == per_worker
    assert derived.use_gpu is False


@pytest.mark.parametrize(("gpus", "use_gpu"), [(0, False), (0.5, True), (1, True)])
def test_derived_use_gpu(gpus: float, use_gpu: bool) -> None:
    spec = parse_spec(merged(BASE, {"resources": {"gpus_per_worker": gpus}}), data_roots=[])
    assert spec.derived().use_gpu is use_gpu


def test_engine_config_maps_every_field() -> None:
    spec = parse_spec(
        {
            "seed": 7,
            "data": {"train": {"count": 1024}, "loader_workers": 3, "decoder": "gpu"},
            "optim": {
                "optimizer": "adamw",
                "base_lr": 1.5e-3,
                "global_batch_size": 64,
                "epochs": 12,
                "warmup_epochs": 2.5,
                "weight_decay": 0.05,
                "weight_decay_end": 0.1,
                "clip_grad": 3.0,
                "precision": "bf16",
                "channels_last": True,
                "compile": True,
                "compile_optimizer": True,
                "log_every": 4,
            },
            "resources": {"num_workers": 4, "gpus_per_worker": 1},
            "checkpoint": {"every_epochs": 3},
        },
        data_roots=[],
    )
    config = spec.engine_config(device="cuda:1", checkpoint_dir="/ckpt/job")
    assert isinstance(config, EngineConfig)
    assert config.epochs == 12
    assert config.batch_size == 16  # per worker: 64 / 4
    assert config.global_batch_size == 64
    assert config.optimizer == "adamw"
    assert config.base_lr == 1.5e-3
    assert config.warmup_epochs == 2.5
    assert config.weight_decay == 0.05
    assert config.weight_decay_end == 0.1
    assert config.clip_grad == 3.0
    assert config.precision == "bf16"
    assert config.channels_last is True
    assert config.compile is True
    assert config.compile_optimizer is True
    assert config.seed == 7
    assert config.log_every == 4
    assert config.loader_workers == 3  # data loader workers, not Ray workers
    assert config.decoder == "gpu"
    assert config.device == "cuda:1"
    assert config.checkpoint_dir == "/ckpt/job"
    assert config.checkpoint_every == 3


def test_engine_config_without_checkpoint_dir() -> None:
    config = parse_spec(BASE, data_roots=[]).engine_config(device="cpu")
    assert config.device == "cpu"
    assert config.checkpoint_dir is None
    assert config.batch_size == 32


def test_build_kwargs_build_a_real_model() -> None:
    spec = parse_spec(
        merged(
            BASE,
            {
                "model": {"backbone": "resnet18", "input_size": 64, "drop_path_rate": 0.1},
                "spark": {
                    "decoder_width": 64,
                    "mask_ratio": 0.75,
                    "hierarchy": 3,
                    "densify_norm": "ln",
                    "decoder_depth": 1,
                    "mask_token": False,
                    "norm_pix_loss": False,
                },
            },
        ),
        data_roots=[],
    )
    kwargs = spec.build_kwargs()
    assert kwargs == {
        "backbone": "resnet18",
        "input_size": 64,
        "drop_path_rate": 0.1,
        "mask_ratio": 0.75,
        "sparse": True,
        "hierarchy": 3,
        "mask_token": False,
        "densify_norm": "ln",
        "decoder_width": 64,
        "decoder_depth": 1,
        "norm_pix_loss": False,
    }
    model = build_spark(**kwargs)
    config = model.config
    assert config.backbone == "resnet18"
    assert config.input_size == (64, 64)
    assert (config.mask_ratio, config.hierarchy, config.densify_norm) == (0.75, 3, "ln")
    assert (config.decoder_width, config.decoder_depth) == (64, 1)
    assert (config.mask_token, config.norm_pix_loss, config.drop_path_rate) == (False, False, 0.1)


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "path", "fragment"),
    [
        ({"bogus": 1}, "bogus", "Extra inputs are not permitted"),
        ({"model": {"bogus": 1}}, "model.bogus", "Extra inputs are not permitted"),
        ({"optim": {"lr": 0.1}}, "optim.lr", "Extra inputs are not permitted"),
        (
            {"data": {"train": {"kind": "synthetic", "bogus": 1}}},
            "data.train.bogus",
            "Extra inputs are not permitted",
        ),
        ({"data": {"train": {"bogus": 1}}}, "data.train.bogus", "Extra inputs are not permitted"),
        ({"spark": {"mask_ratio": 1.0}}, "spark.mask_ratio", "less than 1"),
        ({"spark": {"mask_ratio": 0.0}}, "spark.mask_ratio", "greater than 0"),
        ({"spark": {"mask_ratio": -0.1}}, "spark.mask_ratio", "greater than 0"),
        # 224 px is a 7x7 grid: 0.99 keeps no patch visible, 0.005 masks none.
        ({"spark": {"mask_ratio": 0.99}}, "spark.mask_ratio", "= 0 of 49 patches stay visible"),
        ({"spark": {"mask_ratio": 0.005}}, "spark.mask_ratio", "nothing is masked"),
        ({"spark": {"hierarchy": 5}}, "spark.hierarchy", "less than or equal to 4"),
        ({"spark": {"hierarchy": 0}}, "spark.hierarchy", "greater than or equal to 1"),
        ({"spark": {"decoder_width": 100}}, "spark.decoder_width", "multiple of 32"),
        ({"spark": {"decoder_width": 0}}, "spark.decoder_width", "greater than or equal to 32"),
        ({"model": {"input_size": 100}}, "model.input_size", "multiple of 32"),
        ({"model": {"input_size": 2048}}, "model.input_size", "less than or equal to 1024"),
        ({"model": {"input_size": 0}}, "model.input_size", "greater than or equal to 32"),
        ({"model": {"drop_path_rate": 1.0}}, "model.drop_path_rate", "less than 1"),
        ({"seed": 1.5}, "seed", "fractional part"),
        ({"spark": {"densify_norm": "gn"}}, "spark.densify_norm", "'auto', 'bn', 'ln' or"),
        ({"optim": {"precision": "fp8"}}, "optim.precision", "'fp32', 'bf16' or 'fp16'"),
        ({"optim": {"optimizer": "sgd"}}, "optim.optimizer", "'lamb' or 'adamw'"),
        (
            {"model": {"backbone": "vit_base_patch16_224"}},
            "model.backbone",
            "is not a supported backbone",
        ),
        ({"model": {"backbone": "resnet9000"}}, "model.backbone", "is not a timm model name"),
        ({"model": {"backbone": "ResNet50"}}, "model.backbone", "should match pattern"),
        (
            {"data": {"train": {"kind": "webdataset"}}},
            "data.train",
            "'image_folder', 'synthetic'",
        ),
        ({"name": "my run"}, "name", "use 1-64 letters"),
        ({"name": "run;rm -rf"}, "name", "use 1-64 letters"),
        ({"name": "-leading-dash"}, "name", "starting with a letter"),
        ({"name": "x" * 65}, "name", "use 1-64 letters"),
        ({"tags": {"owner": "a\nb"}}, "tags.owner", "tag values"),
        ({"tags": {"owner": "$(id)"}}, "tags.owner", "tag values"),
        ({"tracking": {"experiment": "a b"}}, "tracking.experiment", "use 1-64 letters"),
    ],
)
def test_invalid_field_is_named(overrides: dict[str, Any], path: str, fragment: str) -> None:
    errors = spec_errors(merged(BASE, overrides), data_roots=[])
    assert [field for field, _ in errors] == [path]
    assert fragment in error_for(errors, path)


def test_unsupported_backbone_lists_the_families() -> None:
    message = error_for(
        spec_errors(merged(BASE, {"model": {"backbone": "vit_base_patch16_224"}})),
        "model.backbone",
    )
    assert "'vit_base_patch16_224'" in message
    assert "resnet" in message
    assert "convnext" in message


def test_bad_tag_key_is_refused() -> None:
    errors = spec_errors(merged(BASE, {"tags": {"bad key": "v"}}), data_roots=[])
    assert len(errors) == 1
    path, message = errors[0]
    assert path.startswith("tags.bad key")
    assert "tag keys" in message


def test_tag_named_like_a_data_kind_keeps_its_path() -> None:
    errors = spec_errors(merged(BASE, {"tags": {"synthetic": "a\nb"}}), data_roots=[])
    assert [field for field, _ in errors] == ["tags.synthetic"]


def test_bad_name_message_explains_the_allowed_characters() -> None:
    message = error_for(spec_errors(merged(BASE, {"name": "my run"}), data_roots=[]), "name")
    assert "letters, digits" in message
    assert "[A-Za-z0-9]" not in message


def test_tag_values_allow_ordinary_text() -> None:
    tags = {"owner": "Jane Doe", "ticket": "ML-42", "note": "lr=0.1, bs=32 (test)"}
    assert parse_spec(merged(BASE, {"tags": tags}), data_roots=[]).tags == tags


def test_global_batch_not_divisible_by_workers() -> None:
    errors = spec_errors(
        merged(BASE, {"optim": {"global_batch_size": 33}, "resources": {"num_workers": 2}}),
        data_roots=[],
    )
    assert [field for field, _ in errors] == ["optim.global_batch_size"]
    message = error_for(errors, "optim.global_batch_size")
    assert "divisible by resources.num_workers=2" in message


def test_decoder_defaults_to_the_reference_cpu_pipeline() -> None:
    spec = parse_spec(BASE, data_roots=[])
    assert spec.data.decoder == "cpu"
    assert spec.engine_config(device="cpu").decoder == "cpu"
    assert spec.flat_params()["data.decoder"] == "cpu"


def test_gpu_decoder_needs_gpus_and_says_how_to_fix() -> None:
    errors = spec_errors(merged(BASE, {"data": {"decoder": "gpu"}}), data_roots=[])
    assert [field for field, _ in errors] == ["data.decoder"]
    message = error_for(errors, "data.decoder")
    assert "resources.gpus_per_worker is 0" in message
    assert "resources.gpus_per_worker: 1" in message and "data.decoder: cpu" in message
    spec = parse_spec(
        merged(BASE, {"data": {"decoder": "gpu"}, "resources": {"gpus_per_worker": 0.5}}),
        data_roots=[],
    )
    assert spec.data.decoder == "gpu" and spec.derived().use_gpu


def test_unknown_decoder_lists_the_choices() -> None:
    errors = spec_errors(merged(BASE, {"data": {"decoder": "dali"}}), data_roots=[])
    assert [field for field, _ in errors] == ["data.decoder"]
    assert "'cpu' or 'gpu'" in errors[0][1]


def test_synthetic_count_too_small_for_the_batch() -> None:
    # 40 images, 25 % held out for the probe: 30 left for pre-training, batch 32.
    errors = spec_errors(
        {"optim": {"global_batch_size": 32}, "data": {"train": {"count": 40}}}, data_roots=[]
    )
    assert [field for field, _ in errors] == ["data.train.count"]
    message = error_for(errors, "data.train.count")
    assert "30 pre-training images per worker" in message
    assert "per-worker batch 32" in message


def test_synthetic_count_without_holdout_uses_all_images() -> None:
    spec = parse_spec(
        {"optim": {"global_batch_size": 32}, "data": {"train": {"count": 40}, "holdout": False}},
        data_roots=[],
    )
    assert spec.data.train.count == 40


def test_evaluation_needs_two_classes() -> None:
    errors = spec_errors(merged(BASE, {"data": {"train": {"classes": 1}}}), data_roots=[])
    assert [field for field, _ in errors] == ["data.train.classes"]
    assert "at least 2 classes" in errors[0][1]
    # Without evaluation a single class is fine.
    spec = parse_spec(
        merged(BASE, {"data": {"train": {"classes": 1}}, "evaluation": {"method": "none"}}),
        data_roots=[],
    )
    assert spec.data.train.classes == 1


def test_several_errors_at_once() -> None:
    data = merged(
        BASE,
        {
            "name": "bad name",
            "bogus": True,
            "spark": {"mask_ratio": 2, "decoder_width": 33},
            "optim": {"precision": "fp64"},
        },
    )
    with pytest.raises(SpecError) as info:
        parse_spec(data, data_roots=[], source="job.yaml")
    paths = {field for field, _ in info.value.errors}
    assert paths == {
        "name",
        "bogus",
        "spark.mask_ratio",
        "spark.decoder_width",
        "optim.precision",
    }
    text = str(info.value)
    assert text.startswith("job.yaml is invalid:")
    for path in paths:
        assert f"\n  {path}: " in text


def test_cross_field_errors_are_reported_together() -> None:
    errors = spec_errors(
        {"optim": {"global_batch_size": 32}, "data": {"train": {"count": 40, "classes": 1}}},
        data_roots=[],
    )
    assert {field for field, _ in errors} == {"data.train.count", "data.train.classes"}


@pytest.mark.parametrize(("data", "kind"), [([1, 2], "list"), ("text", "str"), (None, "NoneType")])
def test_non_mapping_is_refused(data: Any, kind: str) -> None:
    assert spec_errors(data, data_roots=[]) == [("", f"expected a mapping of fields, got {kind}")]


# ---------------------------------------------------------------------------- data paths


def _train(path: str, **data: Any) -> dict[str, Any]:
    return merged(BASE, {"data": {"train": {"path": path}, **data}})


def test_folder_under_root_resolves_to_absolute_path(roots: dict[str, Path]) -> None:
    root = roots["root"]
    relative = parse_spec(_train("imgs"), data_roots=[root])
    absolute = parse_spec(_train(str(root / "imgs")), data_roots=[root])
    assert isinstance(relative.data.train, ImageFolderData)
    assert relative.data.train.kind == "image_folder"
    assert relative.data.train.path == str((root / "imgs").resolve())
    assert absolute.data.train.path == relative.data.train.path
    nested = parse_spec(_train("imgs/cls"), data_roots=[root])
    assert nested.data.train.path == str((root / "imgs" / "cls").resolve())


def test_absolute_path_under_a_later_root(roots: dict[str, Path]) -> None:
    target = roots["root2"] / "other"
    spec = parse_spec(_train(str(target)), data_roots=[roots["root"], roots["root2"]])
    assert spec.data.train.path == str(target.resolve())


def test_relative_paths_start_at_the_first_root(roots: dict[str, Path]) -> None:
    # "other" exists only under the second root: relative paths are not searched.
    errors = spec_errors(_train("other"), data_roots=[roots["root"], roots["root2"]])
    assert "is not an existing folder" in error_for(errors, "data.train.path")


def test_symlink_within_the_root_is_followed(roots: dict[str, Path]) -> None:
    spec = parse_spec(_train("alias"), data_roots=[roots["root"]])
    assert spec.data.train.path == str((roots["root"] / "imgs").resolve())


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("{outside}", "lies outside the allowed data roots"),
        ("imgs/../../outside", "'..' is not allowed"),
        ("imgs/../imgs", "'..' is not allowed"),
        ("file://{root}/imgs", "URLs are not accepted"),
        ("file:{root}/imgs", "URLs are not accepted"),
        ("s3://bucket/imagenet/train", "URLs are not accepted"),
        ("escape", "lies outside the allowed data roots"),
        ("missing", "is not an existing folder"),
        ("afile", "is not an existing folder"),
        ("~/imgs", "lies outside the allowed data roots"),
        ("", "at least 1 character"),
    ],
)
def test_data_path_refused(roots: dict[str, Path], path: str, fragment: str) -> None:
    value = path.format(outside=roots["outside"], root=roots["root"])
    errors = spec_errors(_train(value), data_roots=[roots["root"]])
    assert [field for field, _ in errors] == ["data.train.path"]
    assert fragment in errors[0][1]


def test_outside_message_names_the_roots_and_the_setting(roots: dict[str, Path]) -> None:
    message = error_for(
        spec_errors(_train(str(roots["outside"])), data_roots=[roots["root"], roots["root2"]]),
        "data.train.path",
    )
    assert str(roots["root"].resolve()) in message
    assert str(roots["root2"].resolve()) in message
    assert "SPARKORCH_DATA_ROOTS" in message


def test_url_message_names_the_roots(roots: dict[str, Path]) -> None:
    message = error_for(
        spec_errors(_train("s3://bucket/x"), data_roots=[roots["root"]]), "data.train.path"
    )
    assert str(roots["root"].resolve()) in message


def test_missing_folder_message_shows_the_resolved_path(roots: dict[str, Path]) -> None:
    message = error_for(
        spec_errors(_train("missing"), data_roots=[roots["root"]]), "data.train.path"
    )
    assert str(roots["root"].resolve() / "missing") in message


def test_relative_path_without_roots() -> None:
    errors = spec_errors(_train("imgs"), data_roots=[])
    assert error_for(errors, "data.train.path") == (
        "no data roots are configured (set SPARKORCH_DATA_ROOTS)"
    )


def test_eval_path_is_checked_too(roots: dict[str, Path]) -> None:
    data = merged(BASE, {"data": {"train": {"path": "imgs"}, "eval": {"path": "missing"}}})
    errors = spec_errors(data, data_roots=[roots["root"]])
    assert [field for field, _ in errors] == ["data.eval.path"]


def test_train_without_kind_is_synthetic() -> None:
    spec = parse_spec(merged(BASE, {"data": {"train": {"count": 300, "style": "shapes"}}}))
    train = spec.data.train
    assert isinstance(train, SyntheticData)
    assert (train.kind, train.count, train.style) == ("synthetic", 300, "shapes")


def test_source_with_path_and_no_kind_is_a_folder(roots: dict[str, Path]) -> None:
    spec = parse_spec(
        merged(BASE, {"data": {"train": {}, "eval": {"path": "imgs"}}}), data_roots=[roots["root"]]
    )
    assert isinstance(spec.data.train, SyntheticData)
    assert isinstance(spec.data.eval, ImageFolderData)
    assert spec.data.eval.path == str((roots["root"] / "imgs").resolve())


def test_synthetic_with_a_path_is_refused() -> None:
    errors = spec_errors(
        merged(BASE, {"data": {"train": {"kind": "synthetic", "path": "imgs"}}}), data_roots=[]
    )
    assert [field for field, _ in errors] == ["data.train.path"]


def test_roots_default_to_the_settings(
    roots: dict[str, Path], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SPARKORCH_DATA_ROOTS", json.dumps([str(roots["root2"])]))
    spec = parse_spec(_train("other"))
    assert spec.data.train.path == str((roots["root2"] / "other").resolve())
    errors = spec_errors(_train("imgs"))
    assert "is not an existing folder" in error_for(errors, "data.train.path")


# ----------------------------------------------------------------------------- load_spec


def _smoke_document() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "pretrain-smoke.yaml").read_text())


def test_load_yaml_and_json_give_the_same_spec(tmp_path: Path) -> None:
    document = _smoke_document()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "spec.json").write_text(json.dumps(document))
    from_yaml = load_spec(tmp_path / "spec.yaml", data_roots=[tmp_path])
    from_json = load_spec(str(tmp_path / "spec.json"), data_roots=[tmp_path])
    assert from_yaml == from_json
    assert from_yaml.name == "pretrain-smoke"
    assert from_yaml.model_dump() == parse_spec(document, data_roots=[tmp_path]).model_dump()


def test_load_file_at_the_size_limit(tmp_path: Path) -> None:
    head = "name: padded\ndata: {train: {}}\noptim:\n  global_batch_size: 32\n#"
    path = tmp_path / "spec.yaml"
    path.write_text(head + "x" * (MAX_SPEC_BYTES - len(head)) + "\n")
    assert path.stat().st_size == MAX_SPEC_BYTES + 1
    with pytest.raises(SpecError) as info:
        load_spec(path, data_roots=[])
    assert info.value.errors == [
        ("", f"file is {MAX_SPEC_BYTES + 1} bytes; the limit is {MAX_SPEC_BYTES}")
    ]
    assert str(path) in str(info.value)
    path.write_text(head + "x" * (MAX_SPEC_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_SPEC_BYTES
    assert load_spec(path, data_roots=[]).name == "padded"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [unclosed\n", "not valid YAML/JSON"),
        ('{"name": "x"', "not valid YAML/JSON"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML/JSON"),
        ("- a\n- b\n", "expected a mapping of fields, got list"),
        ("just text\n", "expected a mapping of fields, got str"),
    ],
)
def test_load_refuses_bad_documents(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path, data_roots=[])
    assert len(info.value.errors) == 1
    field, message = info.value.errors[0]
    assert field == ""
    assert fragment in message
    assert str(info.value).startswith(f"{path} is invalid:")


def test_load_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="not valid YAML/JSON"):
        load_spec(path, data_roots=[])


def test_load_empty_file_says_it_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("# nothing but a comment\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, data_roots=[])
    assert "empty" in info.value.errors[0][1]
    assert "NoneType" not in str(info.value)


def test_load_refuses_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("optim:\n  global_batch_size: 32\nname: first\nname: second\n")
    try:
        spec = load_spec(path, data_roots=[])
    except SpecError as error:
        assert "name" in str(error)
    else:
        raise AssertionError(f"duplicated key 'name' accepted, kept {spec.name!r}")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path, data_roots=[])
    assert info.value.errors == [("", f"cannot read {path}: No such file or directory")]


def test_load_a_folder_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path, data_roots=[])


def test_load_reports_field_errors_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: {}}\noptim: {global_batch_size: 32}\nspark:\n  hierarchy: 9\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, data_roots=[])
    assert [field for field, _ in info.value.errors] == ["spark.hierarchy"]
    assert str(info.value).startswith(f"{path} is invalid:\n  spark.hierarchy: ")


# ------------------------------------------------------------------------------ examples


def test_smoke_example_validates() -> None:
    spec = load_spec(EXAMPLES / "pretrain-smoke.yaml", data_roots=[])
    assert spec.name == "pretrain-smoke"
    assert spec.tags == {"purpose": "smoke"}
    assert (spec.model.backbone, spec.model.input_size) == ("resnet18", 64)
    assert isinstance(spec.data.train, SyntheticData)
    assert spec.data.train.count == 512
    derived = spec.derived()
    assert math.isclose(derived.peak_lr, 0.1 * 32 / 256)
    assert derived.per_worker_batch == 16
    assert derived.use_gpu is False


def test_imagenet_example_validates_with_its_folders(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / "data" / "imagenet" / split).mkdir(parents=True)
    spec = load_spec(EXAMPLES / "pretrain-imagenet-resnet50.yaml", data_roots=[tmp_path / "data"])
    root = (tmp_path / "data").resolve()
    assert isinstance(spec.data.train, ImageFolderData)
    assert spec.data.train.path == str(root / "imagenet" / "train")
    assert isinstance(spec.data.eval, ImageFolderData)
    assert spec.data.eval.path == str(root / "imagenet" / "val")
    derived = spec.derived()
    assert math.isclose(derived.peak_lr, 2e-4 * 4096 / 256)
    assert derived.per_worker_batch == 128
    assert derived.use_gpu is True


def test_imagenet_example_fails_without_its_folders(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(SpecError) as info:
        load_spec(EXAMPLES / "pretrain-imagenet-resnet50.yaml", data_roots=[tmp_path / "data"])
    fields = [field for field, _ in info.value.errors]
    assert fields == ["data.train.path", "data.eval.path"]
    assert "'imagenet/train' is not an existing folder" in info.value.errors[0][1]


# ------------------------------------------------------------------- flat params, schema


def test_flat_params() -> None:
    spec = parse_spec(
        merged(BASE, {"tags": {"owner": "jane", "secret-tag": "hidden"}, "seed": 5}),
        data_roots=[],
    )
    flat = spec.flat_params()
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in flat.items())
    assert not any(key == "tags" or key.startswith("tags.") for key in flat)
    assert "hidden" not in flat.values() and "jane" not in flat.values()
    assert flat["name"] == "spark-pretrain"
    assert flat["seed"] == "5"
    assert flat["model.backbone"] == "resnet50"
    assert flat["spark.mask_ratio"] == "0.6"
    assert flat["spark.sparse"] == "True"
    assert flat["optim.base_lr"] == "0.0002"
    assert flat["optim.global_batch_size"] == "32"
    assert flat["data.train.kind"] == "synthetic"
    assert flat["data.eval"] == "None"
    assert flat["tracking.experiment"] == "None"
    # One entry per leaf field, every section present.
    assert {key.split(".")[0] for key in flat} == SECTIONS - {"tags"}
    assert flat["failures.resubmit_on_loss"] == "True"
    assert len(flat) == 51


def test_json_schema_lists_the_sections() -> None:
    schema = PretrainSpec.model_json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert set(schema["properties"]) == SECTIONS
    assert schema["additionalProperties"] is False
    assert {"ModelSpec", "SparkSpec", "ImageFolderData", "SyntheticData"} <= set(schema["$defs"])
    assert "letters, digits" in schema["properties"]["name"]["description"]


# ------------------------------------------------------------------------------ settings


def test_settings_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(tmp_path)
    settings = OrchestratorSettings()
    home = (tmp_path / ".sparkorch").resolve()
    assert settings.home == home
    assert settings.allowed_data_roots == (home / "data",)
    assert settings.tracking_uri == f"sqlite:///{home}/mlflow.db"
    assert settings.ray_address is None
    assert settings.storage_path == str(home / "ray")


def test_settings_from_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    clean_env.setenv("SPARKORCH_HOME", str(home))
    settings = OrchestratorSettings()
    assert settings.home == home.resolve()
    assert settings.home.is_absolute()
    assert settings.tracking_uri == f"sqlite:///{home.resolve()}/mlflow.db"
    assert settings.tracking_uri.startswith("sqlite:////")
    assert settings.allowed_data_roots == (home.resolve() / "data",)
    assert settings.artifact_root == home.resolve() / "mlartifacts"


def test_settings_relative_home_is_made_absolute(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.chdir(tmp_path)
    clean_env.setenv("SPARKORCH_HOME", "state/../state2")
    assert OrchestratorSettings().home == (tmp_path / "state2").resolve()


def test_settings_data_roots_json_list(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    clean_env.setenv("SPARKORCH_HOME", str(tmp_path / "home"))
    clean_env.setenv("SPARKORCH_DATA_ROOTS", json.dumps([str(first), str(second)]))
    settings = OrchestratorSettings()
    assert settings.data_roots == [first, second]
    assert settings.allowed_data_roots == (first.resolve(), second.resolve())


@pytest.mark.parametrize("prefix", ["", "SPARKORCH_"])
def test_settings_tracking_uri_and_ray_address(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, prefix: str
) -> None:
    clean_env.setenv("SPARKORCH_HOME", str(tmp_path))
    clean_env.setenv(f"{prefix}MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    clean_env.setenv(f"{prefix}RAY_ADDRESS", "ray://head.internal:10001")
    settings = OrchestratorSettings()
    assert settings.tracking_uri == "http://mlflow.internal:5000"
    assert settings.mlflow_tracking_uri == "http://mlflow.internal:5000"
    assert settings.ray_address == "ray://head.internal:10001"
