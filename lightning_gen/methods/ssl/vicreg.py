"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce & LeCun 2022).

Two views go through the same network (backbone + "expander" MLP); three terms on the embeddings
Z, Z' (n samples x d dimensions) replace negatives, predictors and momentum networks:

    s(Z, Z') = mean over samples and dimensions of (z - z')²                  invariance
    v(Z)     = 1/d Σ_j max(0, γ - sqrt(Var(z_j) + ε))                       variance (no collapse)
    c(Z)     = 1/d Σ_{i≠j} Cov(Z)_ij²                                        covariance (no redundancy)
    L = λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')]

The variance term is the *mean* of the two views' hinges, as facebookresearch/vicreg ``main_vicreg.py``
computes it (its 25/25/1 coefficients were tuned with that code); the paper's Eq. (6) sums them,
twice the weight: ``variance_reduction: paper``.

DDP: variance and covariance are taken over the **global** batch. They are statistics of the batch
(the paper's implementation gathers the embeddings of all GPUs, with gradient, before computing
them), and a per-rank variance would let each rank's slice collapse differently. Every rank gathers
the embeddings with gradient and computes the same loss; 2 processes give the loss and gradients of
1 process on the concatenated batch (tested). The invariance term is a plain mean over samples.

Published recipe (``conf/method/vicreg.yaml``, the official 1000-epoch command): ResNet-50, a 3-layer
8192-8192-8192 expander, λ = μ = 25, ν = 1, γ = 1, ε = 1e-4, LARS lr 0.2 x B/256 with 10 warm-up
epochs and cosine decay, weight decay 1e-6, batch 2048, 1000 epochs, BYOL's augmentation
(docs/methods/vicreg.md has the line-by-line comparison with the official code).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.config import bounded, choice
from lightning_gen.losses.noncontrastive import vicreg_loss
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.heads import MLPHead
from lightning_gen.registry import register_method


@dataclass
class VICRegConfig(SSLConfig):
    optimizer: str = choice("lars", "adam", "adamw", "sgd", "lars")
    lr: float = 0.2
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    global_bn: bool = True  # BatchNorm over all ranks under DDP, as the paper's implementation (SyncBN)
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 1e-3
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    invariance_weight: float = bounded(25.0, 0)  # λ
    variance_weight: float = bounded(25.0, 0)  # μ
    covariance_weight: float = bounded(1.0, 0)  # ν
    variance_target: float = bounded(1.0, 0, low_open=True)  # γ
    variance_eps: float = bounded(1e-4, 0, low_open=True)  # ε
    # "official": the variance term is the mean of the two views' hinges (main_vicreg.py); "paper": their
    # sum (Eq. 6), twice the weight for the same μ
    variance_reduction: str = choice("official", "official", "paper")


@register_method("vicreg", VICRegConfig)
class VICReg(SSLMethod):
    """VICReg: invariance + variance hinge + covariance decorrelation over the global batch."""

    config_class = VICRegConfig

    def __init__(self, cfg: VICRegConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        self.projector = MLPHead(
            self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bias=False
        )

    def ssl_loss(self, views, batch):
        cfg = self.cfg
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        loss, terms = vicreg_loss(
            self.projector(f1),
            self.projector(f2),
            cfg.invariance_weight,
            cfg.variance_weight,
            cfg.covariance_weight,
            cfg.variance_target,
            cfg.variance_eps,
            variance_reduction=cfg.variance_reduction,
        )
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True)
        return loss, f1
