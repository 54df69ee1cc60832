"""Colour digits: scikit-learn's embedded digits, tinted, so that colorization has something to learn offline.

Each digit's strokes get a foreground colour and the rest a dark background colour. With
``class_hue: true`` the foreground hue is tied to the class (digit d near hue d/10, jittered),
the way colour goes with object category in natural images (grass, sky, skin): predicting it
from lightness alone then requires recognising the digit. With ``class_hue: false`` the hue is
uniformly random and can only be guessed on average. Colours are drawn from a fixed seed, so the
dataset is identical on every process and every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.data.base import ImageTensorDataset
from lightning_gen.data.digits import DigitsConfig, DigitsDataModule
from lightning_gen.registry import register_datamodule


@dataclass
class ColorDigitsConfig(DigitsConfig):
    class_hue: bool = True  # foreground hue = class / 10 (+ jitter); false: uniformly random hue
    hue_jitter: float = 0.03
    color_seed: int = 0


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB (all in [0, 1]), (N,) each -> (N, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


@register_datamodule("color_digits", ColorDigitsConfig)
class ColorDigitsDataModule(DigitsDataModule):
    """The embedded digits in colour (hue tied to the class by default): colorization without downloads."""

    channels = 3
    mean, std = (0.2, 0.2, 0.2), (0.3, 0.3, 0.3)

    def load(self, split: str) -> ImageTensorDataset:
        grey = super().load(split)
        n = len(grey)
        gen = torch.Generator().manual_seed(self.cfg.color_seed * 7919 + (split == "test"))
        jitter = (torch.rand(n, generator=gen) * 2 - 1) * self.cfg.hue_jitter
        random_hue = torch.rand(n, generator=gen)
        hue = (grey.labels.float() / 10 + jitter) % 1.0 if self.cfg.class_hue else random_hue
        fg = hsv_to_rgb(
            hue, 0.65 + 0.35 * torch.rand(n, generator=gen), 0.8 + 0.2 * torch.rand(n, generator=gen)
        )
        bg = hsv_to_rgb(
            torch.rand(n, generator=gen),
            0.5 * torch.rand(n, generator=gen),
            0.1 + 0.15 * torch.rand(n, generator=gen),
        )
        ink = grey.images.float() / 255.0  # (N, 1, H, W)
        rgb = ink * fg[:, :, None, None] + (1 - ink) * bg[:, :, None, None]
        return ImageTensorDataset(rgb.mul(255).round().clamp(0, 255).to(torch.uint8), grey.labels)
