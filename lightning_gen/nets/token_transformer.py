"""A decoder-only Transformer over a sequence of discrete tokens (GPT-2's block; Radford et al. 2019), with a
KV cache for sampling.

The sequence of L tokens t_1..t_L is predicted from a start token s (a class, or the null class):

    inputs   s,    t_1, ..., t_{L-1}          (embeddings + learned positions)
    outputs  p(t_1 | s), p(t_2 | s, t_1), ..., p(t_L | s, t_<L)

Blocks are pre-norm: x + attn(LN(x)), then x + MLP(LN(x)); attention is causal (position i attends to
positions <= i) through ``scaled_dot_product_attention``. One forward pass gives every conditional, so
the exact log-likelihood of a sequence is one pass; sampling draws t_1..t_L one at a time, each step
running only the new position against the keys and values cached from the earlier ones
(``Cache``), which is the same computation as the full pass restricted to that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Cache:
    """Keys and values of every layer, (N, heads, L, head_dim) each, filled up to ``length`` positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of the {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        n, _, length, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(n, length, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        dropout = self.dropout if self.training else 0.0
        return self.merge(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True))

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int) -> torch.Tensor:
        """The one new position ``position`` of ``x`` (N, 1, width): its key and value are written into the
        cache, and it attends to every cached position up to itself (no mask needed)."""
        q, k, v = self.split(x)
        keys[:, :, position : position + 1], values[:, :, position : position + 1] = k, v
        end = position + 1
        return self.merge(F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end]))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int) -> torch.Tensor:
        x = x + self.attn.step(self.norm1(x), keys, values, position)
        return x + self.mlp(self.norm2(x))


class TokenTransformer(nn.Module):
    """Logits (N, L, vocab) of L tokens given the start token; ``starts`` start tokens (classes + null)."""

    def __init__(
        self,
        vocab: int,
        length: int,
        starts: int = 1,
        width: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab, self.length, self.width, self.heads = vocab, length, width, heads
        self.token_embedding = nn.Embedding(vocab, width)
        self.start_embedding = nn.Embedding(starts, width)
        self.position = nn.Parameter(torch.zeros(1, length, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.apply(self._init)
        nn.init.normal_(self.position, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The input sequence (N, L, width): the start token, then t_1..t_{L-1}, plus positions."""
        x = torch.cat([self.start_embedding(starts)[:, None], self.token_embedding(tokens[:, :-1])], dim=1)
        return x + self.position[:, : x.shape[1]]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded inputs (N, L, width) -> logits (N, L, vocab), causally."""
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Tokens (N, L) and start tokens (N,) -> logits (N, L, vocab): position i predicts token i."""
        return self.transform(self.embed(tokens, starts))

    # ---------------------------------------------------------------- sampling with a KV cache
    def new_cache(self, n: int, like: torch.Tensor) -> Cache:
        shape = (n, self.heads, self.length, self.width // self.heads)
        make = lambda: torch.empty(shape, dtype=like.dtype, device=like.device)  # noqa: E731
        return Cache([make() for _ in self.blocks], [make() for _ in self.blocks])

    def step(
        self, cache: Cache, starts: torch.Tensor | None = None, token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (N, vocab) for the next position: feed the start tokens (first call) or the token drawn
        at the previous position (N,); the cache grows by one position."""
        position = cache.length
        x = self.start_embedding(starts) if position == 0 else self.token_embedding(token)
        x = self.drop(x[:, None] + self.position[:, position : position + 1])
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block.step(x, keys, values, position)
        cache.length = position + 1
        return self.head(self.norm(x))[:, 0]
