"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020).

An online network (encoder f_θ, projector g_θ, predictor q_θ) learns to predict the projection that a
slowly moving target network (f_ξ, g_ξ: an exponential moving average of the online ones) makes of
another view of the same image. No negatives: the predictor and the moving target keep the
representation from collapsing.

    z_θ = g_θ(f_θ(v)),  z'_ξ = g_ξ(f_ξ(v'))  (no gradient)
    L = ||q̄_θ(z_θ) - z̄'_ξ||² + (the same with v and v' swapped),   x̄ = x / ||x||  (= 2 - 2 cos)
    ξ <- τ ξ + (1 - τ) θ   after every optimizer step,  τ = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2

τ goes from τ_base = 0.996 at step 0 to 1 at the last step K: the shared momentum-pair machinery's
cosine from ``momentum_start`` to ``momentum_end`` over the planned optimizer steps, a pure function
of training progress (so gradient accumulation counts updates and a resumed run uses the same τ). Published recipe (``conf/method/byol.yaml``): ResNet-50, 4096-256 projector and
predictor MLPs (Linear-BN-ReLU-Linear, the output layer without bias), LARS lr 0.2 x B/256 with 10
warm-up epochs and cosine decay, weight decay 1.5e-6 (biases and BN excluded from decay and LARS),
BYOL's asymmetric augmentation pair: deepmind-research/byol ``configs/byol.py`` for 1000 epochs. Under DDP the
BatchNorm statistics are those of all ranks (``global_bn``, the paper's cross-replica BN); the loss
is a per-sample mean, so nothing else crosses ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.config import choice
from lightning_gen.losses.noncontrastive import byol_regression
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.heads import MLPHead
from lightning_gen.registry import register_method


@dataclass
class BYOLConfig(SSLConfig):
    optimizer: str = choice("lars", "adam", "adamw", "sgd", "lars")
    lr: float = 0.2
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    global_bn: bool = True  # BatchNorm over all ranks under DDP, as the paper (cross-replica BN)
    weight_decay: float = 1.5e-6
    warmup_epochs: float = 10.0
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum_start: float = 0.996  # τ_base
    momentum_end: float = 1.0


@register_method("byol", BYOLConfig)
class BYOL(SSLMethod):
    """BYOL: online predictor regresses a momentum target's projection of another view (no negatives)."""

    config_class = BYOLConfig

    def __init__(self, cfg: BYOLConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        # byol/utils/networks.py's MLP: linear, BN, ReLU, then a linear layer *without* bias
        self.projector = MLPHead(
            self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=2, last_bias=False
        )
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2, last_bias=False)
        self.target_backbone = self.momentum_copy(self.backbone)
        self.target_projector = self.momentum_copy(self.projector)

    def frozen_module_names(self) -> set[str]:
        return {"target_backbone", "target_projector"}

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def ssl_loss(self, views, batch):
        v1, v2 = views[0], views[1]
        f1, f2 = self.backbone(v1), self.backbone(v2)
        p1, p2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        with torch.no_grad():
            target1 = self.target_projector(self.target_backbone(v1))
            target2 = self.target_projector(self.target_backbone(v2))
        # each view's prediction regresses the target's projection of the *other* view (symmetrised)
        loss = byol_regression(p1, target2) + byol_regression(p2, target1)
        return loss, f1
