"""Reconstruction grids: geometry, masked tiles, pixel values, atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_DECODER_WIDTH, TEST_SIZE, make_images
from PIL import Image

from spark_core import build_spark
from spark_core.data import IMAGENET_MEAN, IMAGENET_STD
from spark_core.masking import random_mask, upsample_mask
from spark_core.viz import (
    GUTTER,
    HEADER_HEIGHT,
    MASK_GREY,
    denormalize,
    reconstruction_grid,
    save_reconstruction_grid,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def tile(grid: Image.Image, row: int, col: int, size: int = TEST_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 pixels of tile (row, col), per the documented geometry."""
    x = GUTTER + col * (size + GUTTER)
    y = HEADER_HEIGHT + GUTTER + row * (size + GUTTER)
    return np.asarray(grid)[y : y + size, x : x + size]


def expected_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8 as the grid should draw it."""
    return (denormalize(x[None])[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def fake_reconstruction(batch: int = 4, seed: int = 0):
    images = make_images(batch, seed=seed)
    active = random_mask(batch, (2, 2), 0.5, generator=torch.Generator().manual_seed(seed))
    pixel = upsample_mask(active, (TEST_SIZE, TEST_SIZE))
    masked = images.masked_fill(~pixel, 0)
    recon = torch.where(pixel, images, make_images(batch, seed=seed + 1))
    return images, masked, recon, active, pixel


def test_denormalize_inverts_normalize_and_clamps() -> None:
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(denormalize((x - mean) / std), x)
    out = denormalize(torch.full((1, 3, 2, 2), 100.0))
    assert out.max() == 1.0 and denormalize(-out * 100).min() == 0.0
    with pytest.raises(ValueError, match="mean/std"):
        denormalize(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize(("batch", "max_rows"), [(4, 8), (5, 3)])
def test_grid_size(batch: int, max_rows: int) -> None:
    images, masked, recon, active, _ = fake_reconstruction(batch)
    grid = reconstruction_grid(images, masked, recon, active=active, max_rows=max_rows)
    rows = min(batch, max_rows)
    assert grid.mode == "RGB"
    assert grid.size == (
        3 * TEST_SIZE + 4 * GUTTER,
        HEADER_HEIGHT + rows * TEST_SIZE + (rows + 1) * GUTTER,
    )
    pixels = np.asarray(grid)
    assert (pixels[HEADER_HEIGHT : HEADER_HEIGHT + GUTTER] == 255).all()  # white gutter
    assert (pixels[:HEADER_HEIGHT] < 128).any()  # header labels are drawn


@pytest.mark.parametrize("pass_active", [True, False])
def test_masked_tiles_grey_and_visible_pixels_exact(pass_active: bool) -> None:
    images, masked, recon, active, pixel = fake_reconstruction()
    grid = reconstruction_grid(images, masked, recon, active=active if pass_active else None)
    for row in range(images.shape[0]):
        hidden = ~pixel[row, 0].numpy()
        assert hidden.any() and (~hidden).any()
        want = expected_uint8(images[row])
        masked_tile = tile(grid, row, 1)
        assert (masked_tile[hidden] == MASK_GREY).all()
        # Visible pixels equal the denormalised input (within uint8 rounding).
        for got in (tile(grid, row, 0), masked_tile[~hidden], tile(grid, row, 2)[~hidden]):
            ref = want if got.ndim == 3 else want[~hidden]
            assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_grid_rejects_mismatched_shapes() -> None:
    images, masked, recon, active, _ = fake_reconstruction()
    with pytest.raises(ValueError, match="reconstructions"):
        reconstruction_grid(images, masked, recon[:2])
    with pytest.raises(ValueError, match="active"):
        reconstruction_grid(images, masked, recon, active=active.float())
    with pytest.raises(ValueError, match="max_rows"):
        reconstruction_grid(images, masked, recon, max_rows=0)


def test_save_reconstruction_grid_writes_png_atomically(tmp_path: Path) -> None:
    model = build_spark("resnet18", TEST_SIZE, decoder_width=TEST_DECODER_WIDTH).train()
    images = make_images(3)
    path = tmp_path / "sub" / "dir" / "grid.png"
    out = save_reconstruction_grid(
        model, images, path, generator=torch.Generator().manual_seed(0), max_rows=2
    )
    assert out == path and model.training
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temp file left
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (
            3 * TEST_SIZE + 4 * GUTTER,
            HEADER_HEIGHT + 2 * TEST_SIZE + 3 * GUTTER,
        )
        first = np.asarray(image.convert("RGB"))
    # Same generator -> same mask -> same picture.
    save_reconstruction_grid(
        model, images, path, generator=torch.Generator().manual_seed(0), max_rows=2
    )
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), first)


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    model = build_spark("resnet18", TEST_SIZE, decoder_width=TEST_DECODER_WIDTH)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_reconstruction_grid(model, make_images(2), tmp_path / "grid.png")
    assert list(tmp_path.iterdir()) == []
