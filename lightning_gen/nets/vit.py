"""A plain Vision Transformer (Dosovitskiy et al. 2021) that also runs on a subset of patch tokens (MAE).

The official SSL ViTs (MoCo v3's ``vits.py``, DINO's ``vision_transformer.py``, MAE's
``models_mae.py``) are timm-style ViTs that differ in a few details this module reproduces by name:
the position embeddings (learned, or fixed 2-D sine-cosine in one of two layouts), the weight
initialisation (``init_vit``), LayerNorm's epsilon (1e-6 in all three) and stochastic depth (DINO's
student). docs/methods/{moco,dino,mae}.md compare them line by line.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_gen.nets.deterministic import resize_bicubic

VIT_INITS = ("torch", "moco_v3", "dino", "mae")
POS_EMBEDS = ("learned", "sincos", "sincos_rows_first")


def sincos_pos_embed(grid: int, width: int, rows_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, (1, 1 + grid², width), [CLS] first (its row is zero).

    Each axis is encoded as [sin(p ω_k), cos(p ω_k)] with ω_k = 10000^(-k / (width/4)),
    k = 0 .. width/4 - 1 (Vaswani et al. 2017 per axis). MAE (``util/pos_embed.py``) puts the patch's
    column in the first half of the width and its row in the second; MoCo v3 (``vits.py``, whose
    ``meshgrid`` indexes the width axis first) puts the row first: ``rows_first``.
    """
    if width % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    halves = [axis(rows), axis(cols)] if rows_first else [axis(cols), axis(rows)]
    patches = torch.cat(halves, dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()[None]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): while training, each sample skips the residual branch with
    probability ``p``; kept branches are scaled by 1 / (1 - p) so that the expectation is unchanged."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)), each branch under DropPath."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


def position_embedding(kind: str, grid: int, width: int) -> nn.Parameter:
    """Position embeddings of a [CLS] token and grid x grid patches: learned, or fixed sine-cosine."""
    if kind in ("sincos", "sincos_rows_first"):
        return nn.Parameter(sincos_pos_embed(grid, width, kind == "sincos_rows_first"), requires_grad=False)
    if kind == "learned":
        return nn.Parameter(torch.randn(1, grid**2 + 1, width) * 0.02)
    raise ValueError(f"unknown position embedding {kind!r}: {', '.join(POS_EMBEDS)}")


@torch.no_grad()
def init_transformer_layers(module: nn.Module, scheme: str) -> None:
    """Re-initialise the linear, attention and LayerNorm weights of ``module`` as an official ViT does.

    - ``moco_v3`` (``vits.py``): Xavier-uniform linears with Q, K and V each treated as its own
      D x D matrix, zero biases.
    - ``mae`` (``models_mae.py``): Xavier-uniform linears, the fused QKV as one 3D x D matrix, zero biases.
    - ``dino`` (``vision_transformer.py``): truncated normal (std 0.02) linears, zero biases.
    - ``torch``: PyTorch's own initialisation, left as it is.

    LayerNorms start at weight 1, bias 0 in all of them (as PyTorch's).
    """
    if scheme not in VIT_INITS:
        raise ValueError(f"unknown ViT initialisation {scheme!r}: {', '.join(VIT_INITS)}")
    if scheme == "torch":
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if scheme == "dino":
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            qkv = m.in_proj_weight  # (3D, D): Q, K and V stacked
            if scheme == "dino":
                nn.init.trunc_normal_(qkv, std=0.02, a=-2.0, b=2.0)
            elif scheme == "moco_v3":
                bound = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
                nn.init.uniform_(qkv, -bound, bound)
            else:
                nn.init.xavier_uniform_(qkv)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """Patch embedding + position embedding + [CLS] token + pre-norm blocks; output = [CLS] feature.

    ``pos_embed``: "learned" (ViT, DINO), "sincos" (MAE's fixed 2-D sine-cosine embeddings) or
    "sincos_rows_first" (MoCo v3's layout of the same), fixed ones kept as a parameter that does not
    train so that checkpoints have the same keys. ``drop_path``: stochastic-depth rate of the last
    block, rising linearly from 0 at the first (DINO's student: 0.1). ``init``: ``VIT_INITS``.
    """

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
        drop_path: float = 0.0,
        layer_norm_eps: float = 1e-6,
        init: str = "torch",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.num_patches = self.grid**2
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = position_embedding(pos_embed, self.grid, width)
        self.fixed_pos_embed = pos_embed != "learned"  # a table that never trains (also when fine-tuned)
        rates = torch.linspace(0, drop_path, depth).tolist()  # DINO's stochastic depth decay rule
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rate, layer_norm_eps) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.out_dim = width
        self.init_weights(init)

    @torch.no_grad()
    def init_weights(self, scheme: str) -> None:
        """``init_transformer_layers`` plus the official tokens and patch projection of ``scheme``."""
        init_transformer_layers(self, scheme)
        if scheme in ("moco_v3", "mae"):
            # the patch projection initialised as the linear map it is: Xavier over C·p² inputs and D
            # outputs, U(±sqrt(6 / (C p² + D))) (MoCo v3 writes 3 p² for its RGB inputs)
            weight = self.patch_embed.weight
            bound = math.sqrt(6.0 / (weight[0].numel() + weight.shape[0]))
            nn.init.uniform_(weight, -bound, bound)
        if scheme == "moco_v3":
            nn.init.zeros_(self.patch_embed.bias)
            nn.init.normal_(self.cls_token, std=1e-6)
        elif scheme == "mae":
            nn.init.normal_(self.cls_token, std=0.02)
        elif scheme == "dino":
            nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
            if self.pos_embed.requires_grad:
                nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)

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


def disable_drop_path(module: nn.Module) -> nn.Module:
    """Set every DropPath in ``module`` to rate 0 (DINO's teacher: a copy of the student without it)."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.p = 0.0
    return module
