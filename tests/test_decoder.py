"""The decoder's CPU fast paths compute what the plain PyTorch modules compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spark_core.decoder import TINY_INPUT_POSITIONS, UpSample2x


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [2, 3, 6])
def test_upsample_equals_conv_transpose(size: int, memory_format: torch.memory_format) -> None:
    """Output, input gradient and weight gradient, on the GEMM + fold path (small inputs)
    and on the transposed-conv path, with either weight layout."""
    torch.manual_seed(0)
    channels = 8
    ours = UpSample2x(channels).to(memory_format=memory_format)
    theirs = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, channels, size, size)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    assert out_ours.shape == (3, channels, 2 * size, 2 * size)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out_theirs)
    (out_ours * grad_out).sum().backward()
    (out_theirs * grad_out).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-5)
    assert ours.weight.grad.stride() == ours.weight.stride()  # no layout copy on accumulate


def test_the_sizes_above_cover_both_paths() -> None:
    assert 2 * 2 <= TINY_INPUT_POSITIONS < 6 * 6
