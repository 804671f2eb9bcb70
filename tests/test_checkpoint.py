"""Export in timm's layout and whole-model checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import make_images
from safetensors.torch import load_file

from spark_core import build_spark
from spark_core.checkpoint import (
    CheckpointMismatchError,
    build_spark_from_checkpoint,
    export_encoder,
    load_checkpoint,
    save_checkpoint,
)


def test_exported_encoder_loads_into_timm_with_only_the_classifier_missing(
    backbone: str, tmp_path: Path
) -> None:
    model = build_spark(backbone, 64, decoder_width=64).train()
    model(make_images())  # move BN running stats away from their init
    path = export_encoder(model, tmp_path / "encoder.safetensors")
    net = timm.create_model(backbone, num_classes=7)
    missing, unexpected = net.load_state_dict(load_file(path), strict=False)
    classifier = net.pretrained_cfg["classifier"]
    assert not unexpected
    assert missing and all(k.startswith(classifier + ".") for k in missing)
    for key, value in model.encoder.model.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    # The loaded network is the pre-trained encoder: same features on the same images.
    net.eval()
    model.eval()
    all_visible = torch.ones(4, 1, 2, 2, dtype=torch.bool)
    images = make_images()
    ours = model.encode(images, all_visible)[-1]
    theirs = net.forward_intermediates(
        images, indices=model.encoder.feature_indices, intermediates_only=True
    )[-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_keeps_model_and_config(tmp_path: Path) -> None:
    model = build_spark("resnet18", 64, decoder_width=64, mask_ratio=0.75).train()
    model(make_images())
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(model, tmp_path / "ckpt.pt", optimizer=optimizer, extra={"epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    clone, extra = build_spark_from_checkpoint(path)
    assert extra == {"epoch": 3}
    assert clone.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_loading_a_mismatching_config_is_refused_with_the_differences(tmp_path: Path) -> None:
    model = build_spark("resnet18", 64, decoder_width=64)
    path = save_checkpoint(model, tmp_path / "ckpt.pt")
    other = build_spark("resnet18", 64, decoder_width=128, decoder_depth=3)
    with pytest.raises(CheckpointMismatchError, match="decoder_width: checkpoint=64, model=128"):
        load_checkpoint(other, path)
    with pytest.raises(CheckpointMismatchError, match="decoder_depth"):
        load_checkpoint(other, path)


def test_a_foreign_file_is_not_taken_for_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a spark_core checkpoint"):
        build_spark_from_checkpoint(path)


class _RunsOnLoad:
    """Unpickling this object would call ``touch`` (what a planted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_code_in_it_is_refused_without_running_it(tmp_path: Path) -> None:
    model = build_spark("resnet18", 64, decoder_width=64)
    path = save_checkpoint(model, tmp_path / "ckpt.pt", extra={"planted": None})
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "ran"
    payload["extra"]["planted"] = _RunsOnLoad(marker)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="refused, it holds Python objects"):
        build_spark_from_checkpoint(path)
    assert not marker.exists()
