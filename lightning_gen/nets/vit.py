"""A plain Vision Transformer (Dosovitskiy et al. 2021) that also runs on a subset of patch tokens (MAE)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_gen.nets.deterministic import resize_bicubic


def sincos_pos_embed(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE, He et al. 2022), (1, 1 + grid², width), [CLS] first.

    The first half of the width encodes the patch's column, the second half its row, each as
    [sin(p ω_k), cos(p ω_k)] with ω_k = 10000^(-k / (width/4)), k = 0 .. width/4 - 1 (Vaswani et al.
    2017 per axis); the [CLS] position is zero.
    """
    if width % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    patches = torch.cat([axis(cols), axis(rows)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()[None]


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def position_embedding(kind: str, grid: int, width: int) -> nn.Parameter:
    """Position embeddings of a [CLS] token and grid x grid patches: learned, or fixed sine-cosine."""
    if kind == "sincos":
        return nn.Parameter(sincos_pos_embed(grid, width), requires_grad=False)
    if kind == "learned":
        return nn.Parameter(torch.randn(1, grid**2 + 1, width) * 0.02)
    raise ValueError(f"unknown position embedding {kind!r}: learned or sincos")


class VisionTransformer(nn.Module):
    """Patch embedding + position embedding + [CLS] token + pre-norm blocks; output = [CLS] feature.

    ``pos_embed``: "learned" (ViT, DINO, MoCo v3) or "sincos", fixed 2-D sine-cosine embeddings
    (MAE), kept as a parameter that does not train so that checkpoints have the same keys."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        pos_embed: str = "learned",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.num_patches = self.grid**2
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = position_embedding(pos_embed, self.grid, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> patch tokens (N, L, width) with position embeddings added."""
        tokens = self.patch_embed(x)
        return tokens.flatten(2).transpose(1, 2) + self.patch_pos_embed(*tokens.shape[-2:])

    def patch_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """Patch position embeddings, bicubically resized for another input size (DINO's local crops)."""
        pos = self.pos_embed[:, 1:]
        if (rows, cols) == (self.grid, self.grid):
            return pos
        grid = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = resize_bicubic(grid, (rows, cols))  # deterministic under trainer.deterministic
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the encoder on (a subset of) patch tokens; returns all tokens, [CLS] first, normalised."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(tokens), -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.patchify(x))[:, 0]
