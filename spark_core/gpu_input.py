"""Pre-training input decoded and augmented on the training device (``decoder="gpu"``).

The reference pipeline (:func:`spark_core.data.build_pretrain_transform`) decodes and augments
every image with PIL in DataLoader workers; at 2000+ images/s per GPU that takes more CPU
cores than a GPU machine has. Here the loader workers only read the encoded files and draw
each sample's crop and flip (the JPEG header gives the image size, nothing is decoded); the
training device decodes the batch (``torchvision.io.decode_jpeg(..., device=...)``: nvJPEG
on CUDA) and crops, resizes, flips and normalises it:

* :class:`EncodedJpegDataset` -- an image folder whose samples are
  ``(encoded uint8 (N,), crop (5,), label)``;
* :func:`collate_encoded` -- the loader's collate: an :class:`EncodedBatch` (the files of a
  batch packed into one buffer, :meth:`EncodedBatch.files` gives them back as a list);
* :class:`DeviceAugment` -- a list of encoded JPEGs -> normalised float ``(B, 3, H, W)`` on a
  device;
* :func:`sample_crop_flip` -- one image's crop and flip, drawn as the reference draws them;
* :data:`INPUT_DECODERS` -- ``"cpu"`` (the reference pipeline) and ``"gpu"`` (this one): which
  dataset reads the files, how the loader collates them, what turns a batch into model input.

Same augmentation as the reference: the crop and the flip are drawn by torchvision's own
``RandomResizedCrop.get_params`` and ``RandomHorizontalFlip``'s draw, from torch's global
generator in the same order, so a sample seeded alike (the engine seeds each sample) gets the
same crop and flip on both paths; the crop goes through the same torchvision
``resized_crop`` (bicubic, antialiased, rounded to uint8 as PIL rounds), then ``/ 255`` and the
ImageNet normalisation. Only the JPEG decoders differ (libjpeg-turbo in PIL, nvJPEG on CUDA).
"""

from __future__ import annotations

import functools
import io
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as tvf

from spark_core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JPEG_EXTENSIONS,
    PRETRAIN_CROP_RATIO,
    PRETRAIN_CROP_SCALE,
    PRETRAIN_FLIP_P,
    ImageFolderDataset,
    _check_input_size,
    _format_paths,
    build_pretrain_transform,
)

#: Every JPEG starts with the SOI marker ``FF D8`` followed by another marker's ``FF``.
JPEG_SIGNATURE: bytes = b"\xff\xd8\xff"
_GPU_READS_JPEG_ONLY = (
    "decoder=gpu reads JPEG only; convert the images to JPEG (.jpg/.jpeg), or use the CPU "
    "decoder (decoder=cpu), which reads every format PIL reads"
)


class CropFlip(NamedTuple):
    """One sample's augmentation: the crop box in source pixels and whether to flip it."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_tensor(self) -> torch.Tensor:
        """``int64 (5,)``: ``[top, left, height, width, flip]`` (what a batch carries)."""
        return torch.tensor([self.top, self.left, self.height, self.width, int(self.flip)])


def sample_crop_flip(image: Image.Image | torch.Tensor) -> CropFlip:
    """Draw one image's crop and flip exactly as :func:`~spark_core.data.build_pretrain_transform`
    does: ``RandomResizedCrop.get_params`` (scale :data:`~spark_core.data.PRETRAIN_CROP_SCALE`,
    ratio :data:`~spark_core.data.PRETRAIN_CROP_RATIO`, with its centre-crop fallback after 10
    tries), then ``torch.rand(1) < PRETRAIN_FLIP_P``, from torch's global CPU generator.

    Only the image's size is read: ``image`` can be a PIL image whose pixels were never
    decoded (``Image.open`` reads the header), or a tensor ``(..., H, W)`` on any device (its
    shape is host metadata, so no device sync).
    """
    top, left, height, width = RandomResizedCrop.get_params(
        image, list(PRETRAIN_CROP_SCALE), list(PRETRAIN_CROP_RATIO)
    )
    return CropFlip(top, left, height, width, bool(torch.rand(1) < PRETRAIN_FLIP_P))


def _not_jpeg_error(what: str, found: str) -> ValueError:
    return ValueError(f"{what} is not a JPEG ({found}): {_GPU_READS_JPEG_ONLY}.")


def _check_signature(data: torch.Tensor, what: str) -> None:
    """Raise unless ``data`` (host ``uint8 (N,)``) starts like a JPEG file."""
    if data.dtype != torch.uint8 or data.ndim != 1 or data.device.type != "cpu":
        raise ValueError(
            f"{what}: expected the encoded file as a 1-D uint8 CPU tensor (what "
            f"torchvision.io.read_file returns), got {data.dtype} {tuple(data.shape)} on "
            f"{data.device}"
        )
    head = bytes(data[: len(JPEG_SIGNATURE)].tolist())
    if head != JPEG_SIGNATURE:
        raise _not_jpeg_error(what, f"it starts with {head.hex(' ') or 'nothing'}")


class EncodedJpegDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """The JPEG files of an image folder, encoded, each with its pre-training crop and flip.

    Files, order, labels and layouts are those of :class:`~spark_core.data.ImageFolderDataset`
    (:attr:`images`), and so is the fallback for an unreadable file (a warning, then the next
    readable sample). Nothing is decoded here: a sample is

    * ``encoded``: ``uint8 (N,)``, the file's bytes;
    * ``crop``: ``int64 (5,)``, ``[top, left, height, width, flip]`` drawn by
      :func:`sample_crop_flip` from the JPEG header's size;
    * ``label``: the class index, ``-1`` in the flat layout.

    Raises:
        ValueError: a file is not a JPEG (by its extension here, by its content when read),
            naming the files and saying that decoder=gpu reads JPEG only.
    """

    def __init__(self, root: str | Path, *, labelled: bool | None = None) -> None:
        self.images = ImageFolderDataset(root, labelled=labelled)
        others = [path for path, _ in self.images.samples if not _has_jpeg_extension(path)]
        if others:
            raise _not_jpeg_error(
                f"{len(others)} of the {len(self.images)} image files under "
                f"{str(self.images.root)!r} ({_format_paths(others)})",
                "by its extension" if len(others) == 1 else "by their extensions",
            )

    @property
    def targets(self) -> list[int]:
        return self.images.targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(encoded uint8 (N,), crop int64 (5,), label)`` of sample ``index``."""
        (encoded, crop), label = self.images.read_sample(index, _read_encoded)
        return encoded, crop.as_tensor(), label


def _has_jpeg_extension(path: Path) -> bool:
    return path.suffix.lower() in JPEG_EXTENSIONS


def _read_encoded(path: Path) -> tuple[torch.Tensor, CropFlip]:
    """The file's bytes and its crop and flip, drawn from the size in its header."""
    raw = path.read_bytes()
    # Image.open parses the header only; a file it cannot identify raises OSError, which
    # the folder's fallback turns into a warning and the next sample.
    with Image.open(io.BytesIO(raw)) as header:
        if header.format != "JPEG":
            raise _not_jpeg_error(str(path), f"{header.format} content")
        crop = sample_crop_flip(header)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8), crop


class EncodedBatch(NamedTuple):
    """A batch of :class:`EncodedJpegDataset` samples (what :func:`collate_encoded` returns).

    The files are packed into one buffer: a batch crosses from a loader worker in one
    shared-memory block instead of one per file (a file descriptor each), and is pinned in
    one piece.

    Attributes:
        data: ``uint8 (sum of N_i,)``, the files one after another.
        offsets: ``int64 (B + 1,)``, file ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
        crops: ``int64 (B, 5)``, each sample's ``[top, left, height, width, flip]``.
        labels: ``int64 (B,)``.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    crops: torch.Tensor
    labels: torch.Tensor

    def files(self) -> list[torch.Tensor]:
        """The encoded files, ``B`` views ``uint8 (N_i,)`` of :attr:`data`."""
        bounds = self.offsets.tolist()  # a host tensor: no device sync
        return [self.data[start:end] for start, end in itertools.pairwise(bounds)]


def collate_encoded(samples: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> EncodedBatch:
    """The DataLoader ``collate_fn`` for :class:`EncodedJpegDataset`: files of different
    lengths cannot be stacked, so they are packed (see :class:`EncodedBatch`)."""
    encoded, crops, labels = zip(*samples, strict=True)
    lengths = torch.tensor([0, *(len(data) for data in encoded)])
    return EncodedBatch(
        data=torch.cat(encoded),
        offsets=lengths.cumsum(0),
        crops=torch.stack(crops),
        labels=torch.tensor(labels),
    )


class DeviceAugment:
    """The reference pre-training augmentation of encoded JPEGs, on ``device``.

    ``augment(files)`` decodes the list of encoded JPEGs in one batched
    ``torchvision.io.decode_jpeg(..., device=device)`` call (RGB), crops each image
    (``crops`` given, or drawn by :func:`sample_crop_flip`), resizes the crop to
    ``input_size`` (bicubic, antialiased, rounded to uint8), flips it, and returns the batch
    divided by 255 and normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``: what
    :func:`~spark_core.data.build_pretrain_transform` gives, stacked. Everything after the
    decode runs on ``device`` and reads nothing back to the host.

    Args:
        input_size: output side length, or ``(height, width)``.
        device: where to decode and augment (``"cuda"``; ``"cpu"`` works too, for tests).
    """

    def __init__(self, input_size: int | tuple[int, int], device: str | torch.device = "cpu"):
        self.size = list(_check_input_size(input_size))
        self.device = torch.device(device)
        # On the device once: torchvision's normalize() copies them over and checks the std
        # for zeros (a host sync) at every call.
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={tuple(self.size)}, device={self.device})"

    def __call__(
        self, files: Sequence[torch.Tensor], crops: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Augment one batch.

        Args:
            files: ``B`` encoded JPEG files, each a host ``uint8 (N_i,)`` tensor.
            crops: host ``int64 (B, 5)`` ``[top, left, height, width, flip]`` per file (as
                :class:`EncodedJpegDataset` draws them); ``None`` draws them here, from
                torch's global generator.

        Returns:
            ``float32 (B, 3, H, W)`` on ``device``.

        Raises:
            ValueError: an empty batch, a file that is not a JPEG, or crops that do not fit.
        """
        if not files:
            raise ValueError("an empty batch: pass at least one encoded JPEG")
        for index, data in enumerate(files):
            _check_signature(data, f"encoded image {index} of the batch")
        decoded = decode_jpeg(list(files), mode=ImageReadMode.RGB, device=self.device)
        boxes = (
            [sample_crop_flip(image) for image in decoded]
            if crops is None
            else [CropFlip(*row[:4], flip=bool(row[4])) for row in crops.tolist()]
        )
        if len(boxes) != len(decoded):
            raise ValueError(f"{len(files)} files but {len(boxes)} crops: give one per file")
        return self._augment(decoded, boxes)

    def _augment(self, decoded: Sequence[torch.Tensor], boxes: Sequence[CropFlip]) -> torch.Tensor:
        """Decoded ``uint8 (3, H_i, W_i)`` images on the device -> the normalised batch, with
        no read back to the host (the boxes are host values)."""
        resized = [self._crop(image, box) for image, box in zip(decoded, boxes, strict=True)]
        # ToTensor's / 255, then Normalize's (x - mean) / std, in place.
        return torch.stack(resized).float().div_(255.0).sub_(self.mean).div_(self.std)

    def _crop(self, image: torch.Tensor, box: CropFlip) -> torch.Tensor:
        """``uint8 (3, H, W)`` -> the resized crop, ``uint8 (3, *size)``, flipped if asked."""
        height, width = image.shape[-2:]
        if box.top + box.height > height or box.left + box.width > width or min(box) < 0:
            raise ValueError(
                f"crop {box} does not fit a {width}x{height} image: draw crops from the "
                "image's own size (sample_crop_flip)"
            )
        # torchvision's resized_crop on a uint8 tensor resizes in float, then clamps and
        # rounds to uint8: what PIL's bicubic resize gives the reference path.
        out = tvf.resized_crop(
            image,
            box.top,
            box.left,
            box.height,
            box.width,
            self.size,
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        return tvf.hflip(out) if box.flip else out


# --------------------------------------------------------------------------------------------
# The decoders a pre-training run can use
# --------------------------------------------------------------------------------------------

BatchToImages = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class InputDecoder:
    """One way of feeding pre-training images to the model (a value of
    :data:`INPUT_DECODERS`).

    Attributes:
        dataset: ``(folder, input_size) -> dataset`` over the folder's images, unlabelled.
        collate_fn: the DataLoader's ``collate_fn`` (``None``: PyTorch's default).
        batch_to_images: ``(input_size, device) -> f`` where ``f(batch)`` is the model's
            input ``(B, 3, H, W)`` (on ``device`` when the decoder works there).
        synthetic_format: the file format to generate synthetic data in for this decoder.
    """

    dataset: Callable[[Path, int | tuple[int, int]], Dataset[Any]]
    collate_fn: Callable[[list[Any]], Any] | None
    batch_to_images: Callable[[int | tuple[int, int], torch.device], BatchToImages]
    synthetic_format: str


def _reference_dataset(root: Path, input_size: int | tuple[int, int]) -> ImageFolderDataset:
    return ImageFolderDataset(root, build_pretrain_transform(input_size), labelled=False)


def _encoded_dataset(root: Path, input_size: int | tuple[int, int]) -> EncodedJpegDataset:
    return EncodedJpegDataset(root, labelled=False)


def _first(batch: Sequence[torch.Tensor]) -> torch.Tensor:
    return batch[0]


def _stacked_images(input_size: int | tuple[int, int], device: torch.device) -> BatchToImages:
    # The loader already stacked (images, labels); the engine copies the images over.
    return _first


def _augment(augment: DeviceAugment, batch: EncodedBatch) -> torch.Tensor:
    return augment(batch.files(), batch.crops)


def _device_augmented(input_size: int | tuple[int, int], device: torch.device) -> BatchToImages:
    return functools.partial(_augment, DeviceAugment(input_size, device))


#: ``decoder`` name -> how its images reach the model. ``cpu``: PIL decodes and augments in
#: the loader workers (the reference); ``gpu``: workers read encoded JPEGs, the training
#: device decodes and augments them (:class:`DeviceAugment`).
INPUT_DECODERS: Mapping[str, InputDecoder] = MappingProxyType(
    {
        "cpu": InputDecoder(_reference_dataset, None, _stacked_images, "png"),
        "gpu": InputDecoder(_encoded_dataset, collate_encoded, _device_augmented, "jpg"),
    }
)


def input_decoder(name: str) -> InputDecoder:
    """The :data:`INPUT_DECODERS` entry ``name``; ``ValueError`` listing the names otherwise."""
    if name not in INPUT_DECODERS:
        raise ValueError(f"decoder={name!r}: allowed values are {', '.join(INPUT_DECODERS)}")
    return INPUT_DECODERS[name]
