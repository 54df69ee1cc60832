"""A small DDPM U-Net (Ho et al. 2020): residual blocks with GroupNorm, sinusoidal time embedding,
self-attention at the lowest resolutions, optional class embedding with a learned null token for
classifier-free guidance. Predicts a tensor the shape of its input (epsilon or a velocity).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer position encoding of (possibly fractional) timesteps t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over spatial positions (used at low resolution only: cost is (HW)^2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv, self.out = (
            _norm(channels),
            nn.Conv2d(channels, 3 * channels, 1),
            nn.Conv2d(channels, channels, 1),
        )
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t, y). ``num_classes > 0`` adds a class embedding with index ``num_classes`` = null."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        width: int = 64,
        mults: tuple[int, ...] = (1, 2, 2),
        blocks_per_level: int = 1,
        attention_resolutions: tuple[int, ...] = (8,),
        dropout: float = 0.1,
        num_classes: int = 0,
    ):
        super().__init__()
        if image_size < 2 ** (len(mults) - 1):
            raise ValueError(f"image size {image_size} is too small for {len(mults) - 1} downsamplings")
        self.width, self.num_classes = width, num_classes
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)

        # An odd size halves to its ceiling (7 -> 4: latents of 28 px images at f = 4); on the way up each
        # level is resized back to the size of the skip it meets, so res walks the same sizes back.
        self.down, channels, skips, res, sizes = nn.ModuleList(), width, [width], image_size, []
        for level, mult in enumerate(mults):
            for _ in range(blocks_per_level):
                out = width * mult
                self.down.append(self._block(channels, out, emb_dim, dropout, res in attention_resolutions))
                channels = out
                skips.append(channels)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skips.append(channels)
                sizes.append(res)
                res = (res + 1) // 2
        self.mid = nn.ModuleList(
            [
                ResBlock(channels, channels, emb_dim, dropout),
                Attention(channels),
                ResBlock(channels, channels, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(blocks_per_level + 1):
                out = width * mult
                self.up.append(
                    self._block(channels + skips.pop(), out, emb_dim, dropout, res in attention_resolutions)
                )
                channels = out
            if level > 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"),
                        nn.Conv2d(channels, channels, 3, padding=1),
                    )
                )
                res = sizes.pop()
        self.head = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @staticmethod
    def _block(in_ch, out_ch, emb_dim, dropout, attend) -> nn.ModuleList:
        return nn.ModuleList(
            [ResBlock(in_ch, out_ch, emb_dim, dropout), *([Attention(out_ch)] if attend else [])]
        )

    @staticmethod
    def _run(block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.ModuleList):
            h = block[0](h, emb)
            for extra in block[1:]:
                h = extra(h)
            return h
        return block(h)

    @property
    def embedding_dim(self) -> int:
        """Width of the time (+ class) embedding that conditions every block."""
        return self.time_mlp[-1].out_features

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``embedding`` (N, embedding_dim): one more conditioning vector added to the time embedding
        (a distilled student's guidance weight)."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.width))
        if embedding is not None:
            emb = emb + embedding
        if self.class_emb is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("this U-Net was built without classes (num_classes=0): it cannot take labels")
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
            else:  # upsampling: nearest to the next skip's size (2x, or 2x - 1 back to an odd size)
                upsample, conv = block
                h = conv(F.interpolate(h, size=hs[-1].shape[-2:], mode=upsample.mode))
        return self.head(h)
