"""Small convolutional encoder/decoder pair for low-resolution images (digits, MNIST, CIFAR)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels)


class ConvEncoder(nn.Module):
    """Stride-2 conv blocks halving the resolution down to 4x4, then a linear map to ``out_dim``."""

    def __init__(
        self, in_channels: int, image_size: int, out_dim: int, width: int = 32, max_width: int = 256
    ):
        super().__init__()
        if image_size < 4 or image_size & (image_size - 1):
            below = 2 ** max(2, image_size.bit_length() - 1)
            raise ValueError(
                f"the conv encoder needs a power-of-two image size >= 4, got {image_size}: "
                f"set data.image_size={below} or {below * 2}"
            )
        layers, channels = [nn.Conv2d(in_channels, width, 3, padding=1), _norm(width), nn.SiLU()], width
        for _ in range(int(math.log2(image_size // 4))):
            nxt = min(channels * 2, max_width)
            layers += [nn.Conv2d(channels, nxt, 4, stride=2, padding=1), _norm(nxt), nn.SiLU()]
            channels = nxt
        self.features = nn.Sequential(*layers)
        self.feature_shape = (channels, 4, 4)
        self.head = nn.Linear(channels * 16, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: linear to a 4x4 map, transposed convs doubling up to ``image_size``."""

    def __init__(
        self, in_dim: int, out_channels: int, image_size: int, width: int = 32, max_width: int = 256
    ):
        super().__init__()
        steps = int(math.log2(image_size // 4))
        channels = min(width * 2**steps, max_width)
        self.start_shape = (channels, 4, 4)
        self.project = nn.Linear(in_dim, channels * 16)
        layers = []
        for i in range(steps):
            nxt = min(width * 2 ** (steps - i - 1), max_width)
            layers += [_norm(channels), nn.SiLU(), nn.ConvTranspose2d(channels, nxt, 4, stride=2, padding=1)]
            channels = nxt
        layers += [_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, *self.start_shape))
