"""The reference implementation's algorithm, re-expressed for side-by-side benchmarks.

This reproduces *how* the public SparK code computes a step, so ``spark_core.bench``
can time both in one run: the mask is upsampled with ``repeat_interleave`` in every
layer, sparse norms gather visible rows with ``nonzero`` (a device-to-host sync),
normalise them with BatchNorm1d / LayerNorm and scatter them back into zeros, conv
outputs are masked in place, and the loss patchifies with ``einsum``. The numbers
equal :class:`spark_core.SparK`'s (tests check it); only the cost differs. Nothing
here is used for training.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from spark_core.model import SparK, SparKConfig, SparKOutput, SparseLayerNorm2d
from spark_core.sparse import PASS_THROUGH_TYPES, SparseBatchNorm2d, share_state


class _ReferenceMask:
    """The current mask (the reference keeps it in a module global; one object per model)."""

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None

    def expanded(self, height: int) -> torch.Tensor:
        ratio = height // self.active.shape[-1]
        return self.active.repeat_interleave(ratio, 2).repeat_interleave(ratio, 3)

    def indices(self, height: int) -> tuple[torch.Tensor, ...]:
        return self.expanded(height).squeeze(1).nonzero(as_tuple=True)


class _MaskInPlace:
    def __init__(self, state: _ReferenceMask, channels_last_input: bool = False) -> None:
        self.state = state
        self.channels_last_input = channels_last_input

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            out *= self.state.expanded(out.shape[1]).permute(0, 2, 3, 1)
        else:
            out *= self.state.expanded(out.shape[2])
        return out


class _GatherBatchNorm(nn.BatchNorm1d):
    """Sparse BN the reference's way: gather visible rows, BatchNorm1d, scatter back."""

    def __init__(self, bn: nn.BatchNorm2d, state: _ReferenceMask) -> None:
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, device="meta")
        share_state(bn, self)
        self.state = state
        self.post = nn.Sequential(*(getattr(bn, n) for n in ("drop", "act") if hasattr(bn, n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ii = self.state.indices(x.shape[2])
        bhwc = x.permute(0, 2, 3, 1)
        rows = super().forward(bhwc[ii])
        out = torch.zeros_like(bhwc)
        out[ii] = rows
        return self.post(out.permute(0, 3, 1, 2))


class _GatherLayerNorm(nn.LayerNorm):
    """Sparse LN the reference's way (channels-first or channels-last input)."""

    def __init__(self, ln: nn.LayerNorm, state: _ReferenceMask, channels_first: bool) -> None:
        super().__init__(ln.normalized_shape, eps=ln.eps, device="meta")
        share_state(ln, self)
        self.state = state
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bhwc = x.permute(0, 2, 3, 1) if self.channels_first else x
        ii = self.state.indices(bhwc.shape[1])
        out = torch.zeros_like(bhwc)
        out[ii] = super().forward(bhwc[ii])
        return out.permute(0, 3, 1, 2) if self.channels_first else out


def _convert(module: nn.Module, state: _ReferenceMask) -> nn.Module:
    from timm.layers import ConvMlp, GlobalResponseNormMlp, Mlp, SEModule

    if isinstance(module, SEModule):
        raise ValueError("the reference implementation has no squeeze-excitation backbones")
    if isinstance(module, (Mlp, GlobalResponseNormMlp, ConvMlp)):
        module.register_forward_hook(
            _MaskInPlace(state, channels_last_input=not isinstance(module.fc1, nn.Conv2d))
        )
        return module
    if isinstance(module, (nn.BatchNorm2d, SparseBatchNorm2d)):
        return _GatherBatchNorm(module, state)
    if isinstance(module, (LayerNorm2d, SparseLayerNorm2d)):
        return _GatherLayerNorm(module, state, channels_first=True)
    if isinstance(module, nn.LayerNorm):
        return _GatherLayerNorm(module, state, channels_first=False)
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        module.register_forward_hook(_MaskInPlace(state))
        return module
    if not isinstance(module, PASS_THROUGH_TYPES):
        raise ValueError(f"reference implementation: no rule for {type(module).__name__}")
    for name, child in list(module.named_children()):
        new = _convert(child, state)
        if new is not child:
            setattr(module, name, new)
    return module


class ReferenceSparK(SparK):
    """SparK computed the way the reference code computes it (for benchmarks and tests)."""

    def __init__(self, config: SparKConfig) -> None:
        super().__init__(SparKConfig.from_dict({**config.to_dict(), "sparse": False}))
        self.reference_mask = _ReferenceMask()
        skip = {"head", "global_pool", "fc", "classifier", "norm"}
        for name, child in list(self.encoder.model.named_children()):
            if name not in skip:
                setattr(self.encoder.model, name, _convert(child, self.reference_mask))
        for i, norm in enumerate(self.densify_norms):
            if not isinstance(norm, nn.Identity):
                self.densify_norms[i] = _convert(norm, self.reference_mask)
        for block in self.decoder.dec:  # the reference's plain transposed convs
            plain = nn.ConvTranspose2d(
                block.up_sample.in_channels, block.up_sample.out_channels, 4, 2, 1, device="meta"
            )
            plain.weight, plain.bias = block.up_sample.weight, block.up_sample.bias
            block.up_sample = plain

    def forward(self, images: torch.Tensor, active: torch.Tensor | None = None) -> SparKOutput:
        if active is None:
            active = self.generate_mask(images.shape[0], device=images.device)
        self.reference_mask.active = active
        r = self.stride
        active_pixels = active.repeat_interleave(r, 2).repeat_interleave(r, 3)
        features = self.encoder(images * active_pixels)
        features.reverse()
        cur_active, to_dec = active, []
        for i in range(self.config.hierarchy):
            feat = self.densify_norms[i](features[i])
            if self.config.mask_token:
                tokens = self.mask_tokens[i].expand_as(feat)
                feat = torch.where(cur_active.expand_as(feat), feat, tokens)
            to_dec.append(self.densify_projs[i](feat))
            cur_active = cur_active.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        pred = self.decoder(to_dec)
        inp, rec = self._patchify(images), self._patchify(pred)
        if self.config.norm_pix_loss:
            mean = inp.mean(dim=-1, keepdim=True)
            std = (inp.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            inp = (inp - mean) / std
        l2 = ((rec - inp) ** 2).mean(dim=2)
        non_active = active.logical_not().int().view(active.shape[0], -1)
        loss = l2.mul_(non_active).sum() / (non_active.sum() + 1e-8)
        return SparKOutput(loss=loss, pred=pred, active=active)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.stride
        b, c, height, width = x.shape
        h, w = height // p, width // p
        x = torch.einsum("bchpwq->bhwpqc", x.reshape(b, c, h, p, w, p))
        return x.reshape(b, h * w, c * p * p)


def build_reference_spark(backbone: str, input_size: int, **kwargs) -> ReferenceSparK:
    """A :class:`ReferenceSparK` with the same arguments as :func:`spark_core.build_spark`."""
    config = SparKConfig(backbone=backbone, input_size=(input_size, input_size), **kwargs)
    return ReferenceSparK(config)


__all__ = ["ReferenceSparK", "build_reference_spark"]
