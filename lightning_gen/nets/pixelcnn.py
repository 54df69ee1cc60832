"""PixelCNN (van den Oord et al. 2016a): masked convolutions; residual blocks with the gated activation
unit of van den Oord et al. 2016b; 256-way softmax.

Order: pixels in raster order, and within a pixel the channels in order (R, G, B). Feature maps
are split into C contiguous groups, group g belonging to colour channel g. Mask A (first layer)
lets output group g see, at the centre pixel, only input groups < g; mask B (every later layer)
also lets it see group g itself. Pixels above, and left in the same row, are always visible;
everything later is masked. So logits for subpixel (r, c, g) depend only on earlier subpixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_groups(num: int, groups: int) -> torch.Tensor:
    return torch.arange(num) * groups // num


class MaskedConv2d(nn.Conv2d):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, mask_type: str, data_channels: int):
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        k, centre = kernel_size, kernel_size // 2
        mask = torch.zeros(out_ch, in_ch, k, k)
        mask[:, :, :centre, :] = 1  # rows above
        mask[:, :, centre, :centre] = 1  # left in the same row
        g_out = channel_groups(out_ch, data_channels)[:, None]
        g_in = channel_groups(in_ch, data_channels)[None, :]
        mask[:, :, centre, centre] = (g_in < g_out if mask_type == "A" else g_in <= g_out).float()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class GatedBlock(nn.Module):
    """h + W_o (tanh(W_f * h) . sigmoid(W_g * h)), all convolutions mask B."""

    def __init__(self, channels: int, kernel_size: int, data_channels: int):
        super().__init__()
        self.f = MaskedConv2d(channels, channels, kernel_size, "B", data_channels)
        self.g = MaskedConv2d(channels, channels, kernel_size, "B", data_channels)
        self.out = MaskedConv2d(channels, channels, 1, "B", data_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.out(torch.tanh(self.f(h)) * torch.sigmoid(self.g(h)))


class PixelCNN(nn.Module):
    """x (N, C, H, W) in [-1, 1] -> logits (N, C, 256, H, W) of each subpixel given the ones before it."""

    def __init__(self, data_channels: int, width: int = 64, blocks: int = 5, kernel_size: int = 5):
        super().__init__()
        if width % data_channels:
            raise ValueError(
                f"width {width} must be divisible by the number of image channels {data_channels}"
            )
        self.data_channels = data_channels
        self.stem = MaskedConv2d(data_channels, width, 7, "A", data_channels)
        self.blocks = nn.Sequential(*[GatedBlock(width, kernel_size, data_channels) for _ in range(blocks)])
        self.head = nn.Sequential(
            nn.ReLU(),
            MaskedConv2d(width, width, 1, "B", data_channels),
            nn.ReLU(),
            MaskedConv2d(width, 256 * data_channels, 1, "B", data_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.head(self.blocks(self.stem(x))).view(n, c, 256, h, w)
