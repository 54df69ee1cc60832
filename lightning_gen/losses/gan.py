"""GAN losses on discriminator logits (Goodfellow et al. 2014), D(x) = sigmoid(logit).

Discriminator: maximise log D(x) + log(1 - D(G(z)))  ==  minimise softplus(-real) + softplus(fake).
Generator, ``minimax`` (Goodfellow's original): minimise log(1 - D(G(z))) = -softplus(fake).
Generator, ``non_saturating`` (standard in practice): minimise -log D(G(z)) = softplus(-fake).
Written with softplus so that saturated logits neither overflow nor lose their gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_gen.losses.precision import full_precision

GENERATOR_LOSSES = ("non_saturating", "minimax")


@full_precision
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


@full_precision
def generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()
    raise ValueError(f"unknown generator loss {kind!r}: use one of {GENERATOR_LOSSES}")
