"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al. 2021).

Two views go through the same network (backbone + projector); the cross-correlation matrix of their
embeddings, computed along the batch, is pushed towards the identity: the diagonal to 1 (each
dimension invariant to the augmentation), the off-diagonal to 0 (dimensions decorrelated, so the
embedding cannot collapse to a few directions). No negatives, no predictor, no momentum network.

    C_ij = Σ_b ẑ^A_bi ẑ^B_bj / N   (ẑ: every dimension standardised over the batch)
    L = Σ_i (1 - C_ii)² + λ Σ_i Σ_{j≠i} C_ij²

DDP: C is computed over the **global** batch. It is a statistic of the batch, and the paper's
implementation correlates over all GPUs (cross-correlation summed over devices, batch statistics
synchronised), so the embeddings of every rank are gathered with gradient and every rank computes
the same C. The official code all-reduces C *without* gradient: each rank backpropagates its own
samples' share and DDP's average makes the step ∇L / world_size, the scale the recipe was tuned
with at 16 GPUs (``grad_scale: official``, the default). ``grad_scale: global`` sends back every
rank's share: the exact ∇L of the global batch, the same step on 1 and on N processes. Both are tested
on 2 processes (the loss is the same; the gradients are 1/2 of, and equal to, those of 1 process).

Published recipe (``conf/method/barlow_twins.yaml``, facebookresearch/barlowtwins ``main.py`` defaults,
its README's command): ResNet-50, a 3-layer 8192-8192-8192 projector, λ = 0.0051, LARS with lr 0.2 for
the weights and 0.0048 for biases and BN parameters (both x B/256), 10 warm-up epochs then cosine decay
by a factor 1000, weight decay 1e-6 (the paper writes λ = 5e-3 and 1.5e-6; the code is what trained the
published model), batch 2048, 1000 epochs, BYOL's augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.config import bounded, choice
from lightning_gen.losses.noncontrastive import barlow_twins_loss
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.heads import MLPHead
from lightning_gen.registry import register_method


@dataclass
class BarlowTwinsConfig(SSLConfig):
    optimizer: str = choice("lars", "adam", "adamw", "sgd", "lars")
    lr: float = 0.2  # weights
    bias_lr: float = 0.0048  # biases and norm parameters (same scaling with the batch as lr)
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    global_bn: bool = True  # BatchNorm over all ranks under DDP, as the paper's implementation (SyncBN)
    weight_decay: float = 1e-6  # main.py's default (the paper writes 1.5e-6)
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 1e-3
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    lambd: float = bounded(
        0.0051, 0
    )  # weight of the off-diagonal (redundancy reduction) term; main.py's default
    # gradient under DDP: "official" each rank's own share (∇L / world_size, main.py's all-reduce without
    # gradient), "global" the exact ∇L of the global batch
    grad_scale: str = choice("official", "official", "global")


@register_method("barlow_twins", BarlowTwinsConfig)
class BarlowTwins(SSLMethod):
    """Barlow Twins: cross-correlation of two views' embeddings over the global batch pushed to the identity."""

    config_class = BarlowTwinsConfig

    def __init__(self, cfg: BarlowTwinsConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        self.projector = MLPHead(
            self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bias=False
        )

    def parameter_groups(self, modules, lr, weight_decay):
        groups = super().parameter_groups(modules, lr, weight_decay)
        for group in groups:
            if group.get("exclude_lars"):  # the biases and norm parameters
                group["base_lr"] = lr * self.cfg.bias_lr / self.cfg.lr
        return groups

    def ssl_loss(self, views, batch):
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        loss = barlow_twins_loss(
            self.projector(f1), self.projector(f2), self.cfg.lambd, grad_scale=self.cfg.grad_scale
        )
        return loss, f1
