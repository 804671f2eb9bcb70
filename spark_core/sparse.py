"""Sparse ("submanifold") versions of a timm network's layers, emulated on dense tensors.

A registry of *sparse rules* turns an unmodified timm model into SparK's sparse
encoder without touching timm's classes:

* layers whose output at a position depends on its neighbours (convolutions,
  pooling) or that may write non-zeros where the input was zero (norm biases)
  get a forward hook that zeroes masked positions of their output;
* layers that pool statistics over positions (BatchNorm, GroupNorm,
  squeeze-excitation) are swapped for sparse variants that take their
  statistics from visible positions only. The swap reuses the original
  parameter and buffer objects, so state-dict keys and values are unchanged;
* per-position layers (activations, dropout, drop-path) and composite blocks
  whose forward only wires children together pass through unchanged.

Any other layer type raises :class:`UnsupportedLayerError`: a layer without a
rule could silently mix masked positions into visible ones.

Masks come from a :class:`~spark_core.masking.MaskContext` owned by the model,
never from a global. Nothing here calls ``nonzero`` or reads a value back to the
host: statistics are masked sums over the full tensor, so the step stays free of
device-to-host syncs and data-dependent shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.layers import (
    BatchNormAct2d,
    BlurPool2d,
    ConvMlp,
    GlobalResponseNormMlp,
    LayerNorm2d,
    Mlp,
    RmsNorm2d,
    SEModule,
    SimpleNorm2d,
)
from timm.layers import activations as timm_activations
from timm.layers.drop import DropPath
from timm.layers.evo_norm import EvoNorm2dS0
from timm.layers.filter_response_norm import FilterResponseNormTlu2d
from timm.layers.grn import GlobalResponseNorm
from timm.models import byobnet, convnext, resnet, resnetv2
from torch import nn

from spark_core.masking import MaskContext

__all__ = [
    "SparseBatchNorm2d",
    "SparseGroupNorm",
    "SparseSEModule",
    "SyncBatchNorm2d",
    "UnsupportedLayerError",
    "sparsify_",
    "supported_layer_types",
    "synchronize_batch_norms",
]


class UnsupportedLayerError(ValueError):
    """A backbone contains a layer type that has no sparse rule."""


# --------------------------------------------------------------------------- hooks


class MaskOutput:
    """Forward hook: zero the output at masked positions (NCHW or NHWC layout)."""

    def __init__(self, context: MaskContext, *, channels_last: bool = False) -> None:
        self.context = context
        self.channels_last = channels_last

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = self.context.mask_like(output, channels_last=self.channels_last)
        return output.masked_fill(~mask, 0)


class MaskInput:
    """Forward pre-hook: zero the input at masked positions before a spatial reduction."""

    def __init__(self, context: MaskContext, *, channels_last: bool = False) -> None:
        self.context = context
        self.channels_last = channels_last

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        mask = self.context.mask_like(x, channels_last=self.channels_last)
        return (x.masked_fill(~mask, 0), *rest)


# --------------------------------------------------------------------------- norms


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers; the gradient of a sum is the sum of the workers' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _reduce_across_workers(packed: torch.Tensor) -> torch.Tensor:
    """Sum statistics over DDP workers (differentiable, so gradients see global stats)."""
    return _AllReduceSum.apply(packed)


def _masked_channel_moments(
    x: torch.Tensor, mask: torch.Tensor, shift: torch.Tensor, sync: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over visible positions, in fp32.

    Args:
        x: (B, C, H, W) features.
        mask: (B, 1, H, W) bool, True = visible.
        shift: (C,) fp32 value subtracted before summing; any value is exact, one near the
            mean (the running mean) keeps the one-pass variance accurate.
        sync: sum the statistics over all DDP workers.

    Returns:
        mean (C,), var (C,), count (scalar): all fp32 tensors, count = visible positions.
    """
    centred = torch.where(mask, x.float() - shift.view(1, -1, 1, 1), 0.0)
    count = mask.sum(dtype=torch.float32).reshape(1)
    return _moments_from_sums(centred, count, shift, sync)


def _moments_from_sums(
    centred: torch.Tensor, count: torch.Tensor, shift: torch.Tensor, sync: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count from shifted values (0 where not counted)."""
    packed = torch.cat([centred.sum((0, 2, 3)), centred.square().sum((0, 2, 3)), count])
    if sync:
        packed = _reduce_across_workers(packed)
    channels = centred.shape[1]
    sum1, sum2, count = packed[:channels], packed[channels : 2 * channels], packed[-1]
    safe_count = count.clamp_min(1.0)
    mean_centred = sum1 / safe_count
    var = (sum2 / safe_count - mean_centred.square()).clamp_min(0.0)
    return shift + mean_centred, var, count


class _VisibleBatchNormCUDA(torch.autograd.Function):
    """Batch norm over visible positions with PyTorch's SyncBatchNorm CUDA kernels.

    The kernels take statistics over every position, so the input must be exactly 0 at
    masked positions (true for every BN input inside the sparse encoder); the visible
    statistics follow by rescaling with ``positions / visible``. The backward kernel takes
    the element count as a device tensor, so no value is read back to the host.
    Channels-last and bf16/fp16 inputs stay in their layout and dtype.

    The rescaling recovers the visible variance from unshifted fp32 moments, so its relative
    error grows like 1e-7 * (mean / std)**2 (1e-5 at a channel mean of 10 std); the generic
    path (CPU, compiled) subtracts the running mean first and stays exact.
    """

    @staticmethod
    def forward(ctx, x, mask, count, weight, bias, eps):
        mean_all, invstd_all = torch.batch_norm_stats(x, eps)
        positions = x.numel() // x.shape[1]
        ratio = positions / count.clamp_min(1.0)
        var_all = invstd_all.square().reciprocal() - eps
        mean = mean_all * ratio
        var = ((var_all + mean_all.square()) * ratio - mean.square()).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        out = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        out = out.masked_fill_(~mask, 0)
        ctx.save_for_backward(x, mask, weight, mean, invstd, count)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, mask, weight, mean, invstd, count = ctx.saved_tensors
        grad_out = grad_out.masked_fill(~mask, 0).contiguous(memory_format=_memory_format(x))
        needs_x, needs_w, needs_b = ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            grad_out, x, mean, invstd, weight, needs_x, needs_w, needs_b
        )
        grad_x = None
        if needs_x:
            counts = count.round().to(torch.int32).reshape(1)
            grad_x = torch.batch_norm_backward_elemt(
                grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts
            )
        return grad_x, None, None, grad_weight, grad_bias, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _masked_group_moments(
    x: torch.Tensor, mask: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-group statistics over visible positions, in fp32.

    Args:
        x: (B, C, H, W) features.
        mask: (B, 1, H, W) bool, True = visible.
        groups: number of channel groups (divides C).

    Returns:
        centred (B, G, C/G, H, W): ``x - mean`` at visible positions, 0 elsewhere;
        var (B, G, 1, 1, 1): biased variance. A sample with nothing visible gets 0 for both.
    """
    b, c, h, w = x.shape
    grouped = x.float().reshape(b, groups, c // groups, h, w)
    grouped_mask = mask.reshape(b, 1, 1, h, w)
    count = grouped_mask.sum((2, 3, 4), keepdim=True, dtype=torch.float32) * (c // groups)
    count = count.clamp_min(1.0)
    mean = torch.where(grouped_mask, grouped, 0.0).sum((2, 3, 4), keepdim=True) / count
    centred = torch.where(grouped_mask, grouped - mean, 0.0)
    return centred, centred.square().sum((2, 3, 4), keepdim=True) / count


class SparseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose statistics (batch and running) come from visible positions only.

    Masked positions of the output are exactly 0. With ``sync_stats=True`` and an
    initialised process group the statistics are summed over all workers (the DDP
    equivalent of the reference's SyncBatchNorm). A batch without any visible
    position leaves the running statistics unchanged.

    ``input_is_masked=True`` promises that the input is already 0 at masked positions
    (every BN inside the sparse encoder), which lets eager CUDA training use the native
    batch-norm kernels instead of masked reductions.
    """

    mask_context: MaskContext

    def __init__(
        self,
        *args,
        mask_context: MaskContext,
        sync_stats: bool = False,
        input_is_masked: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.mask_context = mask_context
        self.sync_stats = sync_stats
        self.input_is_masked = input_is_masked

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d, mask_context: MaskContext) -> SparseBatchNorm2d:
        """Wrap an existing BatchNorm's parameters and buffers (shared, not copied)."""
        sparse = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            mask_context=mask_context,
            input_is_masked=True,
            device="meta",
        )
        share_state(bn, sparse)
        return sparse

    def _sync_active(self) -> bool:
        return (
            self.sync_stats
            and dist.is_available()
            and dist.is_initialized()
            and (dist.get_world_size() > 1)
        )

    def _use_native_kernels(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and self.input_is_masked
            and self.affine
            and not self._sync_active()
            and not torch.compiler.is_compiling()  # compiled graphs fuse the generic path
        )

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_context.mask_like(x)
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats and self._use_native_kernels(x):
            count = mask.sum(dtype=torch.float32)
            out, mean, var = _VisibleBatchNormCUDA.apply(
                x, mask, count, self.weight, self.bias, self.eps
            )
            if self.training and self.track_running_stats and self.running_mean is not None:
                self._update_running_stats(mean, var, count)
            return out
        if use_batch_stats:
            shift = (
                self.running_mean.detach().float()
                if self.running_mean is not None
                else x.new_zeros(x.shape[1], dtype=torch.float32)
            )
            mean, var, count = _masked_channel_moments(x, mask, shift, self._sync_active())
            if self.training and self.track_running_stats and self.running_mean is not None:
                self._update_running_stats(mean, var, count)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift_out = -mean * scale
        if self.bias is not None:
            shift_out = shift_out + self.bias.float()
        out = x.float() * scale.view(1, -1, 1, 1) + shift_out.view(1, -1, 1, 1)
        return torch.where(mask, out, 0.0).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        self.num_batches_tracked.add_(1)
        has_stats = (count > 0).float()  # a batch with nothing visible carries no statistics
        if self.momentum is None:
            factor = has_stats / self.num_batches_tracked.float()
        else:
            factor = has_stats * self.momentum  # stays on the device: no host transfer
        unbiased = var * count / (count - 1.0).clamp_min(1.0)
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalise(x)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Dense BatchNorm2d whose training statistics are summed over all DDP workers.

    Unlike ``torch.nn.SyncBatchNorm`` it runs on any device (gloo on CPU as well as NCCL).
    Without an initialised multi-worker process group, or in eval mode, it is exactly
    ``nn.BatchNorm2d``. Used for the decoder, whose inputs are dense.
    """

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d) -> SyncBatchNorm2d:
        """Wrap an existing BatchNorm's parameters and buffers (shared, not copied)."""
        synced = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device="meta",
        )
        share_state(bn, synced)
        return synced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(x)
        shift = (
            self.running_mean.detach().float()
            if self.running_mean is not None
            else x.new_zeros(x.shape[1], dtype=torch.float32)
        )
        centred = x.float() - shift.view(1, -1, 1, 1)
        count = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float32)
        mean, var, count = _moments_from_sums(centred, count, shift, sync=True)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / self.num_batches_tracked.float()
                )
                unbiased = var * count / (count - 1.0).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        offset = -mean * scale
        if self.bias is not None:
            offset = offset + self.bias.float()
        out = x.float() * scale.view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)
        return out.to(x.dtype)


def synchronize_batch_norms(model: nn.Module) -> int:
    """Make every batch norm of ``model`` use statistics summed over all DDP workers.

    Sparse batch norms get ``sync_stats=True``; plain ``nn.BatchNorm2d`` layers (the
    decoder's) are replaced in place by :class:`SyncBatchNorm2d` sharing their parameters.
    The DDP equivalent of the reference's SyncBatchNorm; a no-op outside DDP. Call before
    wrapping the model in ``DistributedDataParallel``. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, SparseBatchNorm2d):
            module.sync_stats = True
            changed += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, SyncBatchNorm2d.from_dense(child))
                changed += 1
    return changed


class SparseBatchNormAct2d(SparseBatchNorm2d):
    """Sparse version of timm's ``BatchNormAct2d`` (norm, then its ``drop`` and ``act``)."""

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d, mask_context: MaskContext) -> SparseBatchNormAct2d:
        sparse = super().from_dense(bn, mask_context)
        sparse.drop = bn.drop
        sparse.act = bn.act
        return sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._normalise(x)))


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm over visible positions only (per sample and group); masked outputs are 0."""

    def __init__(self, *args, mask_context: MaskContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_context = mask_context

    @classmethod
    def from_dense(cls, gn: nn.GroupNorm, mask_context: MaskContext) -> SparseGroupNorm:
        sparse = cls(
            gn.num_groups,
            gn.num_channels,
            eps=gn.eps,
            affine=gn.affine,
            mask_context=mask_context,
            device="meta",
        )
        share_state(gn, sparse)
        for name in ("drop", "act"):
            if hasattr(gn, name):
                setattr(sparse, name, getattr(gn, name))
        return sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_context.mask_like(x)  # (B, 1, H, W)
        centred, var = _masked_group_moments(x, mask, self.num_groups)
        out = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            out = out * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        out = torch.where(mask, out, 0.0).to(x.dtype)
        if hasattr(self, "act"):
            out = self.act(self.drop(out))
        return out


class SparseFilterResponseNorm(nn.Module):
    """timm's FilterResponseNormTlu2d with the mean of x**2 over visible positions only."""

    def __init__(self, frn: FilterResponseNormTlu2d, mask_context: MaskContext) -> None:
        super().__init__()
        self.mask_context = mask_context
        self.eps = frn.eps
        self.weight, self.bias, self.tau = frn.weight, frn.bias, frn.tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_context.mask_like(x)
        count = mask.sum((2, 3), keepdim=True, dtype=torch.float32).clamp_min(1.0)
        squares = torch.where(mask, x.float().square(), 0.0).sum((2, 3), keepdim=True)
        out = x.float() * torch.rsqrt(squares / count + self.eps)
        out = out * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        if self.tau is not None:
            out = torch.maximum(out, self.tau.float().view(1, -1, 1, 1))
        return torch.where(mask, out, 0.0).to(x.dtype)


class SparseEvoNormS0(nn.Module):
    """timm's EvoNorm2dS0 with its group standard deviation over visible positions only."""

    def __init__(self, evo: EvoNorm2dS0, mask_context: MaskContext) -> None:
        super().__init__()
        self.mask_context = mask_context
        self.groups, self.eps = evo.groups, evo.eps
        self.weight, self.bias, self.v = evo.weight, evo.bias, evo.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_context.mask_like(x)
        out = x.float()
        if self.v is not None:
            centred, var = _masked_group_moments(x, mask, self.groups)
            std = (var + self.eps).sqrt().expand_as(centred).reshape(x.shape)
            out = out * (out * self.v.float().view(1, -1, 1, 1)).sigmoid() / std
        out = out * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return torch.where(mask, out, 0.0).to(x.dtype)


# --------------------------------------------------------------------------- attention


class SparseSEModule(nn.Module):
    """Squeeze-excitation whose squeeze averages visible positions only.

    Holds the original module's children (``fc1``, ``bn``, ``act``, ``fc2``, ``gate``), so
    state-dict keys are unchanged. A sample with no visible position squeezes to 0.
    """

    def __init__(self, se: SEModule, mask_context: MaskContext) -> None:
        super().__init__()
        self.mask_context = mask_context
        self.add_maxpool = se.add_maxpool
        self.fc1, self.bn, self.act, self.fc2, self.gate = se.fc1, se.bn, se.act, se.fc2, se.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_context.mask_like(x)
        count = mask.sum((2, 3), keepdim=True, dtype=torch.float32).clamp_min(1.0)
        visible = torch.where(mask, x, 0)
        x_se = (visible.sum((2, 3), keepdim=True, dtype=torch.float32) / count).to(x.dtype)
        if self.add_maxpool:
            x_max = x.masked_fill(~mask, float("-inf")).amax((2, 3), keepdim=True)
            x_max = torch.where(torch.isfinite(x_max), x_max, 0)
            x_se = 0.5 * x_se + 0.5 * x_max
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


# --------------------------------------------------------------------------- registry


def share_state(dense: nn.Module, sparse: nn.Module) -> None:
    """Point ``sparse`` at ``dense``'s own parameter and buffer objects (no copy)."""
    for name, param in dense.named_parameters(recurse=False):
        setattr(sparse, name, param)
    for name, buf in dense.named_buffers(recurse=False):
        sparse.register_buffer(name, buf, persistent=name not in dense._non_persistent_buffers_set)
    sparse.train(dense.training)


def _hook_output(channels_last: bool) -> Callable[[nn.Module, MaskContext], nn.Module]:
    def apply(module: nn.Module, context: MaskContext) -> nn.Module:
        module.register_forward_hook(MaskOutput(context, channels_last=channels_last))
        return module

    return apply


def _hook_layer_norm(module: nn.Module, context: MaskContext) -> nn.Module:
    # A plain LayerNorm on a 4-D tensor normalises the last dim: the input is NHWC.
    module.register_forward_hook(MaskOutput(context, channels_last=True))
    return module


def _hook_mlp(module: nn.Module, context: MaskContext) -> nn.Module:
    channels_last = not isinstance(module.fc1, nn.Conv2d)
    # GRN takes an L2 norm over positions: masked positions must be 0 before it.
    for child in module.modules():
        if isinstance(child, GlobalResponseNorm):
            child.register_forward_pre_hook(MaskInput(context, channels_last=channels_last))
    module.register_forward_hook(MaskOutput(context, channels_last=channels_last))
    return module


def _swap_se(module: nn.Module, context: MaskContext) -> nn.Module:
    return SparseSEModule(module, context)


def _swap_batch_norm(module: nn.Module, context: MaskContext) -> nn.Module:
    if isinstance(module, BatchNormAct2d):
        return SparseBatchNormAct2d.from_dense(module, context)
    return SparseBatchNorm2d.from_dense(module, context)


def _swap_group_norm(module: nn.Module, context: MaskContext) -> nn.Module:
    return SparseGroupNorm.from_dense(module, context)


def _swap_filter_response_norm(module: nn.Module, context: MaskContext) -> nn.Module:
    return SparseFilterResponseNorm(module, context)


def _swap_evo_norm(module: nn.Module, context: MaskContext) -> nn.Module:
    if type(module) is not EvoNorm2dS0:  # its subclasses compute something else
        raise UnsupportedLayerError(f"{type(module).__name__} has no sparse rule")
    return SparseEvoNormS0(module, context)


def _check_zero_padding(module: nn.Module, context: MaskContext) -> nn.Module:
    if module.value != 0:
        raise UnsupportedLayerError(
            f"ConstantPad2d with value {module.value} would write non-zeros next to masked "
            "positions; only zero padding is sparse-correct"
        )
    return module


@dataclass(frozen=True)
class SparseRule:
    """How one family of layer types becomes sparse.

    ``covers_children``: the rule makes the whole sub-tree correct, so its children
    are not visited (e.g. the 1x1 convs inside squeeze-excitation run on (B, C, 1, 1)).
    """

    types: tuple[type, ...]
    apply: Callable[[nn.Module, MaskContext], nn.Module]
    covers_children: bool = False
    description: str = ""


# Ordered: the first rule whose types match wins (subclasses before their bases).
SPARSE_RULES: tuple[SparseRule, ...] = (
    SparseRule((SEModule,), _swap_se, True, "squeeze-excitation: masked mean"),
    SparseRule(
        (Mlp, ConvMlp, GlobalResponseNormMlp), _hook_mlp, True, "per-position MLP: mask output"
    ),
    SparseRule(
        (nn.BatchNorm2d, nn.SyncBatchNorm), _swap_batch_norm, False, "BatchNorm: masked stats"
    ),
    SparseRule((nn.GroupNorm,), _swap_group_norm, False, "GroupNorm: masked stats"),
    SparseRule((FilterResponseNormTlu2d,), _swap_filter_response_norm, True, "FRN: masked stats"),
    SparseRule((EvoNorm2dS0,), _swap_evo_norm, True, "EvoNorm-S0: masked group stats"),
    SparseRule(
        (LayerNorm2d, RmsNorm2d, SimpleNorm2d),
        _hook_output(channels_last=False),
        False,
        "channels-first per-position norm: mask output",
    ),
    SparseRule((nn.LayerNorm,), _hook_layer_norm, False, "channels-last LayerNorm: mask output"),
    SparseRule(
        (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, BlurPool2d),
        _hook_output(channels_last=False),
        False,
        "convolution / pooling: mask output",
    ),
    SparseRule((nn.ConstantPad2d,), _check_zero_padding, False, "zero padding: unchanged"),
)

# Layers that only act per position, or composites whose forward just wires their
# children together (plus residual adds and per-channel scales).
PASS_THROUGH_TYPES: tuple[type, ...] = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Identity,
    nn.Dropout,
    DropPath,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.ELU,
    timm_activations.GELU,
    timm_activations.GELUTanh,
    timm_activations.Swish,
    timm_activations.Mish,
    timm_activations.HardSwish,
    timm_activations.Tanh,
    resnet.ResNet,
    resnet.BasicBlock,
    resnet.Bottleneck,
    convnext.ConvNeXt,
    convnext.ConvNeXtStage,
    convnext.ConvNeXtBlock,
    resnetv2.ResNetV2,
    resnetv2.ResNetStage,
    resnetv2.PreActBasic,
    resnetv2.PreActBottleneck,
    resnetv2.DownsampleAvg,
    resnetv2.DownsampleConv,
    byobnet.ByobNet,
    byobnet.Stem,
    byobnet.BottleneckBlock,
    byobnet.EdgeBlock,
    byobnet.DownsampleAvg,
    byobnet.ConvNormAct,
)


def supported_layer_types() -> list[str]:
    """Names of the layer types the sparse encoder knows how to handle."""
    names = {t.__name__ for rule in SPARSE_RULES for t in rule.types}
    names.update(t.__name__ for t in PASS_THROUGH_TYPES)
    return sorted(names)


def _find_rule(module: nn.Module) -> SparseRule | None:
    for rule in SPARSE_RULES:
        if isinstance(module, rule.types):
            return rule
    return None


def sparsify_(
    module: nn.Module,
    context: MaskContext,
    *,
    skip: frozenset[str] = frozenset(),
    path: str = "",
) -> nn.Module:
    """Make ``module`` sparse in place (hooks and swaps); return the module to use.

    Args:
        module: a timm network (or part of one).
        context: the mask context its sparse layers will read.
        skip: names of direct children left untouched (e.g. an unused classifier head).
        path: dotted name of ``module``, for error messages.

    Raises:
        UnsupportedLayerError: a layer type has no sparse rule; the message names it.
    """
    rule = _find_rule(module)
    if rule is not None:
        module = rule.apply(module, context)
        if rule.covers_children:
            return module
    elif not isinstance(module, PASS_THROUGH_TYPES):
        raise UnsupportedLayerError(
            f"layer '{path or '<root>'}' of type {type(module).__module__}."
            f"{type(module).__name__} has no sparse rule, so masked positions could leak into "
            f"visible ones. Pick a backbone built from supported layers "
            f"({', '.join(supported_layer_types())}), or build with sparse=False."
        )
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        child_path = f"{path}.{name}" if path else name
        new_child = sparsify_(child, context, path=child_path)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
