"""orchestrator.datasets: a pre-training spec's images, read as its ``data.decoder`` says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from torch.utils.data import Subset

from orchestrator.datasets import evaluation_loaders, materialize, pretrain_dataset
from orchestrator.specs import parse_spec
from spark_core.data import ImageFolderDataset
from spark_core.gpu_input import EncodedJpegDataset

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SYNTHETIC = {"kind": "synthetic", "count": 24, "size": 32, "classes": 2}


def _spec(decoder: str, train: dict[str, Any], roots: list[Path], **sections: Any):
    return parse_spec(
        {
            "model": {"backbone": "resnet18", "input_size": 64},
            "data": {"train": train, "decoder": decoder},
            "optim": {"global_batch_size": 8},
            "resources": {"gpus_per_worker": 1 if decoder == "gpu" else 0},
            **sections,
        },
        data_roots=roots,
    )


def test_cpu_decoder_reads_the_reference_pipeline_from_unchanged_png_caches(
    tmp_path: Path,
) -> None:
    dataset = pretrain_dataset(_spec("cpu", SYNTHETIC, [], evaluation={"method": "none"}), tmp_path)
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.root.name == "synthetic-textures-n24-s32-c2-seed0"  # the cache name so far
    assert {path.suffix for path, _ in dataset.samples} == {".png"}
    image, label = dataset[0]
    assert image.shape == (3, 64, 64) and label == -1


def test_gpu_decoder_generates_synthetic_jpegs_and_keeps_the_probes_holdout(
    tmp_path: Path,
) -> None:
    gpu = pretrain_dataset(_spec("gpu", SYNTHETIC, []), tmp_path)
    cpu = pretrain_dataset(_spec("cpu", SYNTHETIC, []), tmp_path)
    assert isinstance(gpu, Subset) and isinstance(gpu.dataset, EncodedJpegDataset)
    folder = gpu.dataset.images
    assert folder.root.name.endswith("-jpg")
    assert {path.suffix for path, _ in folder.samples} == {".jpg"}
    # The probe splits the PNG copy; pre-training on the JPEG copy leaves out the same images.
    assert isinstance(cpu, Subset) and gpu.indices == cpu.indices
    names = [folder.samples[i][0].stem for i in gpu.indices]
    assert names == [cpu.dataset.samples[i][0].stem for i in cpu.indices]
    _, val_loader = evaluation_loaders(_spec("gpu", SYNTHETIC, []), tmp_path)
    val = val_loader.dataset
    held_out = {val.dataset.samples[i][0].stem for i in val.indices}
    assert held_out and not held_out & set(names)
    assert len(held_out) + len(names) == SYNTHETIC["count"]
    encoded, crop, label = gpu[0]
    assert encoded[:2].tolist() == [0xFF, 0xD8] and crop.shape == (5,) and label == -1


def test_gpu_decoder_refuses_a_folder_of_pngs_naming_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "a.png")
    spec = _spec("gpu", {"path": str(folder)}, [tmp_path], evaluation={"method": "none"})
    with pytest.raises(ValueError, match="decoder=gpu reads JPEG only") as info:
        pretrain_dataset(spec, tmp_path / "cache")
    assert str(folder / "a.png") in str(info.value)


def test_materialize_names_non_png_caches_by_format(tmp_path: Path) -> None:
    source = _spec("cpu", SYNTHETIC, []).data.train
    assert materialize(source, tmp_path).name == "synthetic-textures-n24-s32-c2-seed0"
    assert materialize(source, tmp_path, "jpg").name == "synthetic-textures-n24-s32-c2-seed0-jpg"
