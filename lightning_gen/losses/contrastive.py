"""Contrastive losses (van den Oord et al. 2018; Chen et al. 2020; He et al. 2020): NT-Xent by sample index, InfoNCE, MoCo's key queue.

``nt_xent`` finds positives by *sample index*: every row whose index equals the anchor's index
(other than the anchor itself) is a positive, every other row a negative. Two views, multi-crop
(any number of views of the same image) and supervised contrastive learning (pass class labels
as the index, Khosla et al. 2020) are therefore the same code path. For 2 views it is exactly
SimCLR's Algorithm 1 loss ℓ(i, j) averaged over the 2N anchors.

Under DDP the candidates are gathered from every rank *with gradient* (``gather_with_grad``): each
rank's loss is the mean over its own anchors, DDP averages gradients over ranks, and the result
equals the single-process loss and gradients on the concatenated batch (tested on 2 processes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.distributed import gather_no_grad, gather_with_grad, rank
from lightning_gen.losses.precision import full_precision


@full_precision
def nt_xent(
    z: torch.Tensor, index: torch.Tensor, temperature: float = 0.1, gather: bool = True
) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy with positives found by index.

    z: (M, D) projections of every view on this rank (views concatenated), index: (M,) sample ids
    (or class labels for supervised contrastive). Each anchor i scores

        ℓ_i = -1/|P(i)| Σ_{p ∈ P(i)} log [ exp(s_ip / τ) / Σ_{k ≠ i} exp(s_ik / τ) ]

    with s the cosine similarity over all rows of all ranks. Anchors without a positive are skipped
    (masked out of the mean rather than indexed away: a boolean index would make the host wait for
    the GPU to count them).
    """
    z = F.normalize(z, dim=1)
    candidates = gather_with_grad(z) if gather else z
    cand_index = gather_no_grad(index) if gather else index
    offset = rank() * len(z) if gather else 0  # where this rank's rows sit in the gathered matrix
    logits = z @ candidates.T / temperature
    rows = torch.arange(len(z), device=z.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, rows + offset] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    positive = (index.view(-1, 1) == cand_index.view(1, -1)) & ~is_self
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(~positive, 0.0)
    n_pos = positive.sum(1)
    has_pos = n_pos > 0
    per_anchor = -log_prob.sum(1) / n_pos.clamp(min=1)
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1)


@full_precision
def info_nce(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0, gather: bool = True
) -> torch.Tensor:
    """InfoNCE with in-batch negatives: query i's positive is key i, every other key a negative.

    Scores are raw dot products divided by ``temperature``; normalise the inputs first for cosine
    scores. With ``gather`` the keys of every rank are candidates (gathered *with* gradient, so
    keys that come from the trained network get the gradient of the other ranks' queries too); the
    mean over this rank's queries, averaged over ranks by DDP, then equals the single-process loss
    and gradients on the concatenated batch (tested on 2 processes). Used by MoCo v3 (momentum
    keys, which carry no gradient) and CPC (keys = future patch codes, which do).
    """
    candidates = gather_with_grad(keys) if gather else keys
    offset = rank() * len(keys) if gather else 0  # where this rank's keys sit among the candidates
    logits = queries @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device) + offset)


@full_precision
def moco_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.07
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE (Eqn. 1): positive q·k in column 0, negatives q·queue; q, k L2-normalised here.

    Returns the loss and the logits ((K+1)-way contrast accuracy is a monitoring metric only).
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1).detach()
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), logits


class KeyQueue(nn.Module):
    """FIFO dictionary of K keys for MoCo, identical on every rank and saved in checkpoints.

    ``keys`` and ``ptr`` are registered buffers, so they are part of ``state_dict`` (and of every
    Lightning checkpoint). ``enqueue`` gathers the keys of all ranks first (rank order), so every
    rank writes the same rows at the same pointer.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = F.normalize(gather_no_grad(keys.detach().float()), dim=1)[-len(self) :]
        rows = (self.ptr + torch.arange(len(keys), device=keys.device)) % len(self)
        self.keys[rows] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + len(keys)) % len(self))
