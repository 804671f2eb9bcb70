"""spark_core.gpu_input: the device-side input path has the reference augmentation's
semantics (crop-area, aspect and flip statistics, and per-sample outputs), reads JPEG only,
and packs batches losslessly. Runs on the CPU device; one test repeats the comparison on CUDA.

The source images encode their pixel coordinates (red = x, green = y), so an output image
shows which region was cropped (the slope of red across the columns is the crop's width
fraction, of green down the rows its height fraction) and whether it was flipped (red then
decreases).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from spark_core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRETRAIN_CROP_RATIO,
    PRETRAIN_CROP_SCALE,
    PRETRAIN_FLIP_P,
    ImageFolderDataset,
    build_pretrain_transform,
)
from spark_core.gpu_input import (
    INPUT_DECODERS,
    CropFlip,
    DeviceAugment,
    EncodedBatch,
    EncodedJpegDataset,
    collate_encoded,
    input_decoder,
)

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency
# here); the warning comes with every decode_jpeg call.
TORCHVISION_DECODE_DEPRECATION = "ignore:The image decoding:DeprecationWarning"
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings(TORCHVISION_DECODE_DEPRECATION),
]

WIDTH, HEIGHT, SIZE = 96, 72, 32
SAMPLES = 300


def coordinate_image(width: int = WIDTH, height: int = HEIGHT, blue: int = 128) -> np.ndarray:
    """``uint8 (H, W, 3)``: red = (x + 0.5) / W, green = (y + 0.5) / H (times 255)."""
    x = (np.arange(width) + 0.5) / width * 255.0
    y = (np.arange(height) + 0.5) / height * 255.0
    red = np.broadcast_to(x, (height, width))
    green = np.broadcast_to(y[:, None], (height, width))
    return np.rint(np.stack([red, green, np.full((height, width), blue)], -1)).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coords")
    for k in range(4):
        Image.fromarray(coordinate_image(blue=60 * k)).save(root / f"{k}.jpg", quality=95)
    return root


def crop_statistics(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample crop area fraction, flip and crop aspect (w/h in source pixels) read from
    normalised outputs ``(N, 3, S, S)`` of coordinate images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (batch * std + mean).double()
    side = batch.shape[-1]
    # Interior pixels only: the resize's filter is renormalised at the borders.
    centred = torch.arange(2, side - 2, dtype=torch.float64)
    centred -= centred.mean()

    def slope(profile: torch.Tensor) -> torch.Tensor:
        inner = profile[:, 2 : side - 2]
        return (inner - inner.mean(1, keepdim=True)) @ centred / (centred @ centred)

    dx = slope(rgb[:, 0].mean(1))  # red along the columns
    dy = slope(rgb[:, 1].mean(2))  # green down the rows
    width, height = dx.abs() * side, dy * side
    return {
        "area": width * height,
        "flip": (dx < 0).double(),
        "aspect": (width * WIDTH) / (height * HEIGHT),
    }


@pytest.fixture(scope="module")
def expected_area() -> torch.Tensor:
    """Area fractions torchvision's own RandomResizedCrop.get_params draws for the source size
    (its rejection of crops that do not fit, and the fallback, make the distribution
    neither uniform on 0.67-1 nor centred on 0.835: mean ~0.78 here)."""
    header = Image.new("RGB", (WIDTH, HEIGHT))
    torch.manual_seed(123)
    draws = [
        RandomResizedCrop.get_params(header, list(PRETRAIN_CROP_SCALE), list(PRETRAIN_CROP_RATIO))
        for _ in range(4000)
    ]
    return torch.tensor([h * w / (WIDTH * HEIGHT) for _, _, h, w in draws], dtype=torch.float64)


def reference_outputs(folder: Path, seed: int, transform=None) -> torch.Tensor:
    images = ImageFolderDataset(folder, transform or build_pretrain_transform(SIZE))
    torch.manual_seed(seed)
    return torch.stack([images[i % len(images)][0] for i in range(SAMPLES)])


def device_outputs(folder: Path, seed: int, *, crops_from_dataset: bool) -> torch.Tensor:
    dataset = EncodedJpegDataset(folder)
    augment = DeviceAugment(SIZE, "cpu")
    torch.manual_seed(seed)
    outputs = []
    for start in range(0, SAMPLES, 50):
        batch = collate_encoded([dataset[i % len(dataset)] for i in range(start, start + 50)])
        outputs.append(augment(batch.files(), batch.crops if crops_from_dataset else None))
    return torch.cat(outputs)


def statistics_problems(stats: dict[str, torch.Tensor], expected: torch.Tensor) -> list[str]:
    """How a path's statistics differ from the reference augmentation's ([] if they agree).

    Tolerances: with 300 samples the mean area's standard error is ~0.005 and the flip rate's
    ~0.03; a crop scale of (0.08, 1) (torchvision's default) moves the mean by ~0.25, a
    missing flip the rate by 0.5.
    """
    area, flip, aspect = stats["area"], stats["flip"], stats["aspect"]
    checks = {
        "mean area": (area.mean(), expected.mean(), 0.02),
        "area spread": (area.std(), expected.std(), 0.02),
        "area decile 1": (area.quantile(0.1), expected.quantile(0.1), 0.03),
        "median area": (area.median(), expected.median(), 0.03),
        "area decile 9": (area.quantile(0.9), expected.quantile(0.9), 0.03),
        "flip rate": (flip.mean(), torch.tensor(PRETRAIN_FLIP_P), 0.1),
    }
    problems = [
        f"{name}: {value:.3f}, expected {target:.3f} +- {tol}"
        for name, (value, target, tol) in checks.items()
        if abs(float(value) - float(target)) > tol
    ]
    low, high = PRETRAIN_CROP_SCALE
    if area.min() < low - 0.02 or area.max() > high + 0.02:
        problems.append(f"area outside {PRETRAIN_CROP_SCALE}: {area.min():.3f}-{area.max():.3f}")
    ratio_low, ratio_high = PRETRAIN_CROP_RATIO
    if aspect.min() < ratio_low - 0.03 or aspect.max() > ratio_high + 0.03:
        problems.append(f"aspect outside {PRETRAIN_CROP_RATIO}: {aspect.min():.3f}-...")
    return problems


def test_device_path_has_the_reference_crop_and_flip_statistics(
    folder: Path, expected_area: torch.Tensor
) -> None:
    """Both paths, seeded differently (so they draw different crops), match torchvision's
    sampling and each other: the mean, spread and deciles of the crop area, the crop aspect
    range, and the flip rate."""
    paths = {
        "PIL reference": crop_statistics(reference_outputs(folder, seed=1)),
        "device, crops from the dataset": crop_statistics(
            device_outputs(folder, seed=2, crops_from_dataset=True)
        ),
        "device, crops drawn by DeviceAugment": crop_statistics(
            device_outputs(folder, seed=3, crops_from_dataset=False)
        ),
    }
    for name, stats in paths.items():
        assert statistics_problems(stats, expected_area) == [], name
    reference = paths["PIL reference"]
    for name, stats in paths.items():
        assert abs(stats["area"].mean() - reference["area"].mean()) < 0.02, name
        assert abs(stats["area"].std() - reference["area"].std()) < 0.02, name
        assert abs(stats["flip"].mean() - reference["flip"].mean()) < 0.12, name


def test_the_statistics_check_catches_a_wrong_augmentation(
    folder: Path, expected_area: torch.Tensor
) -> None:
    """torchvision's default crop scale (0.08-1) and no flip: both are caught."""
    wrong = transforms.Compose(
        [
            transforms.RandomResizedCrop(SIZE, interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    problems = statistics_problems(
        crop_statistics(reference_outputs(folder, 1, wrong)), expected_area
    )
    assert any(p.startswith("mean area") for p in problems), problems
    assert any(p.startswith("flip rate") for p in problems), problems


def test_a_sample_seeded_alike_gets_the_reference_output(folder: Path) -> None:
    """Same seed, same sample: the same crop and flip on both paths, and the same pixels
    (up to one uint8 level from the JPEG decoders and the resize)."""
    reference = ImageFolderDataset(folder, build_pretrain_transform(SIZE))
    encoded = EncodedJpegDataset(folder)
    augment = DeviceAugment(SIZE)
    one_level = 1.0 / 255 / min(IMAGENET_STD)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = reference[seed % len(reference)][0]
        torch.manual_seed(seed)
        batch = collate_encoded([encoded[seed % len(encoded)]])
        (actual,) = augment(batch.files(), batch.crops)
        assert actual.shape == expected.shape == (3, SIZE, SIZE)
        assert (actual - expected).abs().max() <= 1.5 * one_level, seed


def test_device_augment_output(folder: Path) -> None:
    files = [read_file(str(path)) for path in sorted(folder.glob("*.jpg"))]
    out = DeviceAugment((24, 40))(files)
    assert out.dtype == torch.float32 and out.shape == (len(files), 3, 24, 40)
    assert out.device.type == "cpu"
    # Normalised ImageNet-style: blue is constant per file (0, 60, 120, 180).
    blue = out[:, 2].mean((1, 2)) * IMAGENET_STD[2] + IMAGENET_MEAN[2]
    assert blue.tolist() == pytest.approx([0, 60 / 255, 120 / 255, 180 / 255], abs=0.02)


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_augmenting_a_batch_reads_nothing_back_from_its_tensors(folder: Path) -> None:
    """With the dataset's crops (the engine's case), no op that would wait for the device
    (on CUDA, a host sync before the step): no item(), nonzero() or data-dependent check."""
    dataset = EncodedJpegDataset(folder)
    batch = collate_encoded([dataset[i] for i in range(len(dataset))])
    files = batch.files()
    with OpRecorder() as recorder:
        DeviceAugment(SIZE)(files, batch.crops)
    assert "aten._upsample_bicubic2d_aa" in recorder.ops
    assert not {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.any"} & (
        recorder.ops
    )


# ------------------------------------------------------------------------------ not JPEG


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(coordinate_image(16, 12)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_folder_with_png_files_is_refused_naming_them(tmp_path: Path) -> None:
    Image.fromarray(coordinate_image(16, 12)).save(tmp_path / "a.jpg")
    (tmp_path / "b.png").write_bytes(_png_bytes())
    with pytest.raises(ValueError, match="decoder=gpu reads JPEG only") as info:
        EncodedJpegDataset(tmp_path)
    assert str(tmp_path / "b.png") in str(info.value)
    assert "decoder=cpu" in str(info.value)  # how to fix


def test_png_content_under_a_jpg_name_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "disguised.jpg").write_bytes(_png_bytes())
    dataset = EncodedJpegDataset(tmp_path)
    with pytest.raises(ValueError, match="decoder=gpu reads JPEG only") as info:
        dataset[0]
    assert str(tmp_path / "disguised.jpg") in str(info.value) and "PNG" in str(info.value)


def test_device_augment_refuses_non_jpeg_bytes() -> None:
    png = torch.frombuffer(bytearray(_png_bytes()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"encoded image 0 of the batch is not a JPEG.*89 50 4e"):
        DeviceAugment(SIZE)([png])
    with pytest.raises(ValueError, match="empty batch"):
        DeviceAugment(SIZE)([])


def test_an_unreadable_file_falls_back_to_the_next_sample(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Image.fromarray(coordinate_image(16, 12)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not an image at all")
    dataset = EncodedJpegDataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="spark_core.data"):
        encoded, crop, label = dataset[1]
    assert "b.jpg" in caplog.text
    assert bytes(encoded[:3].tolist()) == b"\xff\xd8\xff" and crop.shape == (5,) and label == -1


# ------------------------------------------------------------------------------ batches


def test_collate_packs_the_files_and_gives_them_back(folder: Path) -> None:
    dataset = EncodedJpegDataset(folder)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate_encoded(samples)
    assert isinstance(batch, EncodedBatch)
    assert batch.data.dtype == torch.uint8 and batch.data.ndim == 1
    assert batch.crops.shape == (len(samples), 5) and batch.labels.tolist() == [-1] * 4
    for (encoded, _, _), packed in zip(samples, batch.files(), strict=True):
        assert torch.equal(encoded, packed)
    assert torch.equal(batch.crops, torch.stack([crop for _, crop, _ in samples]))
    top, left, height, width, flip = batch.crops.T
    assert (top >= 0).all() and (top + height <= HEIGHT).all()
    assert (left >= 0).all() and (left + width <= WIDTH).all() and set(flip.tolist()) <= {0, 1}


def test_the_decoder_registry() -> None:
    assert list(INPUT_DECODERS) == ["cpu", "gpu"]
    assert INPUT_DECODERS["gpu"].synthetic_format == "jpg"
    assert INPUT_DECODERS["cpu"].collate_fn is None
    with pytest.raises(ValueError, match="decoder='dali': allowed values are cpu, gpu"):
        input_decoder("dali")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_gives_the_cpu_result(folder: Path) -> None:
    """nvJPEG and the CUDA resize against the CPU path, on the same crops."""
    dataset = EncodedJpegDataset(folder)
    torch.manual_seed(0)
    batch = collate_encoded([dataset[i % len(dataset)] for i in range(16)])
    on_cpu = DeviceAugment(SIZE, "cpu")(batch.files(), batch.crops)
    on_cuda = DeviceAugment(SIZE, "cuda")(batch.files(), batch.crops)
    assert on_cuda.device.type == "cuda"
    assert (on_cuda.cpu() - on_cpu).abs().max() <= 3.0 / 255 / min(IMAGENET_STD)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_augmentation_of_decoded_images_has_no_host_sync(folder: Path) -> None:
    """What DeviceAugment does after nvJPEG (the private step, since the decoder itself is
    torchvision's), under CUDA's sync debug mode."""
    augment = DeviceAugment(SIZE, "cuda")
    files = [read_file(str(path)) for path in sorted(folder.glob("*.jpg"))]
    decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device="cuda")
    boxes = [CropFlip(4, 8, 60, 80, flip=k % 2 == 1) for k in range(len(files))]
    augment._augment(decoded, boxes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment._augment(decoded, boxes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
