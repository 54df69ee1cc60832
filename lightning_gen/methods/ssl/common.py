"""Machinery shared by the joint-embedding SSL methods (SimCLR, MoCo, DINO, CPC).

- ``SSLConfig``: backbone + augmentation views on top of ``MethodConfig``.
- ``SSLMethod``: builds the backbone, the on-device ``Views`` and the online probe; its
  ``training_step`` makes the views (from ``batch["image"]``, or from ``batch["views"]``: crops of the
  whole image cut by the data loader as ``crop_specs()`` asks), asks the method for ``ssl_loss(views, batch)`` and adds the
  probe loss on the first view's detached features; validation trains nothing and scores the
  probe on un-augmented images (``val/probe_acc``, the checkpoint monitor).
- Momentum pairs (solo-learn style): a method lists ``(online, momentum)`` module pairs; after
  every *optimizer* step (so gradient accumulation is respected) the momentum copies move by
  τ, a cosine from ``momentum_start`` to ``momentum_end`` over the planned optimizer steps: a pure
  function of training progress (``schedules.training_progress``), so a resumed run uses exactly
  the τ an uninterrupted run uses, on the same allocation or another.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_gen import schedules
from lightning_gen.config import bounded
from lightning_gen.data.crops import CropSpec
from lightning_gen.data.views import Views, ViewsConfig
from lightning_gen.methods.base import Method, MethodConfig, ema_update
from lightning_gen.nets.backbones import BackboneConfig, build_backbone
from lightning_gen.nets.norm import GlobalBatchNorm, convert_batchnorm


@dataclass
class SSLConfig(MethodConfig):
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    # BatchNorm statistics over the batch of all ranks under DDP (SimCLR's global BN, MoCo v3's SyncBN);
    # no effect on one process
    global_bn: bool = False
    momentum_start: float = bounded(
        0.99, 0, 1
    )  # τ of momentum networks at step 0 (unused by methods without one)
    momentum_end: float = bounded(
        1.0, 0, 1
    )  # τ at the last planned step (cosine in between); = start for a constant τ


class SSLMethod(Method):
    """Base of the SSL methods: backbone, views, online probe, momentum pairs. Not registered itself."""

    monitor = ("val/probe_acc", "max")
    embed_value_range = "standard"

    def __init__(self, cfg: SSLConfig, data=None):
        super().__init__(cfg, data)
        info = self.data_info
        self.backbone = build_backbone(self.cfg.backbone, info.channels, info.image_size)
        self.views = Views(self.cfg.views, info.mean, info.std, info.image_size)
        self.feature_dim = self.backbone.out_dim
        self.setup_online_probe(self.feature_dim)

    # ------------------------------------------------------------------ what a method writes
    def ssl_loss(
        self, views: list[torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, backbone features of views[0]) for one batch. Log extra metrics here."""
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum copy) pairs moved by τ after every optimizer step."""
        return []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.cfg.global_bn and self.world_size > 1:
            for name, child in self.named_children():
                if name != "online_probe":  # the probe sees detached features; it has no BatchNorm anyway
                    convert_batchnorm(child, GlobalBatchNorm)

    # ------------------------------------------------------------------ shared steps
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def encode_by_size(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features of each view; consecutive views of one size go through as one batch
        (one forward per resolution, and BatchNorm statistics over all of them, as the papers do)."""
        features: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features += list(self.backbone(torch.cat(views[start:end])).chunk(end - start))
            start = end
        return features

    def make_views(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # "views": crops of the whole original image cut by the data loader (image folders, shards);
        # otherwise every view is cut here from the in-memory image.
        images = batch["views"] if "views" in batch else batch["image"]
        return self.views(images, channels_last=self._use_channels_last())

    def crop_specs(self) -> list[CropSpec]:
        """The random resized crops a data loader that decodes per item cuts for each view."""
        return self.views.crop_specs()

    def training_step(self, batch, batch_idx):
        loss, features = self.ssl_loss(self.make_views(batch), batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss + self.probe_loss(features, batch["label"], "train")

    def validation_step(self, batch, batch_idx):
        features = self.embed(self.to_float(batch["image"], "standard"))
        self.probe_loss(features, batch["label"], "val")

    @torch.no_grad()
    def images_for_logging(self, batch):
        views = self.views(batch["image"][:16])
        shown = {"input": self.to_float(batch["image"][:16], "unit")}
        for i, v in enumerate(views[: self.views.num_global]):
            shown[f"view{i}"] = self.views.unnormalize(v)
        return shown

    # ------------------------------------------------------------------ momentum networks
    @staticmethod
    def momentum_copy(module: nn.Module) -> nn.Module:
        """A frozen copy that starts equal to ``module`` (θ_k = θ_q at initialisation)."""
        twin = copy.deepcopy(module)
        for p in twin.parameters():
            p.requires_grad = False
        return twin

    def momentum_at(self, progress: schedules.Progress) -> float:
        return schedules.cosine(progress.step, progress.total, self.cfg.momentum_start, self.cfg.momentum_end)

    def optimizer_step(self, *args, **kwargs):
        # Called once per real optimizer step (not per accumulated micro-batch); the progress is that
        # of this update, the same in an uninterrupted and a resumed run.
        super().optimizer_step(*args, **kwargs)
        pairs = self.momentum_pairs()
        if pairs:
            tau = self.momentum_at(self.progress())
            for online, target in pairs:
                ema_update(target, online, tau)
            self.log_value("train/momentum", tau, on_step=True, on_epoch=False)
