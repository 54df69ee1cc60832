"""Cross-entropy over the labeled samples of a batch (online probe, supervised baseline), and the
negative log-likelihood of token sequences (autoregressive token models).

Unlabeled samples carry label -1 (STL-10's unlabeled split, semi-supervised data). They are masked
out of the mean rather than indexed away: ``logits[labels >= 0]`` has a shape that depends on the
labels, so on a GPU the host would wait at every step for the count. A batch without any label
gives loss 0 (no gradient) and accuracy 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_gen.losses.precision import full_precision


@full_precision
def labeled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) over the samples whose label is >= 0."""
    labeled = labels >= 0
    count = labeled.sum().clamp(min=1)
    losses = F.cross_entropy(
        logits, labels, ignore_index=-1, reduction="none", label_smoothing=label_smoothing
    )
    correct = (logits.argmax(1) == labels) & labeled
    return losses.sum() / count, correct.sum() / count


@full_precision
def sequence_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(sequence) per sequence in nats: the cross-entropies of logits (N, L, V) against tokens (N, L),
    summed over the L positions (an autoregressive model's exact negative log-likelihood)."""
    return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").sum(1)
