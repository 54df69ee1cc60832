"""Supervised baseline: the backbone and a linear classifier trained end to end on the labels.

    L = CE(W f(x~) + b, y),   x~ a random resized crop (+ flip) of x

Not a self-supervised method: it is the ceiling the SSL linear probes are read against. It shares the
SSL methods' backbone, on-device views and online probe (``methods/ssl/common.py``), so a
``supervised_<data>`` experiment is the same network with the same augmentation pipeline, trained on
what the probes are scored on. ``embed`` is the backbone feature (evaluated like any SSL encoder); the
classifier's own accuracy is ``val/acc``, the checkpoint monitor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import bounded
from lightning_gen.losses.classification import labeled_cross_entropy
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.registry import register_method


@dataclass
class SupervisedConfig(SSLConfig):
    label_smoothing: float = bounded(0.0, 0, 1, high_open=True)


@register_method("supervised", SupervisedConfig)
class Supervised(SSLMethod):
    """Supervised baseline: backbone + linear classifier by cross-entropy on augmented labeled images."""

    config_class = SupervisedConfig
    monitor = ("val/acc", "max")

    def __init__(self, cfg: SupervisedConfig, data=None):
        super().__init__(cfg, data)
        self.classifier = nn.Linear(self.feature_dim, self.data_info.num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of float images as produced by ``to_float(..., "standard")``."""
        return self.classifier(self.backbone(x))

    def ssl_loss(self, views, batch):
        features = self.backbone(views[0])
        logits = self.classifier(features)
        loss, accuracy = labeled_cross_entropy(logits, batch["label"], self.cfg.label_smoothing)
        self.log("train/acc", accuracy)
        return loss, features

    def validation_step(self, batch, batch_idx):
        features = self.embed(self.to_float(batch["image"], "standard"))
        logits = self.classifier(features)
        self.log(
            "val/acc", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True, sync_dist=True
        )
        self.log("val/loss", F.cross_entropy(logits.float(), batch["label"]), sync_dist=True)
        self.probe_loss(features, batch["label"], "val")
