"""k-means on frozen features and agreement of its clusters with the labels.

- k-means: k-means++ seeding, Lloyd iterations, ``n_init`` restarts keeping the lowest inertia;
  on the features' device, seeded.
- NMI: I(U; V) / mean(H(U), H(V)) (arithmetic mean, scikit-learn's default).
- ARI: (sum_ij C(n_ij, 2) - E) / (max - E) with E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2) and
  max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2 (Hubert & Arabie 1985).
- Cluster accuracy: accuracy under the best one-to-one matching of clusters to classes (Hungarian).

The metrics are computed from the contingency table, independently of scikit-learn, and the
tests compare them with scikit-learn's on the same assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lightning_gen.eval import EvalError


@dataclass
class KMeansConfig:
    num_clusters: int | None = None  # None: the number of classes
    n_init: int = 5
    iterations: int = 100
    l2_normalize: bool = True  # cluster directions (cosine geometry), like the kNN
    seed: int = 0


def _plusplus_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        probs = nearest.cpu().double()
        probs = probs / probs.sum() if probs.sum() > 0 else torch.full_like(probs, 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centers.append(x[nxt])
        nearest = torch.minimum(nearest, (x - x[nxt]).pow(2).sum(1))
    return torch.stack(centers)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, n_init: int = 5, iterations: int = 100, seed: int = 0):
    """Assignments (N,), centers (k, D) and inertia (sum of squared distances), best of ``n_init`` runs."""
    if not 1 <= k <= len(x):
        raise EvalError(f"k-means with {k} clusters needs 1 <= k <= number of samples ({len(x)})")
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        centers = _plusplus_init(x, k, generator)
        for _ in range(iterations):
            assign = torch.cdist(x, centers).argmin(1)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            empty = counts == 0  # an empty cluster keeps its old center
            new = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
            if torch.allclose(new, centers):
                break
            centers = new
        assign = torch.cdist(x, centers).argmin(1)
        inertia = float((x - centers[assign]).pow(2).sum())
        if best is None or inertia < best[2]:
            best = (assign, centers, inertia)
    return best


def contingency(labels: torch.Tensor | np.ndarray, clusters: torch.Tensor | np.ndarray) -> np.ndarray:
    """Counts n_ij of samples with class i (rows) in cluster j (columns), over the values present."""
    labels, clusters = np.asarray(torch.as_tensor(labels).cpu()), np.asarray(torch.as_tensor(clusters).cpu())
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((li.max() + 1, ci.max() + 1), dtype=np.int64)
    np.add.at(table, (li, ci), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels, clusters) -> float:
    """Normalised mutual information with the arithmetic-mean normaliser."""
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()
    h_u, h_v = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_u == 0 and h_v == 0:  # both one block: identical partitions
        return 1.0
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    denom = (h_u + h_v) / 2
    return max(mi, 0.0) / denom if denom > 0 else 0.0


def ari(labels, clusters) -> float:
    """Adjusted Rand index."""
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()

    def pairs(v):
        return v * (v - 1) / 2

    index = pairs(table).sum()
    rows, cols = pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum()
    expected = rows * cols / pairs(n) if n > 1 else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # degenerate: both partitions trivial in the same way
        return 1.0
    return float((index - expected) / (maximum - expected))


def cluster_accuracy(labels, clusters) -> float:
    """Accuracy after mapping clusters to classes one-to-one so as to maximise the matches."""
    from scipy.optimize import linear_sum_assignment

    table = contingency(labels, clusters)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def cluster_features(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: KMeansConfig | None = None
) -> dict[str, float]:
    """k-means on the features, scored against the labels: ``nmi``, ``ari``, ``accuracy``, ``inertia``."""
    cfg = cfg or KMeansConfig()
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise EvalError(
            "clustering metrics compare clusters with labels: every sample needs a label (not -1)"
        )
    x = F.normalize(features.float(), dim=1) if cfg.l2_normalize else features.float()
    assign, _, inertia = kmeans(x, cfg.num_clusters or num_classes, cfg.n_init, cfg.iterations, cfg.seed)
    return {
        "nmi": nmi(labels, assign),
        "ari": ari(labels, assign),
        "accuracy": cluster_accuracy(labels, assign),
        "inertia": inertia,
    }
