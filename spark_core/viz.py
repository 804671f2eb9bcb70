"""Pictures of SparK reconstructions: input | masked input | reconstruction, one row per sample.

* :func:`denormalize` -- normalised ``(B, 3, H, W)`` images back to ``[0, 1]``.
* :func:`reconstruction_grid` -- a labelled PIL image grid of the three columns.
* :func:`save_reconstruction_grid` -- run :meth:`SparK.reconstruct` and write the grid as PNG.

Grid geometry (for tiles of ``H x W`` pixels, ``R`` rows, gutter ``g``, header ``t``)::

    width  = 3 * W + 4 * g
    height = t + R * H + (R + 1) * g

Tile ``(row, col)`` has its top-left corner at ``(g + col * (W + g), t + g + row * (H + g))``.
Gutters and the header band are white; masked patches of the middle column are mid-grey
(:data:`MASK_GREY`) so they cannot be confused with black image content.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from spark_core.data import IMAGENET_MEAN, IMAGENET_STD
from spark_core.masking import upsample_mask
from spark_core.model import SparK

logger = logging.getLogger(__name__)

#: White space (pixels) between tiles and around the grid.
GUTTER: int = 2
#: Height (pixels) of the white band above the tiles that holds the column labels.
HEADER_HEIGHT: int = 16
#: uint8 grey level of masked pixels in the "masked" column.
MASK_GREY: int = 128
#: Column labels, each with shorter fallbacks used when a tile is too narrow for the full one.
COLUMN_LABELS: tuple[tuple[str, ...], ...] = (
    ("input", "in"),
    ("masked", "mask"),
    ("reconstruction", "recon", "rec"),
)
_WHITE = (255, 255, 255)
_LABEL_COLOUR = (0, 0, 0)


def denormalize(
    x: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Undo ``Normalize(mean, std)``: ``x * std + mean``, clamped to ``[0, 1]``.

    Args:
        x: (B, C, H, W) normalised images, ``C == len(mean) == len(std)``.
        mean: per-channel mean used for normalisation.
        std: per-channel standard deviation used for normalisation.

    Returns:
        (B, C, H, W) float32 tensor in ``[0, 1]`` on ``x``'s device.
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(
            f"mean/std: expected {x.shape[1]} values each (one per channel of x), "
            f"got {len(mean)} and {len(std)}"
        )
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std: every value must be positive, got {tuple(std)}")
    x = x.detach().float()
    m = torch.tensor([float(v) for v in mean], device=x.device).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std], device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp_(0.0, 1.0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 numpy array."""
    return (x * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _pixel_mask(
    inputs: torch.Tensor, masked: torch.Tensor, active: torch.Tensor | None
) -> torch.Tensor:
    """(B, 1, H, W) bool, True = visible pixel.

    From ``active`` (upsampled nearest) when given; otherwise a pixel counts as masked when
    ``masked`` is exactly 0 in every channel while ``inputs`` is not.
    """
    b, _, h, w = inputs.shape
    if active is None:
        hidden = (masked == 0).all(dim=1, keepdim=True) & (inputs != 0).any(dim=1, keepdim=True)
        return ~hidden
    if active.dtype != torch.bool or active.ndim != 4 or active.shape[:2] != (b, 1):
        raise ValueError(
            f"active: expected a bool tensor of shape ({b}, 1, h, w) (True = visible), "
            f"got {active.dtype} {tuple(active.shape)}"
        )
    return upsample_mask(active.detach().cpu(), (h, w))


def _fit_label(
    draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, options: Sequence[str], max_width: int
) -> str:
    """The first label of ``options`` that fits ``max_width`` pixels, else the last one cut."""
    for text in options:
        if draw.textlength(text, font=font) <= max_width:
            return text
    text = options[-1]
    while text and draw.textlength(text, font=font) > max_width:
        text = text[:-1]
    return text


def _draw_header(image: Image.Image, tile_width: int, gutter: int, header_height: int) -> None:
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for col, options in enumerate(COLUMN_LABELS):
        text = _fit_label(draw, font, options, tile_width)
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x0 = gutter + col * (tile_width + gutter)
        x = x0 + (tile_width - (right - left)) // 2 - left
        y = (header_height - (bottom - top)) // 2 - top
        draw.text((x, y), text, fill=_LABEL_COLOUR, font=font)


def reconstruction_grid(
    inputs: torch.Tensor,
    masked: torch.Tensor,
    reconstructions: torch.Tensor,
    *,
    active: torch.Tensor | None = None,
    max_rows: int = 8,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    gutter: int = GUTTER,
    header_height: int = HEADER_HEIGHT,
) -> Image.Image:
    """A labelled grid: one row per sample, columns input | masked input | reconstruction.

    See the module docstring for the exact geometry.

    Args:
        inputs: (B, 3, H, W) normalised images.
        masked: (B, 3, H, W) normalised images with masked patches set to 0.
        reconstructions: (B, 3, H, W) normalised reconstructions (visible patches pasted).
        active: optional (B, 1, h, w) bool mask, True = visible, ``H % h == W % w == 0``;
            when None, masked pixels are those where ``masked`` is 0 in all channels while
            ``inputs`` is not.
        max_rows: at most this many samples (the first ones) are drawn, ``>= 1``.
        mean: normalisation mean, per channel.
        std: normalisation standard deviation, per channel.
        gutter: white pixels between tiles and around the grid, ``>= 0``.
        header_height: height of the label band above the tiles; 0 draws no labels.

    Returns:
        An RGB ``PIL.Image.Image`` of size ``(3W + 4g, t + R*H + (R+1)*g)``,
        ``R = min(B, max_rows)``.
    """
    if inputs.ndim != 4 or inputs.shape[1] != 3:
        raise ValueError(f"inputs: expected (B, 3, H, W), got shape {tuple(inputs.shape)}")
    for name, t in (("masked", masked), ("reconstructions", reconstructions)):
        if tuple(t.shape) != tuple(inputs.shape):
            raise ValueError(
                f"{name}: expected the shape of inputs {tuple(inputs.shape)}, got {tuple(t.shape)}"
            )
    if inputs.shape[0] == 0:
        raise ValueError("inputs: the batch is empty, there is nothing to draw")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if gutter < 0:
        raise ValueError(f"gutter must be >= 0, got {gutter}")
    if header_height < 0:
        raise ValueError(f"header_height must be >= 0, got {header_height}")

    rows = min(inputs.shape[0], max_rows)
    inputs = inputs[:rows].detach().float().cpu()
    masked = masked[:rows].detach().float().cpu()
    reconstructions = reconstructions[:rows].detach().float().cpu()
    if active is not None:
        active = active[:rows]
    visible = _pixel_mask(inputs, masked, active)  # (R, 1, H, W)

    columns = [
        _to_uint8(denormalize(inputs, mean, std)),
        _to_uint8(denormalize(masked, mean, std)),
        _to_uint8(denormalize(reconstructions, mean, std)),
    ]
    columns[1][~visible[:, 0].numpy()] = MASK_GREY  # masked pixels: mid-grey

    h, w = inputs.shape[2:]
    canvas = np.full(
        (header_height + rows * h + (rows + 1) * gutter, 3 * w + 4 * gutter, 3), 255, np.uint8
    )
    for row in range(rows):
        y = header_height + gutter + row * (h + gutter)
        for col, tiles in enumerate(columns):
            x = gutter + col * (w + gutter)
            canvas[y : y + h, x : x + w] = tiles[row]
    image = Image.fromarray(canvas, mode="RGB")
    if header_height > 0:
        _draw_header(image, w, gutter, header_height)
    return image


def _write_png_atomically(image: Image.Image, path: Path) -> None:
    """Save through a temporary file in the target folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_reconstruction_grid(
    model: SparK,
    images: torch.Tensor,
    path: str | Path,
    *,
    active: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_rows: int = 8,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Reconstruct the first ``max_rows`` images and write the grid as a PNG, atomically.

    :meth:`SparK.reconstruct` runs in eval mode, so each sample's reconstruction does not
    depend on the rest of the batch; only the drawn samples are computed.

    Args:
        model: the SparK model.
        images: (B, 3, H, W) normalised images on the model's device.
        path: output file; parent folders are created.
        active: optional (B, 1, h, w) bool mask (True = visible); random when None.
        generator: seeds the random mask when ``active`` is None (reproducible pictures).
        max_rows: number of samples drawn, ``>= 1``.
        mean: normalisation mean, per channel.
        std: normalisation standard deviation, per channel.

    Returns:
        ``path`` as a ``Path``.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if images.ndim != 4:
        raise ValueError(f"images: expected (B, 3, H, W), got shape {tuple(images.shape)}")
    path = Path(path)
    if active is not None and active.shape[0] != images.shape[0]:
        raise ValueError(
            f"active: batch size {active.shape[0]} differs from images' {images.shape[0]}"
        )
    images = images[:max_rows]
    if active is None:
        active = model.generate_mask(images.shape[0], generator=generator, device=images.device)
    else:
        active = active[:max_rows]
    inputs, masked, recon = model.reconstruct(images, active)
    grid = reconstruction_grid(
        inputs, masked, recon, active=active, max_rows=max_rows, mean=mean, std=std
    )
    _write_png_atomically(grid, path)
    logger.info("Wrote reconstruction grid (%d samples) to %s", inputs.shape[0], path)
    return path
