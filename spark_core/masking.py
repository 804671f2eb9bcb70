"""Random patch masks and the per-model mask context read by the sparse layers.

SparK masks whole patches of the encoder's total stride ``r`` (32 for ResNet and
ConvNeXt). A mask is a ``(B, 1, h, w)`` bool tensor with ``h = H / r``,
``w = W / r``; True = visible ("active"). Every sample keeps exactly the same
number of visible patches, which is what lets every later step stay free of
data-dependent shapes (no ``nonzero``, no host sync).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def num_visible(grid_size: tuple[int, int], mask_ratio: float) -> int:
    """Visible patches per sample: ``round(h * w * (1 - mask_ratio))`` (the reference's rule)."""
    h, w = grid_size
    return round(h * w * (1.0 - mask_ratio))


def mask_ratio_problem(grid_size: tuple[int, int], mask_ratio: float) -> str:
    """Why ``mask_ratio`` leaves nothing to see or nothing to predict on a patch grid.

    '' when at least one patch stays visible and at least one is masked. Otherwise the
    reason, with how to fix it: with no visible patch the encoder sees nothing; with no
    masked patch the loss is 0 in every step and training silently does nothing.
    """
    h, w = grid_size
    visible = num_visible(grid_size, mask_ratio)
    patches = f"{h * w} patches" if h * w > 1 else "1 patch"
    count = f"round({h}*{w} * (1 - {mask_ratio})) = {visible} of {patches} stay visible"
    if visible < 1:
        return f"{count}, so the encoder sees nothing; lower mask_ratio or raise input_size"
    if visible >= h * w:
        return (
            f"{count}, so nothing is masked and the loss is always 0; raise mask_ratio or "
            "input_size"
        )
    return ""


def random_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw an independent random mask per sample (argsort of uniform noise).

    Returns:
        ``(B, 1, h, w)`` bool, True = visible, exactly ``num_visible`` True per sample.
    """
    h, w = grid_size
    keep = num_visible(grid_size, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, h * w, generator=generator, device=noise_device)
    keep_idx = noise.argsort(dim=1)[:, :keep].to(device)
    active = torch.zeros(batch_size, h * w, dtype=torch.bool, device=device)
    active.scatter_(1, keep_idx, True)
    return active.view(batch_size, 1, h, w)


def upsample_mask(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a ``(B, 1, h, w)`` mask to ``(B, 1, H, W)`` (integer factors).

    Uses expand + reshape instead of ``repeat_interleave`` (one copy, no index tensor).
    """
    b, _, h, w = active.shape
    out_h, out_w = size
    if out_h % h or out_w % w:
        raise ValueError(
            f"cannot upsample a {h}x{w} mask to {out_h}x{out_w}: the feature map size must be "
            f"an integer multiple of the mask grid (input size a multiple of the stride)"
        )
    sh, sw = out_h // h, out_w // w
    if sh == 1 and sw == 1:
        return active
    return active[:, :, :, None, :, None].expand(b, 1, h, sh, w, sw).reshape(b, 1, out_h, out_w)


class MaskContext:
    """The mask of the forward pass in progress, shared by one model's sparse layers.

    Each :class:`~spark_core.model.SparK` owns one context; sparse layers keep a
    reference to it (never a module global), so two models in one process cannot
    see each other's masks. Masks at each feature resolution are computed once per
    forward pass and cached until the next :meth:`use`.
    """

    def __init__(self) -> None:
        self._active: torch.Tensor | None = None
        self._cache: dict[tuple[int, int, bool], torch.Tensor] = {}

    @property
    def is_set(self) -> bool:
        return self._active is not None

    @contextmanager
    def use(self, active: torch.Tensor) -> Iterator[MaskContext]:
        """Make ``active`` ((B, 1, h, w) bool) the mask for the layers run inside the block."""
        previous, previous_cache = self._active, self._cache
        self._active, self._cache = active, {}
        try:
            yield self
        finally:
            self._active, self._cache = previous, previous_cache

    def mask(self, height: int, width: int, *, channels_last: bool = False) -> torch.Tensor:
        """Visible mask at a feature resolution.

        Returns:
            ``(B, 1, H, W)`` bool (NCHW layout) or ``(B, H, W, 1)`` bool (NHWC layout).
        """
        key = (height, width, channels_last)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if channels_last:  # a view of the NCHW mask: one up-sampling per resolution
            mask = self.mask(height, width).permute(0, 2, 3, 1)
            self._cache[key] = mask
            return mask
        if self._active is None:
            raise RuntimeError(
                "a sparse layer ran outside a masked forward pass; call it through "
                "SparK.forward / SparK.encode, which set the mask. Gradient checkpointing "
                "(timm's set_grad_checkpointing) re-runs layers during backward, outside the "
                "forward pass, and does not work with the sparse encoder"
            )
        mask = upsample_mask(self._active, (height, width))
        self._cache[key] = mask
        return mask

    def mask_like(self, x: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
        """Mask for a 4-D map: NCHW ``x`` -> (B, 1, H, W); NHWC ``x`` -> (B, H, W, 1)."""
        if channels_last:
            return self.mask(x.shape[1], x.shape[2], channels_last=True)
        return self.mask(x.shape[2], x.shape[3])
