"""The official SSL codes' loss reductions and optimizer steps, written here independently as formulas.

Each function restates what one official repository computes (file and lines in its docstring), on
plain tensors, without importing anything from lightning_gen: the parity tests compare the project's
losses and first optimizer updates with these. They are read from the sources, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _off_diagonal_squares(m: torch.Tensor) -> torch.Tensor:
    return (m - torch.diag(torch.diagonal(m))).pow(2).sum()


def vicreg_loss(x: torch.Tensor, y: torch.Tensor, sim=25.0, std=25.0, cov=1.0) -> torch.Tensor:
    """facebookresearch/vicreg main_vicreg.py, VICReg.forward (l. 198-219), on one process: the mean
    squared error, then each view's mean hinge on its standard deviation, *halved*, and the squared
    off-diagonal covariances over the expander's width."""
    n, d = x.shape
    invariance = ((x - y) ** 2).mean()
    x, y = x - x.mean(0), y - y.mean(0)
    hinge_x = torch.relu(1 - torch.sqrt(x.var(0) + 1e-4)).mean()
    hinge_y = torch.relu(1 - torch.sqrt(y.var(0) + 1e-4)).mean()
    covariance = _off_diagonal_squares(x.T @ x / (n - 1)) / d + _off_diagonal_squares(y.T @ y / (n - 1)) / d
    return sim * invariance + std * (hinge_x / 2 + hinge_y / 2) + cov * covariance


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd=0.0051) -> torch.Tensor:
    """facebookresearch/barlowtwins main.py, BarlowTwins.forward (l. 207-221): an affine-free training-mode
    BatchNorm (biased variance, eps 1e-5) on each embedding, the cross-correlation divided by the batch."""

    def bn(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = bn(z1).T @ bn(z2) / len(z1)
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal_squares(c)


def simclr_loss(hidden1: torch.Tensor, hidden2: torch.Tensor, temperature=0.1) -> torch.Tensor:
    """google-research/simclr (tag 1.0) objective.py add_contrastive_loss (l. 38-92) on one core: unit
    vectors, each view's logits against the other view and (self masked) its own, a softmax
    cross-entropy averaged over the batch for each view order, the two *summed*."""
    h1, h2 = F.normalize(hidden1, dim=-1), F.normalize(hidden2, dim=-1)
    n = len(h1)
    masked = torch.eye(n, dtype=h1.dtype) * 1e9
    logits_aa, logits_bb = h1 @ h1.T / temperature - masked, h2 @ h2.T / temperature - masked
    logits_ab, logits_ba = h1 @ h2.T / temperature, h2 @ h1.T / temperature
    labels = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def byol_loss(p1, p2, t1, t2) -> torch.Tensor:
    """deepmind-research/byol byol_experiment.py loss_fn (l. 243-250) with helpers.regression_loss:
    ||p̄ - t̄||² summed over both view orders, averaged over the batch."""
    per_sample = (F.normalize(p1, dim=-1) - F.normalize(t2, dim=-1)).pow(2).sum(-1)
    per_sample = per_sample + (F.normalize(p2, dim=-1) - F.normalize(t1, dim=-1)).pow(2).sum(-1)
    return per_sample.mean()


def swav_sinkhorn(scores: torch.Tensor, epsilon=0.05, iterations=3) -> torch.Tensor:
    """facebookresearch/swav main_swav.py distributed_sinkhorn (l. 354-376) on one process."""
    q = torch.exp(scores / epsilon).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).T


def swav_loss(scores: list[torch.Tensor], code_views=(0, 1), temperature=0.1, epsilon=0.05) -> torch.Tensor:
    """main_swav.py train (l. 289-315): codes of each code view (no gradient), predicted from every
    other view, averaged over the other views and then over the code views."""
    loss = 0.0
    for crop_id in code_views:
        with torch.no_grad():
            q = swav_sinkhorn(scores[crop_id].detach(), epsilon)
        others = [v for v in range(len(scores)) if v != crop_id]
        subloss = 0.0
        for v in others:
            subloss = subloss - (q * F.log_softmax(scores[v] / temperature, dim=1)).sum(1).mean()
        loss = loss + subloss / len(others)
    return loss / len(code_views)


@torch.no_grad()
def lars_first_step(params, lrs, weight_decay, exclude, eta=0.001) -> list[torch.Tensor]:
    """The first LARS update of facebookresearch/vicreg main_vicreg.py (l. 245-299), identical in
    facebookresearch/barlowtwins main.py (l. 224-263) and, as an optax chain, deepmind-research/byol
    utils/optimizers.py: g + wd·w unless excluded, scaled by η ||w|| / ||g + wd·w|| unless excluded
    (1 where a norm is 0), into a zero momentum buffer, times -lr. Returns the new parameters."""
    out = []
    for p, lr, skip in zip(params, lrs, exclude):
        dp = p.grad.clone()
        if not skip:
            dp = dp + weight_decay * p
            w_norm, u_norm = p.norm(), dp.norm()
            if w_norm > 0 and u_norm > 0:
                dp = dp * (eta * w_norm / u_norm)
        mu = torch.zeros_like(p) * 0.9 + dp
        out.append(p - lr * mu)
    return out


@torch.no_grad()
def larc_sgd_first_step(params, lr, weight_decay, trust=0.001, eps=1e-8) -> list[torch.Tensor]:
    """The first step of SwAV's optimizer (main_swav.py l. 171-177): torch SGD (momentum 0.9, weight
    decay wd) wrapped in NVIDIA apex's LARC(trust_coefficient=0.001, clip=False): for every parameter
    with nonzero weight and gradient norms, g <- (g + wd·w) · trust ||w|| / (||g|| + wd ||w|| + eps); the
    SGD then runs with its weight decay switched off. The first SGD momentum buffer is the gradient."""
    out = []
    for p in params:
        g = p.grad.clone()
        w_norm, g_norm = p.norm(), g.norm()
        if w_norm != 0 and g_norm != 0:
            g = (g + weight_decay * p) * (trust * w_norm / (g_norm + w_norm * weight_decay + eps))
        out.append(p - lr * g)
    return out
