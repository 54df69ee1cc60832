"""The convolutional KL autoencoder of latent diffusion (Rombach et al. 2022, arXiv:2112.10752).

Encoder: a 3x3 conv, then one level per entry of ``block_out_channels``, each ``layers_per_block``
residual blocks (GroupNorm, SiLU, 3x3 conv, twice, plus a 1x1 shortcut where the width changes) and,
except at the last level, a stride-2 3x3 conv (input padded by one pixel right and bottom); a middle
block of residual block, single-head self-attention over all positions, residual block (attention
only here, at the lowest resolution, where it is cheapest); GroupNorm, SiLU and a 3x3 conv to
2 C channels: the mean and log-variance of a diagonal Gaussian q(z|x). A 1x1 conv ("quant_conv")
mixes them. The decoder mirrors it: 1x1 conv, 3x3 conv up to the widest level, the same middle block,
``layers_per_block + 1`` residual blocks per level with nearest-neighbour x2 upsampling and a 3x3 conv
between levels, GroupNorm, SiLU, 3x3 conv to the image channels. The downsampling factor is
f = 2^(levels - 1): Stable Diffusion's autoencoder (f = 8, C = 4) has levels of 128, 256, 512, 512.

The module and parameter names are those of the published ``AutoencoderKL`` checkpoints in the
diffusers layout, so such a checkpoint's state dict loads into this class as it is
(``lightning_gen.nets.diffusers_vae`` reads the files); this project's own latent autoencoder is the
same class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """One head over all H x W positions, residual: x + W_o softmax(q k^T / sqrt(C)) v."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(groups, channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom (28 -> 14 -> 7: odd sizes halve
    down to ceil(size / 2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks of one resolution, then an optional down- or upsampler."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(blocks)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class MidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """``double_z``: 2 C output channels, the mean and log-variance of q(z|x); else C (a VQ encoder's)."""

    def __init__(
        self, in_channels, widths, layers_per_block, latent_channels, groups, attention, double_z=True
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(
                widths[max(i - 1, 0)],
                width,
                layers_per_block,
                groups,
                "down" if i < len(widths) - 1 else None,
            )
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock2D(widths[-1], groups, attention)
        self.conv_norm_out = group_norm(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], (2 if double_z else 1) * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, out_channels, widths, layers_per_block, latent_channels, groups, attention):
        super().__init__()
        reversed_widths = list(reversed(widths))
        self.conv_in = nn.Conv2d(latent_channels, reversed_widths[0], 3, padding=1)
        self.mid_block = MidBlock2D(reversed_widths[0], groups, attention)
        self.up_blocks = nn.ModuleList(
            Level(
                reversed_widths[max(i - 1, 0)],
                width,
                layers_per_block + 1,
                groups,
                "up" if i < len(widths) - 1 else None,
            )
            for i, width in enumerate(reversed_widths)
        )
        self.conv_norm_out = group_norm(groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class KLAutoencoder(nn.Module):
    """x -> (mean, log-variance) of q(z|x) at 1/f the resolution; z -> x. Images in [-1, 1]."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_block_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
    ):
        super().__init__()
        widths = tuple(block_out_channels)
        bad = [w for w in widths if w % norm_num_groups]
        if bad:
            raise ValueError(f"widths {bad} are not multiples of the {norm_num_groups} GroupNorm groups")
        self.latent_channels = latent_channels
        self.downsampling_factor = 2 ** (len(widths) - 1)
        args = (widths, layers_per_block, latent_channels, norm_num_groups, mid_block_attention)
        self.encoder = Encoder(in_channels, *args)
        self.decoder = Decoder(out_channels or in_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (clamped to [-30, 20], so exp never overflows) of q(z|x)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight
