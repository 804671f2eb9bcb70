"""Pre-training must learn something: SparK beats random initialisation on synthetic textures.

The slow test is the acceptance check. ``style="textures"`` data (the class is the orientation
of a whole-image periodic pattern, with random frequency, phase, waveform, brightness, contrast,
tint, hue, a fine distractor grating and noise) is split 75/25; SparK pre-trains a ResNet-18 on
the training part without labels, and the same linear probe and kNN, with the same data and
seed, score the encoder before and after.

Measured with this recipe (64 px, 512 images of 4 classes, pre-training on the 384 training
images for 5 epochs of batch 32, LAMB base lr 0.1, decoder width 256; 2 CPU threads, about
22 s per run on an idle 2-core machine, 20 s of it pre-training), per seed of the whole pipeline:

    seed  loss (epoch 1 -> 5)  linear probe: random -> SparK   kNN: random -> SparK
    0     0.990 -> 0.753       29.7 -> 94.5                    43.8 -> 81.2
    1     0.989 -> 0.764       35.2 -> 92.2                    42.2 -> 86.7
    2     0.989 -> 0.785       38.3 -> 87.5                    50.8 -> 85.2
    3     0.988 -> 0.793       39.1 -> 88.3                    49.2 -> 78.1
    4     0.991 -> 0.824       38.3 -> 90.6                    45.3 -> 83.6

so the linear-probe margin is 49 to 65 points and the kNN margin 29 to 45 (chance: 25 %).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dataset_files, ridge_accuracy
from PIL import Image
from torch.utils.data import Subset

from spark_core.data import (
    SYNTHETIC_STYLES,
    ImageFolderDataset,
    build_eval_transform,
    build_loader,
    build_pretrain_transform,
    generate_synthetic_dataset,
    split_train_val,
    synthetic_texture_orientation,
)
from spark_core.engine import EngineConfig, PretrainEngine
from spark_core.evaluate import evaluate_encoder
from spark_core.model import build_spark

TEXTURES = {"num_images": 24, "image_size": 32, "num_classes": 4, "style": "textures"}


# ------------------------------------------------------------------ the "textures" generator


def test_texture_orientations_split_the_half_turn() -> None:
    assert [synthetic_texture_orientation(k, 4) for k in range(4)] == pytest.approx(
        [0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4]
    )
    with pytest.raises(ValueError, match="class_index"):
        synthetic_texture_orientation(4, 4)


def test_textures_layout_manifest_and_determinism(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "a", **TEXTURES, seed=3)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["style"] == "textures"
    ds = ImageFolderDataset(root, build_eval_transform(32))
    assert ds.classes == ["class_00", "class_01", "class_02", "class_03"]
    assert len(ds) == 24
    image, label = ds[1]
    assert tuple(image.shape) == (3, 32, 32)
    assert label == 0  # class_00 holds images 0, 4, 8, ...

    files = dataset_files(root)
    assert files == dataset_files(generate_synthetic_dataset(tmp_path / "b", **TEXTURES, seed=3))
    other = dataset_files(generate_synthetic_dataset(tmp_path / "c", **TEXTURES, seed=4))
    assert files.keys() == other.keys()
    assert all(files[k] != other[k] for k in files)
    shapes = dataset_files(
        generate_synthetic_dataset(tmp_path / "d", **{**TEXTURES, "style": "shapes"})
    )
    assert all(files[k] != shapes[k] for k in files)


def test_style_is_validated_and_checked_on_reuse(tmp_path: Path) -> None:
    assert SYNTHETIC_STYLES == ("shapes", "textures")
    with pytest.raises(ValueError, match="style"):
        generate_synthetic_dataset(tmp_path / "bad", style="stripes")
    assert not (tmp_path / "bad").exists()

    root = generate_synthetic_dataset(tmp_path / "ds", **TEXTURES)
    with pytest.raises(ValueError, match=r"different parameters.*style"):
        generate_synthetic_dataset(root, **{**TEXTURES, "style": "shapes"})

    # A manifest written before the style option existed describes a "shapes" dataset.
    shapes = {**TEXTURES, "style": "shapes"}
    old = generate_synthetic_dataset(tmp_path / "old", **shapes)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["style"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert generate_synthetic_dataset(old, **shapes) == old
    with pytest.raises(ValueError, match="different parameters"):
        generate_synthetic_dataset(old, **TEXTURES)


def test_texture_classes_need_the_pattern_not_mean_colour(tmp_path: Path) -> None:
    size, num_classes = 32, 4
    root = generate_synthetic_dataset(
        tmp_path / "ds", num_images=192, image_size=size, num_classes=num_classes, style="textures"
    )
    ds = ImageFolderDataset(root)
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p, _ in ds.samples])
    labels = np.asarray(ds.targets)
    chance = 1 / num_classes

    # Mean RGB alone gives (near) chance accuracy ...
    colour_acc = ridge_accuracy(images.mean(axis=(1, 2)), labels, num_classes)
    assert colour_acc < chance + 0.175, colour_acc

    # ... while the power of the grey image's low spatial frequencies (which encodes the
    # orientation of the 1-2 cycle pattern) gives it almost perfectly.
    grey = images.mean(-1)
    power = np.abs(np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True))) ** 2
    fy, fx = np.meshgrid(*(np.fft.fftfreq(size) * size,) * 2, indexing="ij")
    radius = np.hypot(fx, fy)
    half_plane = (fy > 0) | ((fy == 0) & (fx > 0))
    low = (radius > 0) & (radius <= 2.5) & half_plane
    content_acc = ridge_accuracy(np.log(power[:, low] + 1e-8), labels, num_classes)
    assert content_acc > 0.9, content_acc


# ------------------------------------------------------------------ pre-training beats random


@pytest.fixture
def _two_threads():
    """The measurements above used 2 intra-op threads; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("_two_threads")
def test_spark_pretraining_beats_random_init_on_textures(tmp_path: Path) -> None:
    size, seed = 64, 0
    root = generate_synthetic_dataset(
        tmp_path / "data", num_images=512, image_size=size, num_classes=4, seed=seed,
        style="textures",
    )  # fmt: skip
    clean = ImageFolderDataset(root, build_eval_transform(size))
    train, val = split_train_val(clean, val_fraction=0.25, seed=seed)
    train_loader = build_loader(train, 64, shuffle=False, drop_last=False)
    val_loader = build_loader(val, 64, shuffle=False, drop_last=False)

    torch.manual_seed(seed)
    model = build_spark("resnet18", size, decoder_width=256)
    random_init = evaluate_encoder(model, train_loader, val_loader, seed=seed)

    # Pre-training sees only the training images, and no labels (labelled=False gives -1);
    # both datasets list the same files in the same order, so the split indices carry over.
    unlabelled = ImageFolderDataset(root, build_pretrain_transform(size), labelled=False)
    assert set(unlabelled.targets) == {-1}
    pretrain_set = Subset(unlabelled, train.indices)
    config = EngineConfig(epochs=5, batch_size=32, base_lr=0.1, warmup_epochs=1, seed=seed)
    history = PretrainEngine(model, config).fit(pretrain_set)
    pretrained = evaluate_encoder(model, train_loader, val_loader, seed=seed)

    losses = [m.loss for m in history]
    assert losses[-1] < losses[0] - 0.1, losses  # measured 0.99 -> 0.75 to 0.82
    # Measured margins: linear probe 49 to 65 points, kNN 29 to 45 points over 5 seeds.
    assert pretrained["linear_probe_top1"] >= random_init["linear_probe_top1"] + 25, (
        random_init,
        pretrained,
    )
    assert pretrained["knn_top1"] >= random_init["knn_top1"] + 10, (random_init, pretrained)
