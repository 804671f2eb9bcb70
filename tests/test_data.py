"""Tests for spark_core.data: transforms, image folders, synthetic data, splits, loaders."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dataset_files, ridge_accuracy
from PIL import Image
from torch.utils.data import Dataset

from spark_core.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    build_eval_transform,
    build_loader,
    build_pretrain_transform,
    generate_synthetic_dataset,
    split_train_val,
)

SMALL = {"num_images": 24, "image_size": 32, "num_classes": 4}


def _write_image(path: Path, size: tuple[int, int] = (20, 16), value: int = 128) -> Path:
    """Write a solid RGB image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds", **SMALL)


# ------------------------------------------------------------------ constants / transforms


def test_constants() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".webp")


@pytest.mark.parametrize("size", [32, (24, 40)])
def test_transforms_shapes(size: int | tuple[int, int]) -> None:
    image = Image.new("RGB", (70, 50), (200, 10, 30))
    expected = (3, size, size) if isinstance(size, int) else (3, *size)
    for transform in (build_pretrain_transform(size), build_eval_transform(size)):
        out = transform(image)
        assert out.dtype == torch.float32
        assert tuple(out.shape) == expected
    # Normalised with ImageNet statistics: a solid red channel of 200/255.
    eval_out = build_eval_transform(size)(image)
    assert eval_out[0].mean().item() == pytest.approx((200 / 255 - 0.485) / 0.229, abs=0.02)


def test_pretrain_transform_is_the_reference_augmentation() -> None:
    """Crops keep >= 67 % of the area (bicubic), half the images are flipped, then ImageNet
    normalisation: seen on a ramp image whose red channel encodes the column."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    transform = build_pretrain_transform(32)
    (crop,) = [t for t in transform.transforms if isinstance(t, RandomResizedCrop)]
    assert crop.scale == (0.67, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    ramp = np.tile(np.linspace(0, 255, 128).round().astype(np.uint8), (128, 1))
    image = Image.fromarray(np.stack([ramp, ramp.T, np.zeros_like(ramp)], -1))
    torch.manual_seed(0)
    spans, flipped = [], []
    for _ in range(40):
        red = transform(image)[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # column position in 0..1
        columns = red.mean(0)
        spans.append(float(columns.max() - columns.min()))
        flipped.append(bool(columns[0] > columns[-1]))
    # Area >= 0.67 with aspect ratio <= 4/3 keeps >= sqrt(0.67 * 3/4) = 0.71 of the width.
    assert min(spans) > 0.65
    assert 8 <= sum(flipped) <= 32


@pytest.mark.parametrize("bad", [0, -3, (32,), (32, 0), "32", True])
def test_transform_rejects_bad_size(bad: object) -> None:
    with pytest.raises(ValueError, match="input_size"):
        build_pretrain_transform(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ synthetic data


def test_synthetic_layout_balanced_and_manifest(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "ds", num_images=26, image_size=32, num_classes=4)
    assert root == (tmp_path / "ds").resolve()
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert class_dirs == ["class_00", "class_01", "class_02", "class_03"]
    counts = [len(list((root / d).glob("img_*.png"))) for d in class_dirs]
    assert counts == [7, 7, 6, 6]
    assert (root / "class_01" / "img_00005.png").is_file()
    with Image.open(root / "class_00" / "img_00000.png") as image:
        assert image.size == (32, 32)
        assert image.mode == "RGB"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["num_images"] == 26
    assert manifest["num_classes"] == 4
    assert manifest["seed"] == 0
    # No staging leftovers next to the dataset.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_synthetic_deterministic_for_seed(tmp_path: Path) -> None:
    a = dataset_files(generate_synthetic_dataset(tmp_path / "a", **SMALL, seed=3))
    b = dataset_files(generate_synthetic_dataset(tmp_path / "b", **SMALL, seed=3))
    c = dataset_files(generate_synthetic_dataset(tmp_path / "c", **SMALL, seed=4))
    assert len(a) == SMALL["num_images"]
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_synthetic_regenerate_same_params_is_noop(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "ds", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_synthetic_dataset(tmp_path / "ds", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_synthetic_missing_file_is_restored(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "ds", **SMALL)
    victim = root / "class_02" / "img_00006.png"
    original = victim.read_bytes()
    victim.unlink()
    generate_synthetic_dataset(root, **SMALL)
    assert victim.read_bytes() == original


def test_synthetic_different_params_raise(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "ds", **SMALL)
    with pytest.raises(ValueError, match="different parameters"):
        generate_synthetic_dataset(root, **{**SMALL, "num_images": 32})
    with pytest.raises(ValueError, match="seed"):
        generate_synthetic_dataset(root, **SMALL, seed=1)


def test_synthetic_refuses_foreign_folder_but_accepts_empty(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_synthetic_dataset(foreign, **SMALL)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    root = generate_synthetic_dataset(empty, **SMALL)
    assert (root / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 25}, "num_classes"),
        ({"num_images": 3, "num_classes": 4}, "num_images"),
        ({"image_size": 4}, "image_size"),
        ({"image_format": "gif"}, "image_format"),
    ],
)
def test_synthetic_rejects_bad_args(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_synthetic_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_synthetic_other_formats(tmp_path: Path, image_format: str) -> None:
    root = generate_synthetic_dataset(
        tmp_path / "ds", num_images=8, image_size=24, num_classes=8, image_format=image_format
    )
    ds = ImageFolderDataset(root, build_eval_transform(24))
    assert len(ds) == 8
    assert len(ds.classes) == 8
    assert all(p.suffix == f".{image_format}" for p, _ in ds.samples)
    image, label = ds[7]
    assert tuple(image.shape) == (3, 24, 24)
    assert label == 7


def test_synthetic_classes_need_content_not_mean_colour(tmp_path: Path) -> None:
    size, num_classes = 32, 8
    root = generate_synthetic_dataset(
        tmp_path / "ds", num_images=192, image_size=size, num_classes=num_classes
    )
    ds = ImageFolderDataset(root)
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p, _ in ds.samples])
    labels = np.asarray(ds.targets)
    chance = 1 / num_classes

    # Mean RGB alone gives (near) chance accuracy ...
    mean_rgb = images.mean(axis=(1, 2))
    colour_acc = ridge_accuracy(mean_rgb, labels, num_classes)
    assert colour_acc < chance + 0.175, colour_acc

    # ... while a crude content feature (radial power spectrum of the grey image) does far better.
    grey = images.mean(-1)
    power = np.abs(np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True))) ** 2
    freq = np.fft.fftfreq(size) * size
    radius = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    profile = np.stack(
        [
            np.log(power[:, (radius >= r) & (radius < r + 1)].mean(1) + 1e-8)
            for r in range(size // 2)
        ],
        axis=1,
    )
    content_acc = ridge_accuracy(profile, labels, num_classes)
    assert content_acc > chance + 0.175, content_acc
    assert content_acc > colour_acc + 0.15


# ------------------------------------------------------------------ ImageFolderDataset


def test_dataset_class_layout(synthetic_root: Path) -> None:
    ds = ImageFolderDataset(synthetic_root, build_pretrain_transform(16), labelled=True)
    assert ds.labelled
    assert ds.classes == ["class_00", "class_01", "class_02", "class_03"]
    assert ds.class_to_idx == {"class_00": 0, "class_01": 1, "class_02": 2, "class_03": 3}
    assert len(ds) == SMALL["num_images"]
    for path, label in ds.samples:
        assert path.parent.name == f"class_{label:02d}"
    assert ds.targets == [label for _, label in ds.samples]
    rel = [p.relative_to(synthetic_root).as_posix() for p, _ in ds.samples]
    assert rel == sorted(rel)
    assert rel[:2] == ["class_00/img_00000.png", "class_00/img_00004.png"]
    image, label = ds[6]
    assert tuple(image.shape) == (3, 16, 16)
    assert image.dtype == torch.float32
    assert label == 1
    assert ds[-1][1] == ds.targets[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_without_transform_returns_unit_tensor(synthetic_root: Path) -> None:
    image, _ = ImageFolderDataset(synthetic_root)[0]
    assert tuple(image.shape) == (3, 32, 32)
    assert 0.0 <= image.min().item() <= image.max().item() <= 1.0


def test_dataset_flat_folder(tmp_path: Path) -> None:
    for i in range(3):
        _write_image(tmp_path / f"img{i}.png")
    ds = ImageFolderDataset(tmp_path, build_eval_transform(8))
    assert not ds.labelled
    assert ds.classes == []
    assert ds.targets == [-1, -1, -1]
    image, label = ds[0]
    assert tuple(image.shape) == (3, 8, 8)
    assert label == -1
    with pytest.raises(ValueError, match=re.escape(str(tmp_path.resolve()))):
        ImageFolderDataset(tmp_path, labelled=True)


def test_dataset_loose_images_next_to_class_folders(tmp_path: Path) -> None:
    _write_image(tmp_path / "loose.png")
    _write_image(tmp_path / "cats" / "a.png")
    ds = ImageFolderDataset(tmp_path)
    assert not ds.labelled
    assert ds.targets == [-1, -1]
    with pytest.raises(ValueError, match=r"loose\.png"):
        ImageFolderDataset(tmp_path, labelled=True)
    forced = ImageFolderDataset(tmp_path / "cats", labelled=False)
    assert forced.targets == [-1]


def test_dataset_recursive_discovery(tmp_path: Path) -> None:
    _write_image(tmp_path / "dogs" / "2021" / "march" / "d1.png")
    _write_image(tmp_path / "dogs" / "d0.png")
    _write_image(tmp_path / "cats" / "deep" / "c0.png")
    (tmp_path / "empty_class").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cats", "dogs"]  # folders without images are not classes
    rel = [(p.relative_to(tmp_path.resolve()).as_posix(), label) for p, label in ds.samples]
    assert rel == [
        ("cats/deep/c0.png", 0),
        ("dogs/2021/march/d1.png", 1),
        ("dogs/d0.png", 1),
    ]


def test_dataset_extension_filtering_and_formats(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.jpg", value=10)
    _write_image(tmp_path / "b.JPEG", value=60)
    _write_image(tmp_path / "c.webp", value=110)
    _write_image(tmp_path / "d.PNG", value=160)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "e.gif").write_bytes(b"GIF89a")
    _write_image(tmp_path / ".hidden.png")
    _write_image(tmp_path / ".cache" / "x.png")
    ds = ImageFolderDataset(tmp_path)
    assert [p.name for p, _ in ds.samples] == ["a.jpg", "b.JPEG", "c.webp", "d.PNG"]
    assert ds.verify() == []
    for i, value in enumerate((10, 60, 110, 160)):
        image, _ = ds[i]
        assert tuple(image.shape) == (3, 16, 20)
        assert image[0].mean().item() * 255 == pytest.approx(value, abs=4)
    assert not ds.bad_files


def test_dataset_corrupt_file_is_reported_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_image(tmp_path / "a" / "ok0.png", value=10)
    bad = tmp_path / "a" / "x.png"
    bad.write_bytes(b"this is not a png \x00\x01\x02" * 10)
    _write_image(tmp_path / "b" / "ok1.png", value=200)
    ds = ImageFolderDataset(tmp_path, build_eval_transform(8))
    bad_index = [p.name for p, _ in ds.samples].index("x.png")

    with caplog.at_level(logging.WARNING, logger="spark_core.data"):
        image, label = ds[bad_index]
    assert "x.png" in caplog.text
    assert tuple(image.shape) == (3, 8, 8)
    assert label == ds.targets[bad_index + 1] == 1  # deterministic fallback: the next sample
    assert bad.resolve() in ds.bad_files

    fresh = ImageFolderDataset(tmp_path)
    assert fresh.verify() == [bad.resolve()]
    assert fresh.bad_files == {bad.resolve()}


def test_dataset_truncated_file_detected_by_full_verify(tmp_path: Path) -> None:
    good = _write_image(tmp_path / "good.jpg", size=(64, 64))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    ds = ImageFolderDataset(tmp_path)
    assert ds.verify(full=True) == [truncated.resolve()]


def test_dataset_all_unreadable_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"more garbage")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match=r"a\.png"):
        ds[0]


def test_dataset_missing_and_empty_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"empty.*\.jpg.*\.webp"):
        ImageFolderDataset(empty)
    with pytest.raises(NotADirectoryError, match="readme"):
        ImageFolderDataset(empty / "readme.txt")


# ------------------------------------------------------------------ split


class _Labels(Dataset):
    def __init__(self, targets: list[int]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> int:
        return index


def test_split_stratified_disjoint_deterministic() -> None:
    targets = [0] * 10 + [1] * 7 + [2] * 2 + [3] * 1
    ds = _Labels(targets)
    train, val = split_train_val(ds, val_fraction=0.3, seed=5)  # type: ignore[arg-type]
    train_idx, val_idx = list(train.indices), list(val.indices)
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(targets)))
    val_counts = np.bincount([targets[i] for i in val_idx], minlength=4).tolist()
    train_counts = np.bincount([targets[i] for i in train_idx], minlength=4).tolist()
    assert val_counts == [3, 2, 1, 0]
    assert train_counts == [7, 5, 1, 1]

    again_train, again_val = split_train_val(ds, val_fraction=0.3, seed=5)  # type: ignore[arg-type]
    assert list(again_train.indices) == train_idx
    assert list(again_val.indices) == val_idx
    _, other_val = split_train_val(ds, val_fraction=0.3, seed=6)  # type: ignore[arg-type]
    assert list(other_val.indices) != val_idx


def test_split_on_image_folder(synthetic_root: Path) -> None:
    ds = ImageFolderDataset(synthetic_root)
    train, val = split_train_val(ds, val_fraction=0.25)
    assert len(train) == 16  # 6 per class, round-half-up(1.5) = 2 of each go to val
    assert len(val) == 8
    assert {ds.targets[i] for i in val.indices} == {0, 1, 2, 3}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(_Labels([0, 1] * 5), val_fraction=fraction)  # type: ignore[arg-type]


def test_split_too_small_raises() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        split_train_val(_Labels([0]))  # type: ignore[arg-type]


# ------------------------------------------------------------------ loader


def _order(seed: int, epochs: int = 2) -> list[list[int]]:
    loader = build_loader(_Labels(list(range(40))), batch_size=8, seed=seed)
    return [torch.cat(list(loader)).tolist() for _ in range(epochs)]


def test_loader_order_reproducible_for_seed() -> None:
    first = _order(seed=0)
    assert first == _order(seed=0)
    assert first != _order(seed=1)
    assert first[0] != first[1]  # a new permutation every epoch
    assert sorted(first[0]) == list(range(40))
    unshuffled = build_loader(_Labels(list(range(10))), batch_size=4, shuffle=False)
    assert torch.cat(list(unshuffled)).tolist() == list(range(8))  # drop_last


def test_loader_with_workers_and_augmentation_reproducible(synthetic_root: Path) -> None:
    ds = ImageFolderDataset(synthetic_root, build_pretrain_transform(16))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        loader = build_loader(ds, batch_size=6, num_workers=2, seed=7)
        images, labels = zip(*loader, strict=True)
        return torch.cat(images), torch.cat(labels)

    images_a, labels_a = run()
    images_b, labels_b = run()
    assert images_a.shape == (24, 3, 16, 16)
    assert torch.equal(labels_a, labels_b)
    assert torch.equal(images_a, images_b)


def test_loader_rejects_batch_larger_than_dataset() -> None:
    with pytest.raises(ValueError, match="drop_last"):
        build_loader(_Labels([0, 1, 2]), batch_size=4)
    loader = build_loader(_Labels([0, 1, 2]), batch_size=4, drop_last=False)
    assert len(loader) == 1
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(_Labels([0, 1, 2]), batch_size=0)
