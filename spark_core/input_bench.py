"""Throughput of the pre-training input pipeline: ``python -m spark_core.bench --data``.

Writes ImageNet-like JPEG files to a temporary folder (500x375 at quality 90 by default;
smooth colour blobs, gradients and pixel noise, whose detail gives a photo's ~110 KB and so
its decoding cost), then measures images/s of:

* ``dataloader``: PIL decode + the reference transform
  (:func:`spark_core.data.build_pretrain_transform`) in N DataLoader workers, for each N of
  ``--data-workers``: the ``decoder: cpu`` path;
* ``device``: N workers read the encoded files (:class:`~spark_core.gpu_input.EncodedJpegDataset`)
  and :class:`~spark_core.gpu_input.DeviceAugment` decodes and augments each batch on the
  device, for each N of ``--device-workers``: the ``decoder: gpu`` path;
* ``device-only``: :class:`~spark_core.gpu_input.DeviceAugment` over files already in memory,
  the device's own ceiling.

With ``--device cpu`` the device rows run on the CPU: they check that the path works, they
do not measure a GPU. Each row skips its first batches (at least one per worker, until every
worker has delivered) and times the next ``--data-batches``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, RandomSampler

from spark_core.data import ImageFolderDataset, build_loader, build_pretrain_transform
from spark_core.gpu_input import DeviceAugment, EncodedJpegDataset, collate_encoded

logger = logging.getLogger(__name__)

#: ``--data`` replaces the step benchmark's per-device defaults: the issue's ImageNet setting.
DATA_DEFAULTS = MappingProxyType({"input_size": 224, "batch_size": 128})
#: Pixel noise (std, in 0-255 levels) that brings a 500x375 file at quality 90 to ~110 KB.
_NOISE_STD = 24.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--data`` options of ``python -m spark_core.bench``."""
    group = parser.add_argument_group("input pipeline (--data)")
    group.add_argument(
        "--data",
        action="store_true",
        help="benchmark the pre-training input pipeline instead of the training step "
        "(default size 224 px, batch 128)",
    )
    group.add_argument("--data-images", type=int, default=512, help="JPEG files to write")
    group.add_argument("--data-width", type=int, default=500)
    group.add_argument("--data-height", type=int, default=375)
    group.add_argument("--data-quality", type=int, default=90, help="JPEG quality")
    group.add_argument(
        "--data-workers", default="0,2,4,8,16", help="DataLoader workers of the PIL path"
    )
    group.add_argument(
        "--device-workers", default="4", help="DataLoader workers reading files for the device"
    )
    group.add_argument("--data-batches", type=int, default=32, help="timed batches per row")


def _counts(text: str, option: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{option}: give comma-separated integers, got {text!r}") from None
    if any(count < 0 for count in counts):
        raise SystemExit(f"{option}: worker counts must be >= 0, got {text!r}")
    return counts


# --------------------------------------------------------------------------------- files


def _photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``uint8 (height, width, 3)``: bicubic-upsampled colour blobs + a gradient + noise."""
    coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    blobs = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    ramp_x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
    ramp_y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None, None]
    gx, gy = rng.uniform(-40.0, 40.0, size=2)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * _NOISE_STD
    image = 50.0 + 0.6 * np.asarray(blobs, dtype=np.float32) + gx * ramp_x + gy * ramp_y + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(
    folder: Path, count: int, width: int, height: int, quality: int = 90, seed: int = 0
) -> list[Path]:
    """Write ``count`` photo-like ``width`` x ``height`` JPEGs (deterministic for ``seed``)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img_{index:05d}.jpg"
        Image.fromarray(_photo_like(rng, width, height)).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batches(
    batches: Iterator[Any],
    consume: Callable[[Any], Any],
    warmup: int,
    timed: int,
    device: torch.device,
) -> float:
    """Seconds that ``timed`` batches take after ``warmup`` batches."""
    for _ in range(warmup):
        consume(next(batches))
    _sync(device)
    start = time.perf_counter()
    for _ in range(timed):
        consume(next(batches))
    _sync(device)
    return time.perf_counter() - start


def _row(path: str, device: torch.device, workers: int | None, seconds: float, args) -> dict:
    images = args.data_batches * args.batch_size
    return {
        "name": path if workers is None else f"{path}/w{workers}",
        "path": path,
        "device": device.type,
        "workers": workers,
        "images_per_sec": images / seconds,
        "batch_ms": 1000.0 * seconds / args.data_batches,
        "images": images,
    }


def _loader_row(
    path: str,
    dataset: Dataset[Any],
    consume: Callable[[Any], Any],
    workers: int,
    device: torch.device,
    args: argparse.Namespace,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict:
    # Every worker delivers its first batch before the clock starts: the pipeline is full.
    warmup = max(workers, 1)
    total = (warmup + args.data_batches) * args.batch_size
    # More draws than files: the sampler walks several permutations of the folder.
    sampler = RandomSampler(dataset, num_samples=total, generator=torch.Generator().manual_seed(0))
    loader = build_loader(
        dataset,
        args.batch_size,
        num_workers=workers,
        sampler=sampler,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
    )
    logger.info("timing %s with %d loader workers on %s", path, workers, device)
    seconds = _time_batches(iter(loader), consume, warmup, args.data_batches, device)
    return _row(path, device, workers, seconds, args)


def _dataloader_rows(folder: Path, args: argparse.Namespace) -> list[dict]:
    dataset = ImageFolderDataset(folder, build_pretrain_transform(args.input_size))
    cpu = torch.device("cpu")
    return [
        _loader_row("dataloader", dataset, lambda batch: batch, workers, cpu, args)
        for workers in _counts(args.data_workers, "--data-workers")
    ]


def _device_rows(folder: Path, device: torch.device, args: argparse.Namespace) -> list[dict]:
    dataset = EncodedJpegDataset(folder)
    augment = DeviceAugment(args.input_size, device)
    rows = []
    for workers in _counts(args.device_workers, "--device-workers"):
        rows.append(
            _loader_row(
                "device",
                dataset,
                lambda batch: augment(batch.files(), batch.crops),
                workers,
                device,
                args,
                collate_fn=collate_encoded,
            )
        )
    return rows


def _device_only_row(paths: list[Path], device: torch.device, args: argparse.Namespace) -> dict:
    files = [torchvision.io.read_file(str(path)) for path in paths]
    augment = DeviceAugment(args.input_size, device)

    def batches() -> Iterator[list[torch.Tensor]]:
        start = 0
        while True:
            yield [files[(start + k) % len(files)] for k in range(args.batch_size)]
            start += args.batch_size

    logger.info("timing device-only (files in memory) on %s", device)
    seconds = _time_batches(batches(), augment, 1, args.data_batches, device)
    return _row("device-only", device, None, seconds, args)


# ------------------------------------------------------------------------------- report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the files and time every row; the report as a JSON-ready dict (printed by
    ``python -m spark_core.bench --data``, as a table by :func:`format_report`)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.data_images < 1 or args.data_batches < 1:
        raise SystemExit("--data-images and --data-batches must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="spark-input-bench-") as tmp:
        folder = Path(tmp)
        logger.info(
            "writing %d JPEGs of %dx%d (quality %d) to %s",
            args.data_images,
            args.data_width,
            args.data_height,
            args.data_quality,
            folder,
        )
        paths = write_jpegs(
            folder, args.data_images, args.data_width, args.data_height, args.data_quality
        )
        mean_kb = sum(path.stat().st_size for path in paths) / len(paths) / 1000
        logger.info("mean file size %.1f KB", mean_kb)
        results = _dataloader_rows(folder, args) + _device_rows(folder, device, args)
        results.append(_device_only_row(paths, device, args))
    return {
        "settings": {
            "device": _device_name(device),
            "images": args.data_images,
            "width": args.data_width,
            "height": args.data_height,
            "quality": args.data_quality,
            "mean_file_kb": mean_kb,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "note": (
                "device rows ran on the CPU: a check that the path works, not a GPU measurement"
                if device.type == "cpu"
                else ""
            ),
        },
        "results": {row["name"]: row for row in results},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as the CLI's table."""
    s = report["settings"]
    lines = [
        f"input pipeline | {s['device']} | {s['images']} JPEGs {s['width']}x{s['height']} "
        f"q{s['quality']} (mean {s['mean_file_kb']:.1f} KB) -> {s['input_size']} px, batch "
        f"{s['batch_size']} | {s['cpus']} CPUs | torch {s['torch']}, torchvision "
        f"{s['torchvision']}",
        f"  {'path':<12} {'device':<6} {'workers':>7} {'img/s':>9} {'ms/batch':>9}",
    ]
    for r in report["results"].values():
        workers = "-" if r["workers"] is None else str(r["workers"])
        lines.append(
            f"  {r['path']:<12} {r['device']:<6} {workers:>7} {r['images_per_sec']:9.1f} "
            f"{r['batch_ms']:9.1f}"
        )
    if s["note"]:
        lines.append(f"  note: {s['note']}")
    return "\n".join(lines)
