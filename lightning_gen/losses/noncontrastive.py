"""Losses of the non-contrastive joint-embedding methods: BYOL, SimSiam, Barlow Twins, VICReg.

None of them uses negatives. BYOL and SimSiam regress one view's prediction onto the other view's
projection under a stop-gradient; Barlow Twins and VICReg instead regularise the statistics of the
embeddings over the batch, and those statistics are taken over the *global* batch: the embeddings
of every rank are gathered with gradient (``gather_with_grad``) and every rank computes the same loss
on the concatenated batch. With the gradient of every rank's copy summed back (VICReg, and Barlow
Twins' ``grad_scale="global"``), DDP's gradient average equals the single-process gradient on that
batch; Barlow Twins' official code keeps each rank's own copy only, which is that gradient divided
by the world size (``grad_scale="official"``, the default). Both are tested on 2 processes.

    BYOL       L = || p̄ - z̄' ||²  = 2 - 2 cos(p, z'),  z' without gradient (x̄ = x / ||x||)
    SimSiam    D(p, z) = -cos(p, stopgrad(z))
    Barlow     C_ij = Σ_b ẑ_bi ẑ'_bj / N  (ẑ: each dimension standardised over the batch)
               L = Σ_i (1 - C_ii)² + λ Σ_i Σ_{j≠i} C_ij²
    VICReg     L = λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')]     (official code)
               L = λ s(Z, Z') + μ [v(Z) + v(Z')] + ν [c(Z) + c(Z')]         (paper, Eq. 6)
               s = mean_{b,j} (z_bj - z'_bj)²,   v = mean_j max(0, γ - sqrt(Var(z_j) + ε)),
               c = Σ_{i≠j} Cov(Z)_ij² / d
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_gen.distributed import gather_with_grad
from lightning_gen.losses.precision import full_precision


@full_precision
def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's mean squared error between L2-normalised prediction and target (Grill et al. 2020):
    ``||p̄ - z̄'||² = 2 - 2 cos(p, z')`` averaged over the batch; the target carries no gradient."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


@full_precision
def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)) averaged over the batch (Chen & He 2021)."""
    return -F.cosine_similarity(prediction, target.detach(), dim=-1).mean()


def _global(z: torch.Tensor, gather: bool, own_grad_only: bool = False) -> torch.Tensor:
    return gather_with_grad(z, own_grad_only) if gather else z


# Barlow Twins' cross-rank gradient. "official": facebookresearch/barlowtwins main.py all-reduces the
# cross-correlation without gradient, so each rank backpropagates only its own samples' share and
# DDP's average makes the step ∇L / world_size (what λ, the learning rates and LARS were tuned with).
# "global": the exact gradient of L on the global batch, the same on 1 and on N processes.
GRAD_SCALES = ("official", "global")
# VICReg's variance term. "official": facebookresearch/vicreg main_vicreg.py averages the two views'
# hinges, [v(Z) + v(Z')] / 2 (the 25/25/1 coefficients were tuned with it); "paper": Eq. (6) sums them.
VARIANCE_REDUCTIONS = ("official", "paper")


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Every column to zero mean and unit (biased) variance over the rows, as an affine-free BatchNorm."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The entries of a square matrix that are not on its diagonal, flattened (row-major order).

    A view, not a boolean mask: ``m[~eye]`` would build a d x d mask (8192² in the ImageNet recipes)
    and make the host wait for the GPU to count its True entries. Dropping the last entry of the
    flattened matrix and reading the rest as (d - 1) rows of d + 1 puts every diagonal entry in the
    first column; the other columns are exactly the off-diagonal entries."""
    d = len(m)
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


@full_precision
def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lambd: float = 0.0051,
    gather: bool = True,
    grad_scale: str = "official",
) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021) on the global batch.

    The cross-correlation is a statistic of the whole batch (each dimension is standardised with
    the batch mean and variance, then correlated across samples), so under DDP it must be computed
    over the samples of every rank, as the paper's multi-GPU implementation does; on a local slice
    it would be a different, noisier matrix. ``grad_scale`` (``GRAD_SCALES``) picks the gradient
    each rank sends back: its own share (``official``, ∇L / world_size after DDP's average) or the
    sum of every rank's (``global``, ∇L). λ = 0.0051 is the official ``main.py`` default (the paper
    writes 5e-3). The matrix is float32 whatever the autocast (``full_precision``): in float16 its
    sums of N products overflow at large batch.
    """
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
    own = grad_scale == "official"
    a, b = standardize(_global(z1, gather, own)), standardize(_global(z2, gather, own))
    c = a.T @ b / len(a)
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diagonal + lambd * off_diagonal(c).pow(2).sum()


@full_precision
def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's v(Z): hinge on the regularised standard deviation of each dimension over the batch."""
    std = torch.sqrt(z.var(0) + eps)
    return F.relu(gamma - std).mean()


@full_precision
def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """VICReg's c(Z): squared off-diagonal entries of the (unbiased) covariance matrix, divided by d."""
    centred = z - z.mean(0)
    cov = centred.T @ centred / (len(z) - 1)
    return off_diagonal(cov).pow(2).sum() / z.shape[1]


@full_precision
def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    gather: bool = True,
    variance_reduction: str = "official",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022) on the global batch; returns the loss and its three terms.

    Variance and covariance are statistics of the batch, so they are taken over the samples of
    every rank (the paper's implementation gathers the embeddings of all GPUs with gradient); the
    invariance term is a per-sample mean, the same whether gathered or not. ``variance_reduction``
    (``VARIANCE_REDUCTIONS``): the official code's mean of the two views' hinges (default) or the
    paper's sum, twice that weight. The covariance matrices are float32 whatever the autocast
    (``full_precision``): in float16 they overflow.
    """
    if variance_reduction not in VARIANCE_REDUCTIONS:
        raise ValueError(
            f"variance_reduction must be one of {VARIANCE_REDUCTIONS}, got {variance_reduction!r}"
        )
    a, b = _global(z1, gather), _global(z2, gather)
    views = 2 if variance_reduction == "official" else 1
    terms = {
        "invariance": F.mse_loss(a, b),
        "variance": (variance_term(a, gamma, eps) + variance_term(b, gamma, eps)) / views,
        "covariance": covariance_term(a) + covariance_term(b),
    }
    loss = (
        invariance_weight * terms["invariance"]
        + variance_weight * terms["variance"]
        + covariance_weight * terms["covariance"]
    )
    return loss, {k: v.detach() for k, v in terms.items()}
