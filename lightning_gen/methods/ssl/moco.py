"""MoCo v1/v2/v3 (He et al. 2020; Chen et al. 2020; Chen, Xie, He 2021), one class.

``version`` picks the paper (``conf/method/moco_v1.yaml``, ``moco_v2.yaml``, ``moco_v3.yaml``):

- v1: linear head to C = 128, queue of K keys, τ = 0.07, m = 0.999, MoCo v1 augmentation, the LR
  stepped down x0.1 at 60 % and 80 % of training.
- v2: v1 with a 2-layer MLP head (2048 hidden), τ = 0.2, blur ("aug+") and a cosine LR.
  Both decay every parameter (SGD over ``model.parameters()``) of a ResNet built without zero-initialised
  residual BNs (torchvision's default), as facebookresearch/moco ``main_moco.py`` does.
- v3: no queue; projector (2 layers for ResNets, 3 for ViTs, affine-free BN on its output) and a
  2-layer predictor that ends in the same BN for ViTs and in a plain linear layer for ResNets; no
  linear layer has a bias, as facebookresearch/moco-v3 ``moco/builder.py`` builds them; symmetric loss
  over in-batch keys gathered from all ranks, τ = 1.0 (ResNet) / 0.2 (ViT), m cosine 0.99 -> 1;
  BatchNorm over the global batch under DDP (``global_bn``, the paper's SyncBN).

    q = normalize(g_q(f_q(x_q))),  k = normalize(g_k(f_k(x_k))) (no gradient)
    L = CE([q·k, q·queue] / τ, 0)                                  (v1, v2)
    L = 2τ [CE(q1 K2ᵀ/τ, own) + CE(q2 K1ᵀ/τ, own)]                 (v3, K = keys of all ranks)
    θ_k <- m θ_k + (1 - m) θ_q   for the key encoder *and* the key head

The queue is a buffer (in every checkpoint), filled with the keys of all ranks in rank order, so
it is identical everywhere (DDP does not re-broadcast it; its equality is checked across ranks at
every epoch end).

Shuffle-BN (v1/v2, ``shuffle_bn``): a key must not be normalised with the same samples as its
query, or BatchNorm statistics tell the query which key is its positive. Under DDP the key batch
is shuffled across ranks (each rank's BN sees a random mix). On one device BatchNorm in both
encoders runs over ``bn_splits`` sub-batches (as if on that many GPUs, the official single-GPU
demo's SplitBatchNorm), and the keys are dealt to sub-batches so that every key sub-batch mixes
samples of several query sub-batches: ``split_shuffle``. The alternative is SyncBN
(``trainer.sync_batchnorm=true``), never both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import bounded, choice
from lightning_gen.distributed import batch_shuffle, batch_unshuffle, gather_no_grad, is_distributed
from lightning_gen.losses.contrastive import KeyQueue, info_nce, moco_loss
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.backbones import BackboneConfig
from lightning_gen.nets.heads import MLPHead
from lightning_gen.nets.norm import SplitBatchNorm, convert_batchnorm, set_batchnorm_splits
from lightning_gen.registry import register_method


def _torchvision_resnet() -> BackboneConfig:
    return BackboneConfig(zero_init_residual=False)  # main_moco.py's models.__dict__[arch](num_classes=dim)


@dataclass
class MoCoConfig(SSLConfig):
    version: str = choice("v2", "v1", "v2", "v3")
    backbone: BackboneConfig = field(default_factory=_torchvision_resnet)
    optimizer: str = choice("sgd", "adam", "adamw", "sgd", "lars")
    lr: float = 0.03
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    weight_decay: float = 1e-4
    exclude_bias_norm: bool = False  # v1/v2: SGD decays every parameter (v3's LARS: set true)
    temperature: float = bounded(0.2, 0, low_open=True)
    queue_size: int = 65536  # K (v1/v2)
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    pred_hidden_dim: int = 4096  # v3 predictor
    proj_layers: int | None = None  # v3 projector depth; None: 2 for ResNets and conv nets, 3 for ViTs
    momentum_start: float = 0.999
    momentum_end: float = 0.999
    shuffle_bn: bool = True  # v1/v2 key encoder; mutually exclusive with trainer.sync_batchnorm
    bn_splits: int = 8  # shuffle-BN on one device: BatchNorm over this many sub-batches (as on 8 GPUs)
    # v3 with a ViT: keep the random patch projection fixed (the paper's fix for training instability)
    freeze_patch_embed: bool = False


@register_method("moco", MoCoConfig)
class MoCo(SSLMethod):
    """MoCo v1/v2 (momentum key encoder + queue) and v3 (symmetric, predictor, no queue)."""

    config_class = MoCoConfig

    def __init__(self, cfg: MoCoConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        d = self.feature_dim
        if cfg.version == "v1":
            self.projector = MLPHead(d, cfg.proj_hidden_dim, cfg.proj_dim, layers=1)
        elif cfg.version == "v2":
            self.projector = MLPHead(d, cfg.proj_hidden_dim, cfg.proj_dim, layers=2, bn=False)
        else:
            vit = cfg.backbone.name == "vit"
            layers = cfg.proj_layers or (3 if vit else 2)
            self.projector = MLPHead(d, cfg.proj_hidden_dim, cfg.proj_dim, layers=layers, last_bn=True)
            # MoCo_ViT builds its predictor with the default last_bn=True, MoCo_ResNet with last_bn=False
            self.predictor = MLPHead(
                cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2, last_bn=vit, last_bias=False
            )
        if cfg.freeze_patch_embed:
            if not hasattr(self.backbone, "patch_embed"):
                raise ValueError(
                    "method.freeze_patch_embed=true needs a ViT backbone (method.backbone.name=vit); "
                    f"this one is {cfg.backbone.name!r}"
                )
            self.backbone.patch_embed.requires_grad_(False)  # the optimizer never sees it
        self.backbone_k = self.momentum_copy(self.backbone)
        self.projector_k = self.momentum_copy(self.projector)
        if self.uses_queue:
            self.queue = KeyQueue(cfg.queue_size, cfg.proj_dim)

    @property
    def uses_queue(self) -> bool:
        return self.cfg.version in ("v1", "v2")

    @property
    def split_bn(self) -> bool:
        """Whether shuffle-BN is emulated on one device with sub-batch BatchNorm."""
        return self.uses_queue and self.cfg.shuffle_bn and self.cfg.bn_splits > 1 and self.world_size == 1

    def buffers_identical_on_all_ranks(self) -> list[str]:
        return ["queue.keys", "queue.ptr"] if self.uses_queue else []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.split_bn:  # same sub-batch BatchNorm in both encoders, as the official single-GPU demo
            for net in (self.backbone, self.projector, self.backbone_k, self.projector_k):
                convert_batchnorm(net, SplitBatchNorm)
                set_batchnorm_splits(net, self.cfg.bn_splits)

    def frozen_module_names(self) -> set[str]:
        return {"backbone_k", "projector_k", "queue"}

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_k), (self.projector, self.projector_k)]

    def on_fit_start(self) -> None:
        # Lightning only converts BN to SyncBN with >1 process, so the requested flag is checked too.
        connector = getattr(self.trainer, "_accelerator_connector", None)
        requested = getattr(connector, "_layer_sync", None) is not None
        synced = requested or any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
        if self.uses_queue and self.cfg.shuffle_bn and synced:
            raise ValueError(
                "MoCo: shuffle-BN (method.shuffle_bn=true) and SyncBN (trainer.sync_batchnorm=true) are both"
                " on; they are alternatives: set method.shuffle_bn=false or trainer.sync_batchnorm=false"
            )

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.uses_queue and self.cfg.shuffle_bn):
            return self.projector_k(self.backbone_k(x))
        if is_distributed():
            x, perm = batch_shuffle(x)
            return batch_unshuffle(self.projector_k(self.backbone_k(x)), perm)
        if not self.split_bn:
            return self.projector_k(self.backbone_k(x))
        position = split_shuffle(len(x), self.set_splits(len(x)), x.device)
        return self.projector_k(self.backbone_k(x[torch.argsort(position)]))[position]

    def set_splits(self, batch: int) -> int:
        """Sub-batches of BatchNorm in both encoders for this batch size (one-device shuffle-BN)."""
        splits = usable_splits(batch, self.cfg.bn_splits)
        for net in (self.backbone, self.projector, self.backbone_k, self.projector_k):
            set_batchnorm_splits(net, splits)
        return splits

    def ssl_loss(self, views, batch):
        if self.uses_queue:
            if self.split_bn:
                self.set_splits(len(views[0]))
            features = self.backbone(views[0])
            q, k = self.projector(features), self.keys(views[1])
            loss, logits = moco_loss(q, k, self.queue.keys.clone(), self.cfg.temperature)
            self.queue.enqueue(F.normalize(k.float(), dim=1))
            self.log(
                "train/contrast_acc", (logits.argmax(1) == 0).float().mean(), on_step=True, on_epoch=True
            )
            return loss, features
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        q1, q2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        k1, k2 = self.keys(views[0]), self.keys(views[1])
        loss = self.symmetric_contrast(q1, k2) + self.symmetric_contrast(q2, k1)
        return loss, f1

    def symmetric_contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """MoCo v3's ctr(q, k): in-batch keys of all ranks, own key positive, scaled by 2τ."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        return info_nce(q, k, self.cfg.temperature) * 2 * self.cfg.temperature

    def on_train_epoch_end(self) -> None:
        # The queue must be the same dictionary on every rank; a cheap fingerprint catches any drift.
        if self.uses_queue and is_distributed():
            fingerprint = torch.stack([self.queue.keys.double().sum(), self.queue.ptr.double()]).view(1, 2)
            seen = gather_no_grad(fingerprint)
            if not torch.equal(seen, seen[:1].expand_as(seen)):
                raise RuntimeError(f"MoCo queue differs between ranks (sum, ptr per rank: {seen.tolist()})")


def usable_splits(n: int, splits: int) -> int:
    """The largest number of sub-batches <= ``splits`` that divides ``n`` into sub-batches of >= 2 samples."""
    return max((g for g in range(1, splits + 1) if n % g == 0 and n // g >= 2), default=1)


def split_shuffle(n: int, splits: int, device=None) -> torch.Tensor:
    """Where each sample's key goes in the key batch: ``position[i]``, for sub-batch BatchNorm.

    Sub-batch g of a batch is samples {i : i % splits == g} (``SplitBatchNorm``). Sample i sits in
    query sub-batch g = i % splits at offset o = i // splits; its offset is shuffled within the
    sub-batch (o -> o'), and its key is placed at position o' * splits + (g + o') % splits. Key
    sub-batch h then holds, for every offset o', the sample of query sub-batch (h - o') mod splits:
    it draws from min(n / splits, splits) different query sub-batches, so (with >= 2 samples per
    sub-batch) no key is normalised with the same samples as its own query.
    """
    g = torch.arange(n, device=device) % splits
    offsets = n // splits
    shuffled = torch.empty(n, dtype=torch.long, device=device)
    for group in range(splits):  # o -> o': a random permutation of the offsets within each query sub-batch
        members = torch.arange(group, n, splits, device=device)  # {i : i % splits == group}
        shuffled[members] = torch.randperm(offsets, device=device)
    return shuffled * splits + (g + shuffled) % splits
