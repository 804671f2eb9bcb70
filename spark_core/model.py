"""The SparK model: sparse encoder, densify, light decoder and the masked loss.

The module only computes (the loss, the prediction, reconstructions); the
training loop lives in :mod:`spark_core.engine`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, field

import torch
from timm.layers import trunc_normal_
from torch import nn

from spark_core.backbones import FEATURE_STRIDES, SparseEncoder, resolve_family
from spark_core.decoder import LightDecoder
from spark_core.masking import MaskContext, mask_ratio_problem, random_mask, upsample_mask
from spark_core.sparse import SparseBatchNorm2d

DENSIFY_NORMS: tuple[str, ...] = ("auto", "bn", "ln", "identity")
PATCH_STRIDE = 32
MAX_DECODER_DEPTH = 8
# Feature maps the decoder can take (``hierarchy``): one per encoder stride.
MAX_HIERARCHY = len(FEATURE_STRIDES)


@dataclass(frozen=True)
class SparKConfig:
    """Everything that defines a SparK model's architecture (saved with checkpoints)."""

    backbone: str
    input_size: tuple[int, int]
    mask_ratio: float = 0.6
    sparse: bool = True
    hierarchy: int = 4
    mask_token: bool = True
    densify_norm: str = "auto"
    decoder_width: int = 768
    decoder_depth: int = 2
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SparKConfig:
        d = dict(d)
        d["input_size"] = _input_size_pair(d["input_size"])
        return cls(**d)


@dataclass
class SparKOutput:
    """Result of :meth:`SparK.forward`.

    Attributes:
        loss: scalar, mean per-patch MSE over masked patches of the whole batch.
        pred: (B, 3, H, W) decoder output, in the per-patch-normalised target space
            (in input space when ``norm_pix_loss=False``).
        active: (B, 1, h, w) bool, True = visible, the mask used.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    active: torch.Tensor
    extras: dict = field(default_factory=dict)


def _input_size_pair(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if _is_integer(input_size):
        return (int(input_size), int(input_size))  # type: ignore[arg-type]
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 2
        or not all(_is_integer(s) for s in input_size)
    ):
        raise ValueError(
            f"input_size={input_size!r}: give an int or a (height, width) pair of ints"
        )
    return (int(input_size[0]), int(input_size[1]))


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_FLAG_FIELDS = ("sparse", "mask_token", "norm_pix_loss")
_INTEGER_FIELDS = ("hierarchy", "decoder_width", "decoder_depth")
_NUMBER_FIELDS = ("mask_ratio", "drop_path_rate")


def _check_types(config: SparKConfig) -> None:
    """Refuse look-alikes instead of coercing them ("False" would turn into True)."""
    for name in _FLAG_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: must be True or False")
    for name in _INTEGER_FIELDS:
        value = getattr(config, name)
        if not _is_integer(value):
            raise ValueError(f"{name}={value!r}: must be an integer")
    for name in _NUMBER_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name}={value!r}: must be a number")
    for name in ("backbone", "densify_norm"):
        value = getattr(config, name)
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r}: must be a string")


def _plain_numbers(config: SparKConfig) -> SparKConfig:
    """A validated config with Python ints and floats (numpy scalars, a square size given
    as an int), so configs compare equal and serialise to JSON."""
    return dataclasses.replace(
        config,
        input_size=_input_size_pair(config.input_size),
        mask_ratio=float(config.mask_ratio),
        hierarchy=int(config.hierarchy),
        decoder_width=int(config.decoder_width),
        decoder_depth=int(config.decoder_depth),
        drop_path_rate=float(config.drop_path_rate),
    )


def validate_config(config: SparKConfig) -> None:
    """Raise ``ValueError`` naming the argument and its allowed values on a bad config."""
    _check_types(config)
    resolve_family(config.backbone)
    h, w = _input_size_pair(config.input_size)
    if h <= 0 or w <= 0 or h % PATCH_STRIDE or w % PATCH_STRIDE:
        raise ValueError(
            f"input_size={config.input_size}: height and width must be positive multiples of "
            f"the encoder stride {PATCH_STRIDE} (e.g. 64, 96, 224)"
        )
    if not 0.0 < config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={config.mask_ratio}: must lie in the open interval (0, 1)")
    problem = mask_ratio_problem((h // PATCH_STRIDE, w // PATCH_STRIDE), config.mask_ratio)
    if problem:
        raise ValueError(
            f"mask_ratio={config.mask_ratio} with input_size={config.input_size}: {problem}"
        )
    if not 1 <= config.hierarchy <= MAX_HIERARCHY:
        allowed = ", ".join(str(level) for level in range(1, MAX_HIERARCHY + 1))
        raise ValueError(f"hierarchy={config.hierarchy}: allowed values are {allowed}")
    if not 1 <= config.decoder_depth <= MAX_DECODER_DEPTH:
        raise ValueError(
            f"decoder_depth={config.decoder_depth}: must be an integer from 1 to "
            f"{MAX_DECODER_DEPTH}"
        )
    if config.decoder_width <= 0 or config.decoder_width % PATCH_STRIDE:
        raise ValueError(
            f"decoder_width={config.decoder_width}: must be a positive multiple of "
            f"{PATCH_STRIDE} (the decoder halves it {int(math.log2(PATCH_STRIDE))} times)"
        )
    if config.densify_norm not in DENSIFY_NORMS:
        raise ValueError(
            f"densify_norm={config.densify_norm!r}: allowed values are {', '.join(DENSIFY_NORMS)}"
        )
    if not 0.0 <= config.drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={config.drop_path_rate}: must lie in [0, 1)")


class SparseLayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm over visible positions; masked outputs are 0.

    LayerNorm is per position, so normalising everything and zeroing masked
    positions equals normalising the visible ones only.
    """

    def __init__(self, channels: int, mask_context: MaskContext, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)
        self.mask_context = mask_context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out.masked_fill(~self.mask_context.mask_like(x), 0)


class SparK(nn.Module):
    """Sparse encoder + densify + light decoder, returning the masked reconstruction loss.

    Build with :func:`build_spark`. ``encoder.model`` is the timm backbone.
    """

    def __init__(self, config: SparKConfig) -> None:
        super().__init__()
        validate_config(config)
        config = _plain_numbers(config)
        self.config = config
        self.mask_context = MaskContext()
        self.encoder = SparseEncoder(
            config.backbone,
            sparse=config.sparse,
            mask_context=self.mask_context,
            drop_path_rate=config.drop_path_rate,
        )
        self.stride = self.encoder.stride
        self.grid_size = (config.input_size[0] // self.stride, config.input_size[1] // self.stride)
        self.decoder = LightDecoder(self.stride, config.decoder_width, config.decoder_depth)
        norm_kind = config.densify_norm
        if norm_kind == "auto":
            norm_kind = resolve_family(config.backbone).densify_norm
        self.densify_norm_kind = norm_kind
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        for level in range(config.hierarchy):  # level 0 = smallest map
            enc_width = self.encoder.channels[-1 - level]
            dec_width = config.decoder_width // 2**level
            self.densify_norms.append(self._make_densify_norm(norm_kind, enc_width))
            self.densify_projs.append(_make_densify_proj(level, enc_width, dec_width))
            if config.mask_token:
                token = nn.Parameter(torch.zeros(1, enc_width, 1, 1))
                trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
                self.mask_tokens.append(token)

    def _make_densify_norm(self, kind: str, channels: int) -> nn.Module:
        if kind == "bn":
            # Sparse encoder features are 0 at masked positions; dense-masking ones are not.
            return SparseBatchNorm2d(
                channels, mask_context=self.mask_context, input_is_masked=self.config.sparse
            )
        if kind == "ln":
            return SparseLayerNorm2d(channels, self.mask_context)
        return nn.Identity()

    # ------------------------------------------------------------------ masks

    def generate_mask(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A random mask per sample: (B, 1, h, w) bool, True = visible.

        Exactly ``round(h * w * (1 - mask_ratio))`` patches are visible in each sample.
        """
        return random_mask(
            batch_size, self.grid_size, self.config.mask_ratio, generator=generator, device=device
        )

    def _check_inputs(self, images: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"images: height and width must be multiples of {self.stride}, got {h}x{w}"
            )
        grid = (h // self.stride, w // self.stride)
        if active is None:
            return random_mask(images.shape[0], grid, self.config.mask_ratio, device=images.device)
        expected = (images.shape[0], 1, *grid)
        if active.dtype != torch.bool or tuple(active.shape) != expected:
            raise ValueError(
                f"active: expected a bool tensor of shape {expected} (True = visible), "
                f"got {active.dtype} {tuple(active.shape)}"
            )
        return active.to(images.device)

    # ------------------------------------------------------------------ forward

    def _encode_in_context(self, images: torch.Tensor) -> list[torch.Tensor]:
        pixel_mask = self.mask_context.mask(images.shape[2], images.shape[3])
        return self.encoder(images.masked_fill(~pixel_mask, 0))

    def encode(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        """Sparse features of the visible patches.

        Args:
            images: (B, 3, H, W).
            active: (B, 1, h, w) bool, True = visible.

        Returns:
            Feature maps at strides 4, 8, 16, 32 (largest first); masked positions are 0
            when ``sparse=True``.
        """
        active = self._check_inputs(images, active)
        with self.mask_context.use(active):
            return self._encode_in_context(images)

    def _densify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        to_dec = []
        for level in range(self.config.hierarchy):
            feat = self.densify_norms[level](features[-1 - level])
            if self.config.mask_token:
                visible = self.mask_context.mask_like(feat)
                token = self.mask_tokens[level].to(feat.dtype)
                feat = torch.where(visible, feat, token)
            to_dec.append(self.densify_projs[level](feat))
        return to_dec

    def forward(self, images: torch.Tensor, active: torch.Tensor | None = None) -> SparKOutput:
        """Mask, encode, densify, decode; loss on masked patches only.

        Args:
            images: (B, 3, H, W), normalised.
            active: optional (B, 1, h, w) bool mask (True = visible); random when None.
                Samples without any visible patch are allowed.
        """
        active = self._check_inputs(images, active)
        with self.mask_context.use(active):
            features = self._encode_in_context(images)
            to_dec = self._densify(features)
        pred = self.decoder(to_dec)
        loss = self.loss(images, pred, active)
        return SparKOutput(loss=loss, pred=pred, active=active)

    # ------------------------------------------------------------------ loss

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, h, p, w, p) view: patch statistics reduce dims (1, 3, 5)."""
        b, c, h, w = x.shape
        p = self.stride
        return x.reshape(b, c, h // p, p, w // p, p)

    def patch_target(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-patch normalised target (B, C, h, p, w, p) in fp32, plus each patch's mean, std."""
        patches = self._patches(images.float())
        if not self.config.norm_pix_loss:
            return patches, None, None
        mean = patches.mean(dim=(1, 3, 5), keepdim=True)
        std = (patches.var(dim=(1, 3, 5), keepdim=True) + 1e-6).sqrt()
        return (patches - mean) / std, mean, std

    def loss(self, images: torch.Tensor, pred: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE averaged over the 3*p*p values, then over masked patches of the batch."""
        target, _, _ = self.patch_target(images)
        per_patch = (self._patches(pred.float()) - target).square().mean(dim=(1, 3, 5))  # (B,h,w)
        masked = (~active[:, 0]).float()
        return (per_patch * masked).sum() / (masked.sum() + 1e-8)

    # ------------------------------------------------------------------ pictures

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input, masked input and reconstruction (visible patches pasted), in input space.

        Runs in eval mode (running BN statistics) and restores the previous mode.
        All three are (B, 3, H, W).
        """
        was_training = self.training
        self.eval()
        try:
            out = self.forward(images, active)
        finally:
            self.train(was_training)
        pred = out.pred.float()
        if self.config.norm_pix_loss:
            _, mean, std = self.patch_target(images)
            pred = (self._patches(pred) * std + mean).reshape(pred.shape)
        pixel_mask = upsample_mask(out.active, tuple(images.shape[2:]))
        masked = images.masked_fill(~pixel_mask, 0)
        pasted = torch.where(pixel_mask, images.float(), pred).to(images.dtype)
        return images, masked, pasted


def _make_densify_proj(level: int, enc_width: int, dec_width: int) -> nn.Module:
    """1x1 conv at the smallest level, 3x3 elsewhere; identity at the smallest level when the
    widths already match (the reference's rule, e.g. ConvNeXt-S: 768 = decoder width)."""
    if level == 0 and enc_width == dec_width:
        return nn.Identity()
    kernel = 1 if level == 0 else 3
    return nn.Conv2d(enc_width, dec_width, kernel_size=kernel, padding=kernel // 2, bias=True)


def build_spark(
    backbone: str,
    input_size: int | tuple[int, int],
    *,
    mask_ratio: float = SparKConfig.mask_ratio,
    sparse: bool = SparKConfig.sparse,
    hierarchy: int = SparKConfig.hierarchy,
    mask_token: bool = SparKConfig.mask_token,
    densify_norm: str = SparKConfig.densify_norm,
    decoder_width: int = SparKConfig.decoder_width,
    decoder_depth: int = SparKConfig.decoder_depth,
    norm_pix_loss: bool = SparKConfig.norm_pix_loss,
    drop_path_rate: float = SparKConfig.drop_path_rate,
) -> SparK:
    """Build a SparK pre-training model around a timm backbone.

    The defaults are :class:`SparKConfig`'s, which are the reference's.

    Args:
        backbone: a timm ``resnet*``/``resnext*``/``wide_resnet*``/``seresnet*``/``convnext*`` name.
        input_size: image size, int or (height, width); multiples of 32.
        mask_ratio: fraction of patches masked, in (0, 1).
        sparse: sparse encoder (False = dense zero-masking control).
        hierarchy: number of feature maps (smallest first) fed to the decoder, 1..4.
        mask_token: fill masked positions of densified maps with learned tokens (else zeros).
        densify_norm: "auto" (BN for ResNets, LN for ConvNeXt), "bn", "ln" or "identity".
        decoder_width: width of the first decoder block (reference 768).
        decoder_depth: 3x3 convs per decoder block (reference 2).
        norm_pix_loss: regress per-patch normalised pixels (reference True).
        drop_path_rate: stochastic depth of the backbone.
    """
    config = SparKConfig(
        backbone=backbone,
        input_size=_input_size_pair(input_size),
        mask_ratio=mask_ratio,
        sparse=sparse,
        hierarchy=hierarchy,
        mask_token=mask_token,
        densify_norm=densify_norm,
        decoder_width=decoder_width,
        decoder_depth=decoder_depth,
        norm_pix_loss=norm_pix_loss,
        drop_path_rate=drop_path_rate,
    )
    return SparK(config)  # validates it
