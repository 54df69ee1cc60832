"""DCGAN generator and discriminator (Radford et al. 2016), following the paper's guidelines:
strided convolutions instead of pooling, fractionally-strided ones in G, BatchNorm in both (not on
G's output nor D's input), no fully connected hidden layers, ReLU in G with a Tanh output,
LeakyReLU(0.2) in D, weights ~ N(0, 0.02).

Conditional variants: G adds a learned class embedding to z; D is a projection discriminator
(Miyato & Koyama 2018), logit = psi(phi(x)) + <embed(y), phi(x)>.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _levels(image_size: int) -> int:
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"DCGAN nets need a power-of-two image size >= 8, got {image_size}")
    return int(math.log2(image_size // 4))


def dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (N, z_dim) -> image (N, C, S, S) in [-1, 1]: project to 4x4, then double the resolution."""

    def __init__(self, z_dim: int, out_channels: int, image_size: int, width: int = 64, num_classes: int = 0):
        super().__init__()
        levels = _levels(image_size)
        channels = width * 2 ** (levels - 1)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.class_emb = nn.Embedding(num_classes, z_dim) if num_classes > 0 else None
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, channels, 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(True),
        ]
        for _ in range(levels - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(True),
            ]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.class_emb is not None:
            if y is None:
                raise ValueError("a conditional generator needs class labels y")
            z = z + self.class_emb(y)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """image (N, C, S, S) in [-1, 1] -> real/fake logit (N,)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64, num_classes: int = 0):
        super().__init__()
        levels = _levels(image_size)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = width
        for _ in range(levels - 1):
            layers += [
                nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels * 2),
                nn.LeakyReLU(0.2, True),
            ]
            channels *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 4, 1, 0)  # 4x4 -> 1x1: the paper's last conv, no FC layer
        self.class_emb = nn.Embedding(num_classes, channels) if num_classes > 0 else None
        dcgan_init(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        logit = self.head(h).flatten()
        if self.class_emb is not None:
            if y is None:
                raise ValueError("a conditional discriminator needs class labels y")
            logit = logit + (self.class_emb(y) * h.sum(dim=(2, 3))).sum(1)
        return logit
