"""The DINOv2 Vision Transformer (Oquab et al. 2023, arXiv:2304.07193) in the official state-dict layout.

A feature extractor for generative metrics (Stein et al. 2023, arXiv:2306.04675, recommend the
Fréchet distance in DINOv2 space over Inception's): the layer-normalised [CLS] token of a pre-norm
ViT with patch 14, layer scale on both residual branches, optional register tokens
(Darcet et al. 2023, arXiv:2309.16588) and learned position embeddings resized to the input's grid.

Parameter names are those of the official checkpoints (``facebookresearch/dinov2`` hub weights,
e.g. ``dinov2_vits14_pretrain.pth``): ``cls_token``, ``pos_embed``, ``register_tokens``,
``mask_token``, ``patch_embed.proj``, ``blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``; so such a file loads with ``load_state_dict(strict=True)``.
The architecture is read from the file (``DinoV2Config.from_state_dict``): width, depth, patch size,
MLP width, registers; the heads are width / 64, as in every released model. The project's own ViT
(``nets/vit.py``) has other names (``nn.MultiheadAttention``) and no layer scale, hence this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64  # every released DINOv2 model: ViT-S 6 heads of 64, B 12, L 16, g 24
LAYER_NORM_EPS = 1e-6


@dataclass
class DinoV2Config:
    width: int = 384  # ViT-S/14
    depth: int = 12
    patch_size: int = 14
    in_channels: int = 3
    mlp_hidden: int = 1536
    registers: int = 0
    grid: int = 37  # position embeddings for grid x grid patches (518 px at patch 14)
    layer_scale: bool = True

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_DIM)

    @property
    def arch(self) -> str:
        """``vits14``, ``vitb14``, ``vitl14`` (``_reg`` with registers); ``vit<width>w<depth>d`` otherwise."""
        sizes = {(384, 12): "s", (768, 12): "b", (1024, 24): "l"}
        size = sizes.get((self.width, self.depth))
        name = f"vit{size}{self.patch_size}" if size else f"vit{self.width}w{self.depth}d{self.patch_size}"
        return name + ("_reg" if self.registers else "")

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> DinoV2Config:
        """The architecture of an official-layout state dict; ValueError naming what does not fit."""
        for key in (
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "norm.weight",
            "blocks.0.norm1.weight",
        ):
            if key not in state:
                chunked = any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state)
                hint = " (block-chunked training checkpoints are not supported)" if chunked else ""
                raise ValueError(f"not a DINOv2 ViT state dict: no {key!r}{hint}")
        if "blocks.0.mlp.w12.weight" in state:
            raise ValueError(
                "a DINOv2 ViT-g (SwiGLU MLP) state dict: only the MLP models (ViT-S/B/L) are supported"
            )
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        patch = state["patch_embed.proj.weight"]
        positions = state["pos_embed"].shape[1] - 1
        grid = round(positions**0.5)
        if grid * grid != positions:
            raise ValueError(f"pos_embed has {positions} patch positions, not a square grid")
        return cls(
            width=state["cls_token"].shape[-1],
            depth=depth,
            patch_size=patch.shape[-1],
            in_channels=patch.shape[1],
            mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
            registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
            grid=grid,
            layer_scale="blocks.0.ls1.gamma" in state,
        )


class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (Touvron et al. 2021, CaiT)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, rows * cols, width), row-major


class DinoV2(nn.Module):
    """``forward(images)`` -> the normalised [CLS] token (N, width); images normalised with the ImageNet
    mean and std, sides a multiple of the patch size."""

    def __init__(self, cfg: DinoV2Config | None = None):
        super().__init__()
        cfg = cfg or DinoV2Config()
        self.cfg, self.num_features = cfg, cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.grid**2, cfg.width) * 0.02)
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.registers, cfg.width)) if cfg.registers else None
        )
        self.mask_token = nn.Parameter(
            torch.zeros(1, cfg.width)
        )  # used in training only; kept for the layout
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows * cols, width): the [CLS] position, then the patch grid resized bicubically.

        As the official hub models: the plain ones scale by (grid + 0.1) / trained grid without
        antialiasing (a work-around DINO kept for compatibility), the register models resize to the
        size with antialiasing; at the trained grid nothing is resized."""
        grid = self.cfg.grid
        if (rows, cols) == (grid, grid):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        patches = patches.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if self.cfg.registers:
            patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", antialias=True)
        else:
            scale = ((rows + 0.1) / grid, (cols + 0.1) / grid)
            patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(cls.dtype)
        return torch.cat([cls, patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(rows, cols)
        if self.register_tokens is not None:  # after the [CLS] token, without a position
            registers = self.register_tokens.expand(len(x), -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]
