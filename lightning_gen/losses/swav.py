"""SwAV's pieces (Caron et al. 2020): Sinkhorn-Knopp codes over the global batch, swapped prediction, queue.

Scores are dot products of L2-normalised embeddings with the K (unit-norm) prototypes. The codes Q
of a batch of B samples solve an entropy-regularised optimal transport: every sample gets a
distribution over prototypes, and every prototype gets an equal share B/K of the batch,

    Q = argmax_{Q ∈ 𝒬} Tr(Qᵀ S) + ε H(Q),   𝒬 = {Q ≥ 0 : Q 1_K = 1_B,  Qᵀ 1_B = (B/K) 1_K}

whose solution is Q = diag(u) exp(S/ε) diag(v); a few Sinkhorn-Knopp iterations find u and v by
alternately normalising the prototype and the sample marginals. The equal-partition constraint is
what prevents collapse, and it is a constraint on the *global* batch: under DDP the prototype
marginals are all-reduced over ranks (each rank only ever holds its own rows), so the codes of
every sample equal those of one process holding the whole batch (tested on 2 processes).

Small batches make the partition noisy; SwAV then adds the embeddings of recent batches (a queue)
to the rows the codes are computed over, but predicts codes for the current batch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.distributed import all_reduce_max, all_reduce_sum, gather_no_grad, rank, world_size
from lightning_gen.losses.precision import full_precision


@torch.no_grad()
@full_precision
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes (B_local, K) of this rank's rows of the global score matrix; every row sums to 1.

    Sums over samples (prototype marginals, the total mass, the sample count) are all-reduced, so
    the result is the single-process Sinkhorn-Knopp on the rows of all ranks. The last step
    normalises the sample marginals, so every returned row is exactly a distribution.
    """
    # exp((S - max)/ε): the shift cancels in the first normalisation; it must be the *global* max
    # to cancel on every rank alike, and keeps exp finite for small ε
    shift = all_reduce_max(scores.max().reshape(1))
    q = torch.exp((scores - shift) / epsilon).T  # (K, B_local)
    n_prototypes = q.shape[0]
    n_samples = all_reduce_sum(torch.full((1,), float(q.shape[1]), device=q.device))
    q /= all_reduce_sum(q.sum().reshape(1))
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # every prototype: mass 1/K
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # every sample: mass 1/B
        q /= n_samples
    return (q * n_samples).T


@torch.no_grad()
@full_precision
def assign_codes(
    batch_scores: torch.Tensor,
    queue_scores: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> torch.Tensor:
    """Sinkhorn codes of the batch, computed over the batch and (optionally) this rank's queue rows."""
    rows = batch_scores if queue_scores is None else torch.cat([queue_scores, batch_scores])
    return sinkhorn_knopp(rows, epsilon, iterations)[-len(batch_scores) :]


@full_precision
def swapped_prediction_loss(
    scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV's loss: the code of view a is predicted from every other view v.

        L = 1/|A| Σ_a 1/(V-1) Σ_{v≠a} mean_b [ -Σ_k q_a[b, k] log softmax(s_v[b] / τ)_k ]

    ``scores``: prototype scores of all V views (the code views first), ``codes``: the codes of
    the first |A| views. Each rank averages over its own samples; DDP's gradient average then is
    the gradient of the global mean, because the codes themselves were computed globally.
    """
    log_probs = [F.log_softmax(s / temperature, dim=1) for s in scores]
    total = 0.0
    for a, q in enumerate(codes):
        others = [-(q * log_p).sum(1).mean() for v, log_p in enumerate(log_probs) if v != a]
        total = total + sum(others) / len(others)
    return total / len(codes)


class FeatureQueue(nn.Module):
    """The last ``size`` embeddings of each code view, newest first, identical on every rank.

    ``push`` gathers the embeddings of all ranks (rank order) before writing, so every rank holds the
    same queue and a checkpoint (written by rank 0) restores all of them; ``filled`` counts the rows
    written so far (also a buffer). Whether the queue is ``full`` decides on the host which rows enter
    Sinkhorn-Knopp, so the count is mirrored in a Python int, read from the buffer once after a
    checkpoint is loaded and then advanced by ``push``: reading the buffer at every step would make
    the host wait for the GPU. Each rank uses a disjoint share of the rows in Sinkhorn-Knopp
    (``local_rows``), so the queue enters the global transport problem exactly once.
    """

    def __init__(self, views: int, size: int, dim: int):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("features", torch.zeros(views, size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._filled_on_host: int | None = 0  # None: unknown (a state dict was loaded), read it once

    @property
    def size(self) -> int:
        return self.features.shape[1]

    @property
    def full(self) -> bool:
        if self._filled_on_host is None:
            self._filled_on_host = int(self.filled)
        return self._filled_on_host >= self.size

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._filled_on_host = None

    @torch.no_grad()
    def push(self, embeddings: list[torch.Tensor]) -> None:
        for view, z in enumerate(embeddings):
            z = gather_no_grad(z.detach().float())[: self.size]
            kept = self.features[view, : self.size - len(z)].clone()
            self.features[view] = torch.cat([z.to(self.features.dtype), kept])
        self.filled.copy_((self.filled + len(z)).clamp(max=self.size))
        if self._filled_on_host is not None:
            self._filled_on_host = min(self._filled_on_host + len(z), self.size)

    def local_rows(self, view: int) -> torch.Tensor:
        """This rank's share of the queue rows of ``view`` (ranks together cover each row once)."""
        return torch.tensor_split(self.features[view], world_size())[rank()]
