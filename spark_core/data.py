"""Data pipeline for SparK pre-training: transforms, image folders, synthetic data, loaders.

Everything here depends only on torch, torchvision, numpy, PIL and the standard library.

* :func:`build_pretrain_transform` / :func:`build_eval_transform` -- PIL image -> float tensor
  ``(3, H, W)`` normalised with the ImageNet statistics.
* :class:`ImageFolderDataset` -- a recursive image folder, labelled (class sub-folders) or flat,
  that survives corrupt files instead of crashing mid-epoch.
* :func:`generate_synthetic_dataset` -- a deterministic, procedurally generated labelled
  ImageFolder whose classes are learnable from image content but not from mean colour
  (``style="shapes"``: shape and texture of a blob; ``style="textures"``: orientation of a
  whole-image periodic pattern).
* :func:`split_train_val` -- a stratified, seeded train/validation split.
* :func:`build_loader` -- a ``DataLoader`` whose sample order is reproducible for a seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
JPEG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg")

#: The reference pre-training crop: area fraction kept and aspect-ratio range (torchvision's
#: ``RandomResizedCrop`` semantics), and the horizontal-flip probability. Both input paths
#: (:func:`build_pretrain_transform` and :mod:`spark_core.gpu_input`) read them from here.
PRETRAIN_CROP_SCALE: tuple[float, float] = (0.67, 1.0)
PRETRAIN_CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
PRETRAIN_FLIP_P = 0.5

#: Errors that mean "this file cannot be decoded as an image" (PIL raises all of these).
_UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and truncated files
    SyntaxError,  # some PIL plugins report broken headers this way (e.g. "broken PNG file")
    Image.DecompressionBombError,
)

ImageTransform = Callable[[Image.Image], torch.Tensor]
SampleT = TypeVar("SampleT")


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _check_input_size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    """Return ``input_size`` as ``(height, width)``; raise ``ValueError`` if not positive ints."""
    if isinstance(input_size, bool):
        raise ValueError(f"input_size must be an int or (height, width), got {input_size!r}")
    if isinstance(input_size, int):
        size = (input_size, input_size)
    elif (
        isinstance(input_size, Sequence)
        and len(input_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in input_size)
    ):
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise ValueError(
            f"input_size must be an int or a (height, width) pair of ints, got {input_size!r}"
        )
    if min(size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return size


def build_pretrain_transform(input_size: int | tuple[int, int]) -> ImageTransform:
    """The SparK reference pre-training augmentation.

    ``RandomResizedCrop(input_size, scale=PRETRAIN_CROP_SCALE (0.67-1), bicubic)`` ->
    ``RandomHorizontalFlip(PRETRAIN_FLIP_P)`` -> ``ToTensor`` ->
    ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``. :class:`spark_core.gpu_input.DeviceAugment` is
    the same augmentation on decoded tensors, on any device.

    Args:
        input_size: output side length, or ``(height, width)``.

    Returns:
        A callable mapping a PIL RGB image of any size to a float tensor ``(3, H, W)``.
    """
    size = _check_input_size(input_size)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                size,
                scale=PRETRAIN_CROP_SCALE,
                ratio=PRETRAIN_CROP_RATIO,
                interpolation=InterpolationMode.BICUBIC,
            ),
            transforms.RandomHorizontalFlip(PRETRAIN_FLIP_P),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_eval_transform(input_size: int | tuple[int, int]) -> ImageTransform:
    """Deterministic evaluation transform: resize shorter side, centre crop, normalise.

    The shorter image side is resized (bicubic, antialiased) to ``max(H, W)`` of ``input_size``,
    then the centre ``(H, W)`` crop is taken, so the aspect ratio is never distorted.

    Args:
        input_size: output side length, or ``(height, width)``.

    Returns:
        A callable mapping a PIL RGB image of any size to a float tensor ``(3, H, W)``.
    """
    height, width = _check_input_size(input_size)
    return transforms.Compose(
        [
            transforms.Resize(
                max(height, width), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive, sorted, hidden files/folders skipped)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if _is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _format_paths(paths: Sequence[Path] | set[Path], limit: int = 5) -> str:
    shown = sorted(str(p) for p in paths)
    text = ", ".join(shown[:limit])
    if len(shown) > limit:
        text += f", ... ({len(shown) - limit} more)"
    return text


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images found recursively under ``root``, labelled by class sub-folder or unlabelled.

    Layouts (file extensions :data:`IMAGE_EXTENSIONS`, case-insensitive; names starting with
    ``.`` are ignored):

    * **class layout** -- ``root/<class>/**/<image>``: the sorted names of the immediate
      sub-folders that contain images are :attr:`classes`; an image's label is the index of
      the top-level sub-folder it lies under (however deeply nested).
    * **flat layout** -- images anywhere under ``root`` without that structure (no sub-folder
      holds images, or images also lie directly in ``root``): every label is ``-1`` and
      :attr:`classes` is ``[]``.

    ``labelled=None`` picks the layout automatically; ``labelled=True`` demands the class
    layout (``ValueError`` otherwise); ``labelled=False`` forces the flat layout.

    Samples are ordered by their path relative to ``root``, so indices are deterministic.

    A file that cannot be decoded does not crash an epoch: a warning naming the file is logged,
    the path is added to :attr:`bad_files` and the next readable sample (index + 1, wrapping)
    is returned instead. Call :meth:`verify` before training to list bad files up front. Note
    that with ``num_workers > 0`` each worker process holds its own copy of :attr:`bad_files`.

    Attributes:
        root: the resolved root folder.
        samples: ``(path, label)`` pairs in index order.
        targets: the labels, in index order.
        classes: class names (empty for the flat layout).
        class_to_idx: class name -> label.
        labelled: whether the class layout is in use.
        bad_files: paths found unreadable so far.
    """

    def __init__(
        self,
        root: str | Path,
        transform: ImageTransform | None = None,
        *,
        labelled: bool | None = None,
    ) -> None:
        """Scan ``root``.

        Args:
            root: folder to scan recursively.
            transform: applied to each PIL RGB image; ``None`` gives ``ToTensor`` output,
                a float tensor ``(3, H, W)`` in ``[0, 1]``.
            labelled: ``None`` (auto-detect), ``True`` (require class sub-folders) or
                ``False`` (treat as flat, labels ``-1``).

        Raises:
            FileNotFoundError: ``root`` is missing or holds no image files.
            NotADirectoryError: ``root`` is a file.
            ValueError: ``labelled=True`` but ``root`` is not in the class layout.
        """
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise FileNotFoundError(
                f"Image folder {str(root_path)!r} does not exist; pass the folder that holds "
                f"your images (extensions {', '.join(IMAGE_EXTENSIONS)}), e.g. one written by "
                "spark_core.data.generate_synthetic_dataset()."
            )
        if not root_path.is_dir():
            raise NotADirectoryError(
                f"{str(root_path)!r} is a file, not a folder; pass the folder holding the images."
            )
        self.root: Path = root_path.resolve()
        self.transform: ImageTransform | None = transform

        files = scan_images(self.root)
        if not files:
            raise FileNotFoundError(
                f"No image files found under {str(self.root)!r} (searched recursively for "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}, case-insensitive; hidden files are "
                "skipped). Put images there or point root at the right folder."
            )

        loose = [p for p in files if p.parent == self.root]
        class_names = sorted({p.relative_to(self.root).parts[0] for p in files if p not in loose})
        if labelled is True:
            if not class_names:
                raise ValueError(
                    f"labelled=True needs class sub-folders (root/<class>/<image>), but "
                    f"{str(self.root)!r} has no sub-folder containing images. Move the images "
                    "into one folder per class, or pass labelled=None/False for unlabelled data."
                )
            if loose:
                raise ValueError(
                    f"labelled=True but {len(loose)} image(s) lie directly in {str(self.root)!r} "
                    f"outside any class sub-folder ({_format_paths(loose)}). Move them into a "
                    "class folder or delete them, or pass labelled=False."
                )
            use_classes = True
        elif labelled is False:
            use_classes = False
        else:
            use_classes = bool(class_names) and not loose
            if class_names and loose:
                logger.info(
                    "%s has images both directly in it and in sub-folders; treating it as an "
                    "unlabelled flat folder (labels -1).",
                    self.root,
                )

        self.labelled: bool = use_classes
        self.classes: list[str] = class_names if use_classes else []
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (p, self.class_to_idx[p.relative_to(self.root).parts[0]] if use_classes else -1)
            for p in files
        ]
        self.targets: list[int] = [label for _, label in self.samples]
        self.bad_files: set[Path] = set()
        logger.debug(
            "ImageFolderDataset %s: %d images, %d classes",
            self.root,
            len(self.samples),
            len(self.classes),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, "
            f"classes={len(self.classes)}, labelled={self.labelled})"
        )

    def _load(self, path: Path) -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")  # forces a full decode inside the try of the caller

    def load_image(self, index: int) -> tuple[Image.Image, int]:
        """The untransformed RGB PIL image and label at ``index`` (with bad-file fallback)."""
        return self.read_sample(index, self._load)

    def read_sample(self, index: int, read: Callable[[Path], SampleT]) -> tuple[SampleT, int]:
        """``(read(path), label)`` of sample ``index``, or of the next readable sample when
        ``read`` fails with an unreadable-image error (the bad-file fallback of this class).

        Raises:
            IndexError: ``index`` out of range.
            RuntimeError: no file of the dataset can be read.
        """
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        index %= n
        for offset in range(n):
            path, label = self.samples[(index + offset) % n]
            if path in self.bad_files:
                continue
            try:
                return read(path), label
            except _UNREADABLE_ERRORS as exc:
                self.bad_files.add(path)
                logger.warning(
                    "Skipping unreadable image %s (%s: %s); using the next sample instead. "
                    "Run ImageFolderDataset.verify() to list all bad files, then fix or delete "
                    "them.",
                    path,
                    type(exc).__name__,
                    exc,
                )
        raise RuntimeError(
            f"None of the {n} images under {str(self.root)!r} could be read; bad files include: "
            f"{_format_paths(self.bad_files)}. Check that they are valid "
            f"{'/'.join(IMAGE_EXTENSIONS)} images."
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image, label)``: float tensor ``(3, H, W)`` and int label (``-1`` if flat)."""
        image, label = self.load_image(index)
        tensor = self.transform(image) if self.transform is not None else tvf.to_tensor(image)
        return tensor, label

    def verify(self, *, full: bool = False) -> list[Path]:
        """Open every file and return the unreadable ones (sorted); they join :attr:`bad_files`.

        Args:
            full: also decode all pixels (slower, but catches truncated pixel data that PIL's
                header-level ``Image.verify()`` misses, notably in JPEGs).

        Returns:
            The paths that could not be read, sorted.
        """
        bad: list[Path] = []
        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    image.verify()
                if full:
                    self._load(path)
            except _UNREADABLE_ERRORS as exc:
                logger.warning("Unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
                bad.append(path)
        self.bad_files.update(bad)
        if bad:
            logger.warning(
                "%d of %d images under %s are unreadable: %s",
                len(bad),
                len(self.samples),
                self.root,
                _format_paths(bad),
            )
        return sorted(bad)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

_MANIFEST_NAME = "manifest.json"
_SYNTHETIC_VERSION = 1
_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "checker")
#: Grating frequencies, in cycles per image width; 0 means an untextured (flat) fill.
_TEXTURE_FREQUENCIES: tuple[float, ...] = (0.0, 3.0, 6.5, 11.0)
_MAX_SYNTHETIC_CLASSES = len(_SHAPES) * len(_TEXTURE_FREQUENCIES)
#: Values of ``generate_synthetic_dataset(style=...)``.
SYNTHETIC_STYLES: tuple[str, ...] = ("shapes", "textures")
_FORMATS: Mapping[str, tuple[str, dict[str, Any]]] = MappingProxyType(
    {
        "png": ("PNG", {"compress_level": 1}),
        "jpg": ("JPEG", {"quality": 95}),
        "jpeg": ("JPEG", {"quality": 95}),
        "webp": ("WEBP", {"quality": 95}),
    }
)


def synthetic_class_recipe(class_index: int) -> tuple[str, float]:
    """The ``(shape, texture frequency)`` that defines synthetic class ``class_index``.

    Shape cycles with period 6 and texture with period 4 (offset every 6 classes), so the first
    24 classes are all distinct ``(shape, texture)`` combinations.
    """
    if not 0 <= class_index < _MAX_SYNTHETIC_CLASSES:
        raise ValueError(f"class_index must be in [0, {_MAX_SYNTHETIC_CLASSES}), got {class_index}")
    shape = _SHAPES[class_index % len(_SHAPES)]
    texture = (class_index + class_index // len(_SHAPES)) % len(_TEXTURE_FREQUENCIES)
    return shape, _TEXTURE_FREQUENCIES[texture]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask ``(H, W)`` of ``shape`` in unit shape coordinates ``u, v`` ``(H, W)``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1.2
        half = 0.6
        c30 = np.sqrt(3.0) / 2.0
        return (-v <= half) & (c30 * u + 0.5 * v <= half) & (-c30 * u + 0.5 * v <= half)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "checker":  # 3 x 3 checkerboard of squares, 5 of 9 cells filled
        inside = np.maximum(np.abs(u), np.abs(v)) <= 0.9
        cells = np.floor((u + 0.9) / 0.6) + np.floor((v + 0.9) / 0.6)
        return inside & (cells % 2 == 0)
    raise ValueError(f"unknown shape {shape!r}")


def _colour_pair(rng: np.random.Generator, min_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Two i.i.d. uniform RGB colours conditioned (symmetrically) to differ by ``min_distance``."""
    while True:
        a, b = rng.uniform(0.0, 1.0, size=(2, 3))
        if np.linalg.norm(a - b) >= min_distance:
            return a, b


def _render_synthetic_image(
    rng: np.random.Generator, class_index: int, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Draw one image of class ``class_index`` as ``uint8 (H, W, 3)``.

    The class fixes the shape and the texture frequency; everything else (colours, position,
    size, rotation, texture orientation and phase, background gradient and noise) is random.
    All colours are drawn from distributions symmetric about 0.5, so the expected mean colour
    is the same for every class.
    """
    shape, frequency = synthetic_class_recipe(class_index)
    foreground, background = _colour_pair(rng, 0.45)
    if rng.random() < 0.5:
        foreground, background = background, foreground
    _, second = _colour_pair(rng, 0.35)  # texture colour, i.i.d. with the others
    size = rng.uniform(0.32, 0.55)
    cx, cy = rng.uniform(-(0.92 - size), 0.92 - size, size=2)
    theta, phi, phase = rng.uniform(0.0, 2.0 * np.pi, size=3)
    gradient = rng.uniform(-0.12, 0.12, size=(2, 3))
    noise_sigma = rng.uniform(0.01, 0.06)

    dx, dy = xx - cx, yy - cy
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    u = (dx * cos_t + dy * sin_t) / size
    v = (-dx * sin_t + dy * cos_t) / size
    mask = _shape_mask(shape, u, v)[..., None]

    if frequency > 0:
        along = xx * np.cos(phi) + yy * np.sin(phi)  # [-1, 1] spans one image width
        pattern = 0.5 + 0.5 * np.sin(np.pi * frequency * along + phase)
    else:
        pattern = np.full_like(xx, 0.5)
    pattern = pattern[..., None]
    fill = foreground * (1.0 - pattern) + second * pattern
    back = background + xx[..., None] * gradient[0] + yy[..., None] * gradient[1]
    image = np.where(mask, fill, back)
    image = image + rng.normal(0.0, noise_sigma, size=image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def synthetic_texture_orientation(class_index: int, num_classes: int) -> float:
    """Orientation (radians, in ``[0, pi)``) of the pattern of ``style="textures"`` class
    ``class_index``: the classes split the half-turn evenly, ``pi * class_index / num_classes``.
    """
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index must be in [0, {num_classes}), got {class_index}")
    return np.pi * class_index / num_classes


#: ``style="textures"``: pattern frequency range, in cycles per image width.
_TEXTURE_PATTERN_FREQUENCY: tuple[float, float] = (1.0, 2.0)
#: Orientation jitter, as a fraction of the angle between neighbouring classes (either way).
_TEXTURE_JITTER = 0.25


def _chroma(rng: np.random.Generator) -> np.ndarray:
    """A random unit RGB direction orthogonal to grey ``(1, 1, 1)``: a pure change of hue."""
    v = rng.normal(size=3)
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-12)


def _tinted_axis(rng: np.random.Generator, max_chroma: float) -> np.ndarray:
    """A colour direction scaled so that its channel mean is 1: grey plus a random hue."""
    axis = np.ones(3) + rng.uniform(0.0, max_chroma) * np.sqrt(3.0) * _chroma(rng)
    return axis / np.linalg.norm(axis) * np.sqrt(3.0)


def _render_texture_image(
    rng: np.random.Generator, class_index: int, num_classes: int, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Draw one ``style="textures"`` image of class ``class_index`` as ``uint8 (H, W, 3)``.

    The whole image is a periodic pattern (a sine wave sharpened towards a square wave) whose
    orientation is fixed by the class (:func:`synthetic_texture_orientation`, jittered by a
    quarter of the class spacing). Everything else is random per image: frequency (1-2 cycles
    per image width), phase, waveform sharpness, brightness, contrast, a colour tint and the
    hue of the pattern, a fine distractor grating at a random orientation and frequency, and
    pixel noise. The distributions do not depend on the class, so neither does the expected
    mean colour. Masked reconstruction must model the pattern to fill in hidden patches.

    Colour variation is deliberately moderate. SparK's target normalises each patch with one
    mean and standard deviation over all three channels, so it keeps the offsets between the
    channels, i.e. the patch's colour, which the whole image shares: with strongly coloured
    images reconstruction first lowers the loss by copying colour into the hidden patches, and
    a short pre-training then learns little about the pattern.
    """
    spacing = np.pi / num_classes
    theta = synthetic_texture_orientation(class_index, num_classes)
    theta += rng.uniform(-_TEXTURE_JITTER, _TEXTURE_JITTER) * spacing
    frequency = rng.uniform(*_TEXTURE_PATTERN_FREQUENCY)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    sharpness = rng.uniform(0.5, 3.0)
    brightness = rng.uniform(0.25, 0.75)
    contrast = rng.uniform(0.12, 0.3)
    tint = rng.uniform(0.0, 0.1) * _chroma(rng)
    axis = _tinted_axis(rng, 0.3)
    fine_theta, fine_phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    fine_frequency = rng.uniform(6.0, 12.0)
    fine_contrast = rng.uniform(0.0, 0.12)
    fine_axis = _tinted_axis(rng, 0.3)
    noise_sigma = rng.uniform(0.02, 0.1)

    along = xx * np.cos(theta) + yy * np.sin(theta)  # [-1, 1] spans one image width
    wave = np.tanh(sharpness * np.sin(np.pi * frequency * along + phase)) / np.tanh(sharpness)
    fine_along = xx * np.cos(fine_theta) + yy * np.sin(fine_theta)
    fine = np.sin(np.pi * fine_frequency * fine_along + fine_phase)
    image = (
        brightness
        + tint
        + contrast * wave[..., None] * axis
        + fine_contrast * fine[..., None] * fine_axis
    )
    image = image + rng.normal(0.0, noise_sigma, size=image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _synthetic_params(
    num_images: int,
    image_size: int,
    num_classes: int,
    seed: int,
    image_format: str,
    style: str = "shapes",
) -> dict[str, Any]:
    return {
        "generator": "spark_core.data.generate_synthetic_dataset",
        "version": _SYNTHETIC_VERSION,
        "style": style,
        "num_images": num_images,
        "image_size": image_size,
        "num_classes": num_classes,
        "seed": seed,
        "image_format": image_format,
    }


def _synthetic_relpath(index: int, num_classes: int, image_format: str) -> Path:
    return Path(f"class_{index % num_classes:02d}") / f"img_{index:05d}.{image_format}"


def _iter_synthetic(params: dict[str, Any]) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(relative path, uint8 (S, S, 3) image)`` for every image, in a fixed order."""
    size = params["image_size"]
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    rng = np.random.default_rng(params["seed"])
    num_classes = params["num_classes"]
    textures = params.get("style", "shapes") == "textures"
    for index in range(params["num_images"]):
        class_index = index % num_classes
        relpath = _synthetic_relpath(index, num_classes, params["image_format"])
        if textures:
            yield relpath, _render_texture_image(rng, class_index, num_classes, xx, yy)
        else:
            yield relpath, _render_synthetic_image(rng, class_index, xx, yy)


def _write_synthetic(root: Path, params: dict[str, Any], only_missing: bool = False) -> int:
    """Write the images of ``params`` under ``root``; return how many files were written."""
    pil_format, save_kwargs = _FORMATS[params["image_format"]]
    for k in range(params["num_classes"]):
        (root / f"class_{k:02d}").mkdir(parents=True, exist_ok=True)
    written = 0
    for relpath, array in _iter_synthetic(params):
        target = root / relpath
        if only_missing and target.exists():
            continue
        Image.fromarray(array).save(target, format=pil_format, **save_kwargs)
        written += 1
    return written


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / _MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{str(path)!r} is unreadable ({exc}); delete the folder {str(root)!r} and call "
            "generate_synthetic_dataset() again."
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object; delete {str(root)!r} and retry.")
    return data


def _reuse_existing(root: Path, manifest: dict[str, Any], params: dict[str, Any]) -> Path:
    """Return ``root`` if ``manifest`` matches ``params`` (repairing missing files), else raise."""
    # Manifests written before the ``style`` option existed describe "shapes" datasets.
    stored = {key: manifest.get(key, "shapes" if key == "style" else None) for key in params}
    if stored != params:
        diff = {k: (stored[k], params[k]) for k in params if stored[k] != params[k]}
        raise ValueError(
            f"{str(root)!r} already holds a synthetic dataset generated with different "
            f"parameters (existing vs requested: {diff}). Use another folder, delete this one, "
            "or call with the existing parameters."
        )
    expected = (
        _synthetic_relpath(i, params["num_classes"], params["image_format"])
        for i in range(params["num_images"])
    )
    missing = [rel for rel in expected if not (root / rel).is_file()]
    if missing:
        logger.warning(
            "Synthetic dataset %s is missing %d file(s) (e.g. %s); regenerating them.",
            root,
            len(missing),
            missing[0],
        )
        _write_synthetic(root, params, only_missing=True)
    else:
        logger.debug("Synthetic dataset %s already complete; nothing to do.", root)
    return root


def generate_synthetic_dataset(
    root: str | Path,
    *,
    num_images: int = 256,
    image_size: int = 96,
    num_classes: int = 4,
    seed: int = 0,
    image_format: str = "png",
    style: str = "shapes",
) -> Path:
    """Write a procedurally generated, labelled ImageFolder; no downloads.

    Layout: ``root/class_00/img_00000.png``, ``root/class_01/img_00001.png``, ... (image ``i``
    belongs to class ``i % num_classes``, so classes are balanced to within one image), plus
    ``root/manifest.json`` with the parameters.

    ``style="shapes"`` (the default): class ``k`` fixes the shape of a blob (circle, square,
    triangle, ring, cross, checker) and its texture frequency (see
    :func:`synthetic_class_recipe`); colours, position, size, rotation, texture
    orientation/phase, background gradient and noise are random per image.

    ``style="textures"``: the whole image is a periodic pattern whose orientation is fixed by
    the class (``180° * k / num_classes``, see :func:`synthetic_texture_orientation`);
    frequency, phase, waveform, brightness, contrast, tint, hue, a fine distractor grating and
    noise are random per image. Masked reconstruction has to model the pattern to fill in the
    hidden patches, so a short SparK pre-training already separates these classes, far better
    than the same encoder at random initialisation (see ``tests/test_pretraining.py``).

    In both styles the class is learnable from image content but not from mean colour.
    Output is byte-identical for the same parameters.

    Generation happens in a hidden sibling staging folder that is renamed to ``root`` only
    after ``manifest.json`` has been written last, so an interrupted run is never mistaken for
    a complete dataset. Calling again with the same parameters returns immediately (re-creating
    any deleted image files); different parameters on an existing dataset raise ``ValueError``.

    Args:
        root: destination folder; must be missing, empty, or a previous output of this function.
        num_images: total number of images (``>= num_classes``).
        image_size: side length in pixels of the square RGB images (``>= 8``).
        num_classes: number of classes, 1 to 24.
        seed: seed for ``numpy.random.default_rng``.
        image_format: ``"png"``, ``"jpg"``, ``"jpeg"`` or ``"webp"``.
        style: ``"shapes"`` or ``"textures"`` (:data:`SYNTHETIC_STYLES`).

    Returns:
        ``root`` as a resolved ``Path``.

    Raises:
        ValueError: bad arguments, or ``root`` holds something else (another synthetic dataset
            or unrelated files).
    """
    if style not in SYNTHETIC_STYLES:
        raise ValueError(f"style must be one of {list(SYNTHETIC_STYLES)}, got {style!r}")
    image_format = image_format.lower().lstrip(".")
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    if not 1 <= num_classes <= _MAX_SYNTHETIC_CLASSES:
        raise ValueError(
            f"num_classes must be between 1 and {_MAX_SYNTHETIC_CLASSES}, got {num_classes}"
        )
    if num_images < num_classes:
        raise ValueError(
            f"num_images ({num_images}) must be >= num_classes ({num_classes}) so that every "
            "class has at least one image"
        )
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    params = _synthetic_params(num_images, image_size, num_classes, int(seed), image_format, style)
    root = Path(root).expanduser().resolve()

    if root.exists():
        if not root.is_dir():
            raise ValueError(f"{str(root)!r} is a file; pass a folder path for the dataset.")
        manifest = _read_manifest(root)
        if manifest is not None:
            return _reuse_existing(root, manifest, params)
        if any(root.iterdir()):
            raise ValueError(
                f"{str(root)!r} is not empty and has no {_MANIFEST_NAME}, so it was not written "
                "by generate_synthetic_dataset(); pass a missing or empty folder instead."
            )

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _write_synthetic(staging, params)
        manifest_data = {**params, "classes": [f"class_{k:02d}" for k in range(num_classes)]}
        (staging / _MANIFEST_NAME).write_text(json.dumps(manifest_data, indent=2, sort_keys=True))
        try:
            if root.exists():
                root.rmdir()  # empty (checked above); fails if someone filled it meanwhile
            staging.rename(root)
        except OSError:
            # Another process finished first (or put files there): reuse it if it matches.
            manifest = _read_manifest(root) if root.is_dir() else None
            if manifest is None:
                raise ValueError(
                    f"Could not move the generated dataset into {str(root)!r}: the folder was "
                    "created concurrently with foreign content. Pass a missing or empty folder."
                ) from None
            return _reuse_existing(root, manifest, params)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Generated synthetic %s dataset %s: %d images, %d classes, %dpx, seed %d",
        style,
        root,
        num_images,
        num_classes,
        image_size,
        seed,
    )
    return root


# --------------------------------------------------------------------------------------------
# Splits and loaders
# --------------------------------------------------------------------------------------------


def split_train_val(
    dataset: ImageFolderDataset, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Subset[tuple[torch.Tensor, int]], Subset[tuple[torch.Tensor, int]]]:
    """Stratified, seeded split into ``(train, val)`` subsets.

    Each label group (the flat layout's ``-1`` is one group) is shuffled with
    ``numpy.random.default_rng(seed)`` and ``n * val_fraction`` of its ``n`` images (rounded
    half up) go to val, clamped to ``[1, n - 1]`` so every class with at least 2 images is in
    both parts (a class with one image goes to train). Subset indices are sorted.

    Args:
        dataset: anything with a ``targets`` list, usually an :class:`ImageFolderDataset`.
        val_fraction: fraction of each class for validation, strictly between 0 and 1.
        seed: split seed.

    Returns:
        ``(train_subset, val_subset)``, disjoint and covering the dataset.

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)``, or the dataset is too small to give
            both parts at least one image.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    targets = np.asarray(dataset.targets)
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        rng.shuffle(members)
        n = len(members)
        n_val = 0 if n < 2 else min(max(int(n * val_fraction + 0.5), 1), n - 1)
        val_idx.extend(members[:n_val].tolist())
        train_idx.extend(members[n_val:].tolist())
    if not train_idx or not val_idx:
        raise ValueError(
            f"Cannot split {len(targets)} image(s) into non-empty train and val parts "
            f"(val_fraction={val_fraction}); add images (>= 2 per class)."
        )
    return Subset(dataset, sorted(train_idx)), Subset(dataset, sorted(val_idx))


def _seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's and numpy's RNGs from the worker's torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    sampler: Sampler[int] | None = None,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """A ``DataLoader`` whose sample order (and worker RNGs) are reproducible for ``seed``.

    Batches from an :class:`ImageFolderDataset` are ``(images (B, 3, H, W), labels (B,))``.
    Each new iteration over the loader draws a new order from the seeded generator, so epochs
    differ but two loaders built with the same seed yield the same sequence of epochs.

    Args:
        dataset: map-style dataset.
        batch_size: samples per batch, ``>= 1``.
        shuffle: shuffle every epoch (ignored when ``sampler`` is given; the sampler decides).
        num_workers: loader worker processes (workers are kept alive between epochs).
        seed: seeds the shuffling generator and, through it, each worker's RNGs.
        drop_last: drop the last incomplete batch.
        sampler: custom sampler (e.g. ``DistributedSampler``); replaces ``shuffle``.
        pin_memory: pin host memory for faster host-to-GPU copies.
        collate_fn: merges a list of samples into a batch (default: PyTorch's, which
            stacks tensors); e.g. :func:`spark_core.gpu_input.collate_encoded`.

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, or ``drop_last`` with fewer samples
            than ``batch_size`` (the loader would yield nothing).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    num_samples = len(sampler) if sampler is not None else len(dataset)  # type: ignore[arg-type]
    if drop_last and num_samples < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {num_samples} available samples with "
            "drop_last=True, so the loader would yield no batches; lower batch_size, add data "
            "or pass drop_last=False."
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
