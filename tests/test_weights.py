"""Source weights of a fine-tuning job: real timm models, real files, no mocks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_images
from safetensors.torch import save_file

from spark_core import build_spark
from spark_core.checkpoint import export_encoder, save_checkpoint
from spark_core.weights import (
    LoadReport,
    WeightsError,
    load_source_weights,
    read_weights_file,
    to_timm_layout,
)


def _timm_encoder_state(backbone: str) -> dict[str, torch.Tensor]:
    """What the authors' *_timm_style.pth holds: timm's model without classifier."""
    net = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
    return net.state_dict()


def _official_convnext_state(backbone: str) -> dict[str, torch.Tensor]:
    """What the authors' *_official_style.pth holds: facebookresearch/ConvNeXt key names,
    built with num_classes=0 (no final norm, no head); timm's mapping inverted."""
    official = {}
    for key, value in _timm_encoder_state(backbone).items():
        if key.startswith("head."):
            continue
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "pwconv" in key and key.endswith(".weight"):
            value = value.reshape(value.shape[0], -1)  # official MLPs are nn.Linear
        official[key] = value.clone()
    return official


def _save(state: object, path: Path) -> Path:
    torch.save(state, path)
    return path


def _assert_loaded(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = net.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(own[key], value.reshape(own[key].shape), rtol=0, atol=0)


def test_timm_style_resnet_file_loads_with_only_the_classifier_missing(tmp_path: Path) -> None:
    expected = _timm_encoder_state("resnet18")
    path = _save(expected, tmp_path / "resnet18_1kpretrained_timm_style.pth")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report = load_source_weights(net, read_weights_file(path), source=str(path))
    assert report == LoadReport(
        source=str(path),
        layout="timm",
        loaded=len(expected),
        missing=("fc.bias", "fc.weight"),
        unexpected=(),
    )
    _assert_loaded(net, expected)
    assert net(make_images(2)).shape == (2, 10)


def test_official_style_convnext_file_is_mapped_onto_timm(tmp_path: Path) -> None:
    official = _official_convnext_state("convnext_atto")
    assert "stages.1.0.dwconv.weight" in official and "downsample_layers.2.1.weight" in official
    assert not any(k.startswith(("norm.", "head.")) for k in official)
    path = _save(official, tmp_path / "convnextA_1kpretrained_official_style.pth")
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    report = load_source_weights(net, read_weights_file(path), source=str(path))
    assert report.layout == "official-convnext"
    assert report.loaded == len(official)
    assert report.missing == (
        "head.fc.bias",
        "head.fc.weight",
        "head.norm.bias",
        "head.norm.weight",
    )
    own = net.state_dict()
    for official_key, timm_key in [
        ("stages.2.3.dwconv.weight", "stages.2.blocks.3.conv_dw.weight"),
        ("stages.3.1.pwconv2.weight", "stages.3.blocks.1.mlp.fc2.weight"),  # 2-D -> 1x1 conv
        ("downsample_layers.0.0.weight", "stem.0.weight"),
        ("downsample_layers.3.1.weight", "stages.3.downsample.1.weight"),
        ("stages.1.0.gamma", "stages.1.blocks.0.gamma"),
    ]:
        expected = official[official_key].reshape(own[timm_key].shape)
        torch.testing.assert_close(own[timm_key], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("backbone", "pattern"),
    [
        ("resnet18", r"official ConvNeXt key names \(downsample_layers\.0\.0\.weight"),
        (
            "convnext_femto",  # same depths as atto, wider
            re.escape(
                "'stages.0.0.pwconv1.weight' has shape (160, 40), model "
                "'stages.0.blocks.0.mlp.fc1.weight' has (192, 48, 1, 1)"
            ),
        ),
    ],
)
def test_official_convnext_file_into_another_backbone_is_refused(
    backbone: str, pattern: str
) -> None:
    state = _official_convnext_state("convnext_atto")
    net = timm.create_model(backbone, pretrained=False, num_classes=5)
    with pytest.raises(WeightsError, match=pattern):
        load_source_weights(net, state, source="convnextA_official_style.pth")


def test_exported_encoder_loads_with_only_the_classifier_missing(tmp_path: Path) -> None:
    spark = build_spark("resnet18", input_size=64, decoder_width=64).train()
    spark(make_images())  # running stats away from their init
    path = export_encoder(spark, tmp_path / "encoder.safetensors")
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    report = load_source_weights(net, read_weights_file(path), source=str(path))
    assert (report.layout, report.missing, report.unexpected) == (
        "timm",
        ("fc.bias", "fc.weight"),
        (),
    )
    _assert_loaded(net, spark.encoder.model.state_dict())


def test_training_checkpoint_gives_its_encoder(backbone: str, tmp_path: Path) -> None:
    spark = build_spark(backbone, input_size=64, decoder_width=64).train()
    spark(make_images())
    optimizer = torch.optim.AdamW(spark.parameters())
    path = save_checkpoint(spark, tmp_path / "ckpt.pt", optimizer=optimizer, extra={"epoch": 1})
    rng = torch.get_rng_state()
    state = read_weights_file(path)
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding the SparK drew no numbers
    net = timm.create_model(backbone, pretrained=False, num_classes=4)
    report = load_source_weights(net, state, source=str(path))
    classifier = net.pretrained_cfg["classifier"]
    assert report.layout == "spark-checkpoint"
    assert report.missing == (f"{classifier}.bias", f"{classifier}.weight")  # head.norm loaded
    _assert_loaded(net, spark.encoder.model.state_dict())


def _write_marker(path: str) -> None:
    Path(path).write_text("unpickling ran code")


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (_write_marker, (str(self.marker),))


@dataclass
class TrainArgs:
    lr: float = 1e-3


def test_a_file_with_python_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    state = _timm_encoder_state("resnet18")
    path = _save({"model": state, "args": RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"Python objects.*_write_marker.*plain state dict"):
        read_weights_file(path)
    assert not marker.exists()
    # The guard is what stopped it: an unguarded load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_file_with_a_dataclass_is_refused(tmp_path: Path) -> None:
    path = _save(
        {"state_dict": _timm_encoder_state("resnet18"), "args": TrainArgs()}, tmp_path / "a.pth"
    )
    with pytest.raises(WeightsError, match=r"Python objects \(e\.g\. [\w.]*TrainArgs\)"):
        read_weights_file(path)


def test_resnet34_weights_into_resnet18_name_the_unexpected_keys(tmp_path: Path) -> None:
    path = _save(_timm_encoder_state("resnet34"), tmp_path / "resnet34.pth")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError) as caught:
        load_source_weights(net, read_weights_file(path), source=str(path))
    message = str(caught.value)
    assert "layer1.2.conv1.weight" in message and "another backbone" in message
    assert "resnet18" in message
    _assert_loaded(net, before)  # nothing was loaded


def test_a_missing_encoder_key_is_named(tmp_path: Path) -> None:
    state = _timm_encoder_state("resnet18")
    del state["layer1.0.conv1.weight"]
    path = _save(state, tmp_path / "incomplete.pth")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(WeightsError, match=r"not in the file: layer1\.0\.conv1\.weight \("):
        load_source_weights(net, read_weights_file(path), source=str(path))


def test_a_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    state = _timm_encoder_state("resnet18")
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = _save(state, tmp_path / "reshaped.pth")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(
        WeightsError,
        match=re.escape("layer2.0.conv1.weight: file (128, 64, 1, 1), model (128, 64, 3, 3)"),
    ):
        load_source_weights(net, read_weights_file(path), source=str(path))


def test_the_authors_pretraining_checkpoint_is_refused(tmp_path: Path) -> None:
    payload = {"module": _timm_encoder_state("resnet18"), "is_pretrain": True, "epoch": 1599}
    path = _save(payload, tmp_path / "res50_withdecoder_1kpretrained_spark_style.pth")
    with pytest.raises(WeightsError, match=r"_1kpretrained_timm_style\.pth.*_official_style\.pth"):
        read_weights_file(path)


def test_no_state_trains_from_scratch() -> None:
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_source_weights(net, None, source="none")
    assert report == LoadReport(source="none", layout="none", loaded=0, missing=(), unexpected=())
    _assert_loaded(net, before)


def test_containers_and_ddp_prefix_are_unwrapped(tmp_path: Path) -> None:
    state = _timm_encoder_state("resnet18")
    ddp = {f"module.{k}": v for k, v in state.items()}
    path = _save({"epoch": 3, "state_dict": ddp, "optimizer": {"lr": 0.1}}, tmp_path / "ddp.pth")
    read = read_weights_file(path)
    assert set(read) == set(ddp)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    converted, layout = to_timm_layout(read, net)
    assert layout == "timm" and set(converted) == set(state)
    report = load_source_weights(net, read, source=str(path))
    assert report.missing == ("fc.bias", "fc.weight")
    _assert_loaded(net, state)


def test_classifier_tensors_in_the_file_are_dropped_not_loaded(tmp_path: Path) -> None:
    trained = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "imagenet.safetensors"
    save_file(trained.state_dict(), path)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    fc = net.fc.weight.detach().clone()
    report = load_source_weights(net, read_weights_file(path), source=str(path))
    assert report.unexpected == () and report.missing == ("fc.bias", "fc.weight")
    torch.testing.assert_close(net.fc.weight, fc, rtol=0, atol=0)
    torch.testing.assert_close(net.conv1.weight, trained.conv1.weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("bad.pth", {"conv1.weight": torch.zeros(1), "epoch": 3}, r"'epoch' \(int\)"),
        ("list.pth", [torch.zeros(1)], r"holds a list, not a state dict"),
        ("empty.pth", {}, r"holds no tensors"),
        ("weights.bin", {"conv1.weight": torch.zeros(1)}, r"unknown suffix '\.bin'"),
    ],
)
def test_files_that_are_not_state_dicts_are_refused(
    tmp_path: Path, name: str, content: object, pattern: str
) -> None:
    with pytest.raises(WeightsError, match=pattern):
        read_weights_file(_save(content, tmp_path / name))


@pytest.mark.parametrize("name", ["truncated.pth", "truncated.safetensors"])
def test_unreadable_files_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not a weights file" * 4)
    with pytest.raises(WeightsError, match="not a readable"):
        read_weights_file(path)
    with pytest.raises(WeightsError, match="no such file"):
        read_weights_file(tmp_path / "absent.pth")
