"""Diffusion Transformer (DiT; Peebles & Xie 2023, arXiv:2212.09748).

The (latent) image is cut into p x p patches, each linearly embedded into a token (a stride-p conv),
plus fixed 2-D sine-cosine position embeddings; N standard pre-norm Transformer blocks run over the
tokens; a final linear layer maps each token back to its p x p patch, so the output has the input's
shape (twice its channels with ``learn_sigma``).

Conditioning. The timestep t (embedded exactly as the U-Net does: the sinusoidal embedding of t on
the scale the diffusion method passes, then an MLP) and the class y (an embedding table whose row
``num_classes`` is the null class of classifier-free guidance) are summed into one vector c. Every
block regresses from c a shift, scale and gate for each of its two sub-layers (adaptive LayerNorm):

    x = x + gate_1(c) * Attention(LN(x) * (1 + scale_1(c)) + shift_1(c))
    x = x + gate_2(c) * MLP(LN(x) * (1 + scale_2(c)) + shift_2(c))

*adaLN-Zero*: the regression layers start at zero, so every gate is 0 and an untrained block is
exactly the identity; the final layer starts at zero too, so an untrained DiT predicts 0. The
tokens see t and y only through these modulations.

A conditioning *sequence* (a caption encoder's output, (B, L, D_ctx)) enters optionally, as

- ``cross``: a cross-attention sub-layer after the self-attention of every block (queries from the
  image tokens, keys and values from the sequence; PixArt-alpha, Chen et al. 2023), its output
  projection zero-initialised so that an untrained block stays the identity;
- ``joint``: the sequence, projected to the width, is appended to the image tokens and attends
  jointly with them in every block (the single-stream form of the joint attention of SD3's MM-DiT,
  Esser et al. 2024, with shared weights); its tokens are dropped at the output.

Without a given sequence, a class-conditional DiT with ``context`` on uses its class embedding as a
one-token sequence, so the class reaches the tokens through attention as well as modulation.

Attention is ``scaled_dot_product_attention`` (fused kernels where the hardware has them). The blocks
are ``self.blocks`` (an ``nn.ModuleList``): the natural units for FSDP's ``fully_shard``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.nets.unet import sinusoidal_embedding
from lightning_gen.nets.vit import sincos_pos_embed

# Peebles & Xie 2023, Table 1: depth, width (hidden size), heads. "T" is this project's tiny CPU size.
SIZES = {"T": (6, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = tuple(f"{size}/{patch}" for size in SIZES for patch in (2, 4, 8))
CPU_DEFAULT = {"patch_size": 2, "depth": 6, "width": 128, "heads": 4}  # T/2: ~1.9 M parameters
TIME_FREQUENCIES = 256  # sinusoidal features of t fed to the timestep MLP (DiT's choice)


@dataclass
class DiTConfig:
    """``method.dit``: a preset (``S/2``, ``XL/2``, ...) and/or explicit sizes; an explicit size wins
    over the preset's, and without either the tiny CPU size T/2 is used."""

    preset: str | None = field(default=None, metadata={"choices": PRESETS})
    patch_size: int | None = bounded(
        None, 1, hint="pixels per patch side; must divide the (latent) image size"
    )
    depth: int | None = bounded(None, 1, hint="Transformer blocks")
    width: int | None = bounded(None, 4, hint="token width, a multiple of 4 and of heads")
    heads: int | None = bounded(None, 1)
    mlp_ratio: float = bounded(4.0, 0, low_open=True)
    # a conditioning sequence: none; cross-attention in every block; or joint attention with the tokens
    context: str = choice("none", "none", "cross", "joint")
    context_dim: int | None = bounded(
        None, 1, hint="width of the conditioning sequence; default: the DiT width"
    )
    learn_sigma: bool = (
        False  # twice the output channels (DiT's learned variance); the method reads the first half
    )

    def sizes(self) -> dict[str, int]:
        """patch_size, depth, width and heads: explicit value > preset > the CPU default."""
        resolved = dict(CPU_DEFAULT)
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"unknown DiT preset {self.preset!r}; presets: {', '.join(PRESETS)}")
            size, patch = self.preset.split("/")
            resolved.update(zip(("depth", "width", "heads"), SIZES[size]), patch_size=int(patch))
        for key in resolved:
            if getattr(self, key) is not None:
                resolved[key] = getattr(self, key)
        return resolved


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm's affine map, per sample: x * (1 + scale) + shift over all tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention, queries from ``x`` and keys/values from ``source`` (itself by default)."""

    def __init__(self, width: int, heads: int, source_dim: int | None = None):
        super().__init__()
        self.heads = heads
        if source_dim is None:  # self-attention: one fused projection
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q, self.kv = nn.Linear(width, width), nn.Linear(source_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        n, length, _ = x.shape
        return x.view(n, length, parts, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self, x: torch.Tensor, source: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if source is None:
            q, k, v = self.split_heads(self.qkv(x), 3)
        else:
            (q,), (k, v) = self.split_heads(self.q(x), 1), self.split_heads(self.kv(source), 2)
        mask = None if mask is None else mask[:, None, None, :]  # (B, L_source): True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    """adaLN-Zero Transformer block, optionally with a cross-attention sub-layer."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        # shift, scale, gate for attention and for the MLP, regressed from the conditioning vector
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.cross_norm = nn.LayerNorm(width, eps=1e-6) if cross_attention else None
        self.cross_attn = Attention(width, heads, source_dim=width) if cross_attention else None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context``/``context_mask``: the sequence cross-attended to; ``token_mask`` (N, L): which of
        the tokens self-attention may attend to (joint attention over a padded sequence)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask=token_mask)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of every token to its p x p x C_out patch."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """f_theta(x_t, t, y, context): same call and time convention as ``UNet`` (``forward(x, t, y)``)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 2,
        width: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        context: str = "none",
        context_dim: int | None = None,
        learn_sigma: bool = False,
    ):
        super().__init__()
        check_sizes(image_size, patch_size, width, heads)
        if context not in ("none", "cross", "joint"):
            raise ValueError(f"unknown DiT context mode {context!r}: none, cross or joint")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.num_classes, self.context_mode, self.grid = num_classes, context, image_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        # fixed, so not saved: rebuilt from the sizes, identical on every rank and under any sharding
        # (cloned out of the [CLS]-first table: DDP's buffer broadcast refuses views into a larger storage)
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed(self.grid, width)[:, 1:].clone(memory_format=torch.contiguous_format),
            persistent=False,
        )
        self.t_embedder = nn.Sequential(
            nn.Linear(TIME_FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.y_embedder = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.context_embedder = (
            nn.Sequential(nn.LayerNorm(context_dim or width), nn.Linear(context_dim or width, width))
            if context != "none"
            else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, mlp_ratio, context == "cross") for _ in range(depth)
        )
        self.final_layer = FinalLayer(width, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear maps, N(0, 0.02) embeddings, adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight  # as a linear map of the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def embedding_dim(self) -> int:
        """Width of the conditioning vector c (time + class) of the adaLN modulation."""
        return self.t_embedder[-1].out_features

    def conditioning(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """c = MLP(sinusoidal(t)) + class embedding (the null class when no label is given)."""
        c = self.t_embedder(sinusoidal_embedding(t, TIME_FREQUENCIES).to(self.x_embedder.weight.dtype))
        if self.y_embedder is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this DiT was built without classes (num_classes=0): it cannot take labels")
        return c

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, grid², p² C) -> (N, C, grid p, grid p)."""
        n, p, g = len(tokens), self.patch_size, self.grid
        x = tokens.reshape(n, g, g, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.out_channels, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, C, H, W), t (N,) on the diffusion method's time scale, y (N,) labels or None,
        context (N, L, D_ctx) with optional context_mask (N, L), True where a token is real;
        ``embedding`` (N, width): one more vector added to the conditioning c (a distilled student's
        guidance weight)."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        c = self.conditioning(t, y)
        if embedding is not None:
            c = c + embedding
        if self.context_mode == "none":
            if context is not None:
                raise ValueError(
                    "this DiT takes no conditioning sequence: build it with context=cross or joint"
                )
        else:
            context = self.context_embedder(self.default_context(t, y) if context is None else context)
        if self.context_mode == "joint":
            return self.forward_joint(tokens, c, context, context_mask)
        for block in self.blocks:
            tokens = block(tokens, c, context, context_mask)
        return self.unpatchify(self.final_layer(tokens, c))

    def default_context(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Without a given sequence: the class embedding as a one-token sequence (the null class when
        y is None), where the sequence width is the DiT's own."""
        width = self.x_embedder.out_channels
        if self.y_embedder is None or self.context_embedder[0].normalized_shape[0] != width:
            raise ValueError(
                f"this DiT (context={self.context_mode}) needs a conditioning sequence: pass context=(N, L, D)"
            )
        y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
        return self.y_embedder(y)[:, None]

    def forward_joint(
        self, tokens: torch.Tensor, c: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        length = tokens.shape[1]
        joint = torch.cat([tokens, context], dim=1)
        mask = None
        if context_mask is not None:  # image tokens always attend; padding of the sequence never
            mask = torch.cat([context_mask.new_ones(len(joint), length), context_mask], dim=1)
        for block in self.blocks:
            joint = block(joint, c, token_mask=mask)
        return self.unpatchify(self.final_layer(joint[:, :length], c))

    @classmethod
    def from_config(
        cls, cfg: DiTConfig, in_channels: int, image_size: int, num_classes: int = 0, what: str = "image"
    ) -> DiT:
        """A DiT for (in_channels, image_size, image_size) inputs; size errors as one-line ConfigErrors.
        ``what`` names the input in messages ("latent" for latent diffusion)."""
        sizes = cfg.sizes()
        try:
            check_sizes(image_size, sizes["patch_size"], sizes["width"], sizes["heads"], what)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return cls(
            in_channels,
            image_size,
            sizes["patch_size"],
            sizes["width"],
            sizes["depth"],
            sizes["heads"],
            cfg.mlp_ratio,
            num_classes,
            cfg.context,
            cfg.context_dim,
            cfg.learn_sigma,
        )


def check_sizes(image_size: int, patch_size: int, width: int, heads: int, what: str = "image") -> None:
    """Patches must tile the input; heads must split the width; sine-cosine embeddings need width % 4 == 0."""
    if image_size % patch_size:
        fits = [p for p in range(1, image_size + 1) if image_size % p == 0 and p <= 8]
        raise ValueError(
            f"method.dit.patch_size={patch_size} does not divide the {what} size {image_size}: "
            f"patches must tile the {what}; use a patch size of {', '.join(map(str, fits))}"
        )
    if width % heads or width % 4:
        raise ValueError(
            f"method.dit.width={width} must be a multiple of 4 and of method.dit.heads={heads} "
            f"(e.g. width={math.lcm(4, heads) * max(1, width // math.lcm(4, heads))})"
        )
