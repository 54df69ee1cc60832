"""SimCLR (Chen et al. 2020): NT-Xent between augmented views, through a projection head.

    h = f(x~),  z = g(h),  L = Σ_views mean over the view's anchors of NT-Xent(z; τ), all ranks' views

f is the backbone (the representation used downstream), g the projection MLP that is thrown
away: linear-BN-ReLU then linear-BN, the output BN with a learned scale and no shift, as the official
code's ``projection_head`` (``center=False``). Positives are found by sample index, so ``views.global_crops.n`` > 2 and local crops
(multi-crop) use the same loss, and ``supervised=true`` turns it into supervised contrastive
learning (Khosla et al. 2020) by using class labels as the index. The published recipe uses
LARS (bias/norm excluded from weight decay and from the trust ratio) with lr = 0.3 x B/256 for the
*global* batch B (devices x nodes x per-device batch x accumulation): see ``conf/method/simclr.yaml``.
Views of the same size go through the encoder as one batch, and under DDP BatchNorm statistics are
those of all ranks (``global_bn``): the paper's global BN over the 2B views of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.config import bounded, choice
from lightning_gen.losses.contrastive import nt_xent
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.heads import MLPHead
from lightning_gen.registry import register_method


@dataclass
class SimCLRConfig(SSLConfig):
    optimizer: str = choice("lars", "adam", "adamw", "sgd", "lars")
    lr: float = 0.3
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0
    temperature: float = bounded(0.1, 0, low_open=True)
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2
    supervised: bool = (
        False  # labels as the index: supervised contrastive (unlabeled samples use their own index)
    )
    # "sum": the loss of each view's anchors (a mean over them) summed over the views, as the official code
    # adds loss_a + loss_b; "mean": the mean over every anchor, 1 / views of that
    view_reduction: str = choice("sum", "sum", "mean")
    global_bn: bool = True


@register_method("simclr", SimCLRConfig)
class SimCLR(SSLMethod):
    """SimCLR: NT-Xent over augmented views (multi-crop and supervised contrastive by sample index)."""

    config_class = SimCLRConfig

    def __init__(self, cfg: SimCLRConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        # google-research/simclr model_util.projection_head: every layer linear + BN, the last BN with a scale
        # and no shift (center=False) and no ReLU
        self.projector = MLPHead(
            self.feature_dim,
            cfg.proj_hidden_dim,
            cfg.proj_dim,
            layers=cfg.proj_layers,
            last_bn=True,
            last_bn_scale=True,
        )

    def positive_ids(self, batch) -> torch.Tensor:
        if not self.cfg.supervised:
            return batch["index"]
        # Unlabeled samples (-1) keep a unique id of their own: only their other views are positives.
        return torch.where(batch["label"] >= 0, batch["label"], -1 - batch["index"])

    def ssl_loss(self, views, batch):
        features = torch.cat(self.encode_by_size(views))
        z = self.projector(features)
        ids = self.positive_ids(batch).repeat(len(views))
        loss = nt_xent(z, ids, self.cfg.temperature)
        if self.cfg.view_reduction == "sum":  # objective.py: loss_a + loss_b, each a mean over its views
            loss = loss * len(views)
        return loss, features[: len(views[0])]
