"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018; DINO's protocol, Caron et al. 2021).

Features are L2-normalised, so the dot product is the cosine similarity s. Each query takes its k
most similar training samples; neighbour j votes for its class with weight exp(s_j / T), and the
class with the largest summed weight wins. T = 0.07, k = 20 (and 200) as in DINO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lightning_gen.eval import EvalError
from lightning_gen.eval.probe import check_labels


@dataclass
class KNNConfig:
    k: list[int] = field(default_factory=lambda: [20, 200])
    temperature: float = 0.07
    chunk_size: int = 1024  # queries per similarity matrix: bounds memory at chunk_size x bank size


def check_k(ks: list[int] | tuple[int, ...], bank_size: int) -> None:
    for k in ks:
        if k < 1 or k > bank_size:
            raise EvalError(
                f"kNN with k={k} needs 1 <= k <= the number of labeled training samples in the feature bank, "
                f"which is {bank_size}. Use a smaller k (e.g. knn.k=[{min(20, bank_size)}]) "
                f"or a larger training split."
            )


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, C): the sum of exp(cos / T) over each query's k nearest bank samples of that class."""
    check_labels(bank_labels, num_classes, "kNN")
    check_k([k], len(bank))
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for chunk in queries.float().split(chunk_size):
        similarity = F.normalize(chunk, dim=1) @ bank.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(len(chunk), num_classes, device=bank.device, dtype=weights.dtype)
        scores.scatter_add_(1, bank_labels[top_idx], weights)
        out.append(scores)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    cfg: KNNConfig | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5) accuracy of the weighted vote for every k of ``cfg.k``: keys ``top1_k20``..."""
    cfg = cfg or KNNConfig()
    check_k(cfg.k, len(bank))
    check_labels(query_labels, num_classes, "kNN evaluation")
    result = {}
    for k in cfg.k:
        scores = knn_scores(bank, bank_labels, queries, num_classes, k, cfg.temperature, cfg.chunk_size)
        top = scores.topk(min(5, num_classes), dim=1).indices
        result[f"top1_k{k}"] = float((top[:, 0] == query_labels).float().mean())
        result[f"top5_k{k}"] = float((top == query_labels[:, None]).any(1).float().mean())
    return result
