"""Rotation prediction, RotNet (Gidaris et al. 2018).

A network can tell which way up an image is only if it knows what the object in it looks like
upright. Every image of the batch is shown at 0, 90, 180 and 270 degrees (the paper found feeding
all four rotations together works best) and the network solves the 4-way classification

    L = -1/4N sum_i sum_k log p_theta(k | rot(x_i, k x 90deg)).

The representation is the backbone's pooled feature of the upright image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.methods.ssl.pretext import (
    PretextConfig,
    PretextMethod,
    classifier_head,
    cross_entropy_with_accuracy,
    rotate_all,
)
from lightning_gen.nets.backbones import build_backbone
from lightning_gen.registry import register_method


@dataclass
class RotationConfig(PretextConfig):
    head_hidden: int = 0  # 0: a linear 4-way classifier on the backbone feature, as in RotNet


@register_method("rotation", RotationConfig)
class Rotation(PretextMethod):
    """RotNet: predict which of 4 rotations (0/90/180/270 deg) was applied; all 4 of every image per batch."""

    config_class = RotationConfig

    def __init__(self, cfg: RotationConfig, data=None):
        super().__init__(cfg, data)
        info = self.data_info
        self.backbone = build_backbone(self.cfg.backbone, info.channels, info.image_size)
        self.head = classifier_head(self.backbone.out_dim, 4, self.cfg.head_hidden)
        self.setup_online_probe(self.backbone.out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def pretext_loss(self, x, stage):
        rotated, labels = rotate_all(x)
        return cross_entropy_with_accuracy(self.head(self.backbone(rotated)), labels)
