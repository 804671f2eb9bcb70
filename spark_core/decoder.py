"""SparK's light UNet decoder (dense)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

# Up to this many input positions, a CPU transposed conv runs faster as one matrix product
# plus col2im (measured on 2 cores: 768 channels at 3x3, 74 ms -> 30 ms forward+backward).
TINY_INPUT_POSITIONS = 16


class UpSample2x(nn.ConvTranspose2d):
    """ConvTranspose2d(k=4, s=2, p=1); on CPU as GEMM + ``fold`` for tiny inputs.

    Same parameters and keys as ``nn.ConvTranspose2d``; both paths compute the same
    function (a transposed conv is the adjoint of unfold + matmul).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, kernel_size=4, stride=2, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return super().forward(x)
        _, _, h, w = x.shape
        if h * w > TINY_INPUT_POSITIONS:
            out = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding)
        else:
            out = self._gemm_fold(x)
        # The bias is added apart: oneDNN's bias gradient of a transposed conv is slow in
        # bf16 (at 48 channels, 48x48 -> 96x96, batch 16: 24 ms with it, 4 ms without).
        return out + self.bias.to(out.dtype).view(1, -1, 1, 1)

    def _gemm_fold(self, x: torch.Tensor) -> torch.Tensor:
        """The transposed conv without bias as one matrix product plus ``fold``."""
        _, cin, h, w = x.shape
        cout, k = self.out_channels, self.kernel_size[0]
        rows = x.flatten(2).transpose(1, 2)  # (B, h*w, cin)
        if self.weight.is_contiguous():
            cols = (rows @ self.weight.reshape(cin, cout * k * k)).transpose(1, 2)
        else:
            # A channels_last weight is laid out (cin, k, k, cout): multiply by that view and
            # reorder the small product, not the large weight (38 ms -> 0 per step at 768).
            cols = rows @ self.weight.permute(0, 2, 3, 1).reshape(cin, k * k * cout)
            cols = cols.unflatten(2, (k * k, cout)).permute(0, 3, 2, 1).flatten(1, 2)
        return F.fold(cols, (2 * h, 2 * w), k, stride=2, padding=1)


class UNetBlock(nn.Module):
    """2x up-sampling, then ``depth`` 3x3 convs: [conv -> BN -> ReLU6] x (depth-1), conv -> BN.

    (B, cin, h, w) -> (B, cout, 2h, 2w). With depth 2 the keys match the reference's block.
    """

    def __init__(self, cin: int, cout: int, depth: int) -> None:
        super().__init__()
        self.up_sample = UpSample2x(cin)
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(cin, cin, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(inplace=True),
            ]
        layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """``log2(stride)`` UNet blocks of widths w, w/2, ..., w/2**n, then a 1x1 conv to RGB.

    Densified maps (smallest first) are added before blocks 0..len(maps)-1.

    Args:
        stride: total encoder stride (32 -> 5 blocks).
        width: decoder width w (reference 768); must be divisible by ``stride``.
        depth: 3x3 convs per block (reference 2).
    """

    def __init__(self, stride: int, width: int = 768, depth: int = 2) -> None:
        super().__init__()
        num_blocks = round(math.log2(stride))
        self.width = width
        self.depth = depth
        self.channels = [width // 2**i for i in range(num_blocks + 1)]
        self.dec = nn.ModuleList(
            UNetBlock(cin, cout, depth)
            for cin, cout in zip(self.channels[:-1], self.channels[1:], strict=True)
        )
        self.proj = nn.Conv2d(self.channels[-1], 3, kernel_size=1, bias=True)
        self._initialise()

    def _initialise(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, to_dec: list[torch.Tensor]) -> torch.Tensor:
        """Densified maps (smallest first, widths w, w/2, ...) -> (B, 3, H, W) prediction."""
        x = to_dec[0]
        for i, block in enumerate(self.dec):
            if 0 < i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)
