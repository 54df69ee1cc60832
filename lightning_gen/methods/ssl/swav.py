"""SwAV: Swapping Assignments between Views (Caron et al. 2020).

Online clustering instead of pairwise comparison: the embeddings z = normalize(g(f(x))) of every
crop are scored against K learnable unit-norm prototypes c_k; the scores of the two global crops
are turned into codes q by Sinkhorn-Knopp (an equal partition of the batch among the prototypes);
each crop then predicts the code of every *other* crop:

    s_v = z_v · C  (cosine scores),    q_a = SinkhornKnopp(s_a; ε, 3 iterations)  (no gradient)
    L = 1/|A| Σ_{a ∈ global crops} 1/(V-1) Σ_{v ≠ a} -Σ_k q_a,k log softmax(s_v / τ)_k

Multi-crop: 2 global crops give codes, the low-resolution local crops only predict them. Training
details, all as in the paper:

- **Global batch.** The equal-partition constraint holds over the samples of every rank (the
  prototype marginals are all-reduced inside Sinkhorn-Knopp), as the paper's implementation does.
- **Queue.** With small batches the codes are computed over the batch *and* the embeddings of recent
  batches (``queue_size``, stored per code view); it starts at epoch ``queue_start_epoch`` and is used
  once full. It is identical on every rank (each rank enqueues the gathered embeddings of all ranks),
  lives in checkpoints, and each rank contributes a disjoint share of its rows to Sinkhorn-Knopp.
- **Prototypes** are re-normalised to unit norm after every optimizer step (and at initialisation),
  and receive no update during the first ``freeze_prototypes_epochs`` (a stability trick).
- **Optimizer**: SGD wrapped in apex's LARC (``optimizer: larc``), which decays and adapts *every*
  parameter, biases, BatchNorm and prototypes included (``exclude_bias_norm: false``), and a ResNet
  without zero-initialised residual BNs, as facebookresearch/swav ``main_swav.py`` and ``src/resnet50.py``.

Published recipe (``conf/method/swav.yaml``): facebookresearch/swav's ``swav_200ep_bs256_pretrain.sh``,
the batch-256 ImageNet setting: ResNet-50, 2048-128 projection MLP, K = 3000, τ = 0.1, ε = 0.05,
2 x 224 + 6 x 96 crops, queue of 3840 from epoch 15, LARC lr 0.6 x B/256 decayed (cosine) to 1/1000,
weight decay 1e-6, prototypes frozen for the first epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.distributed import gather_no_grad, is_distributed
from lightning_gen.losses.precision import LOW_PRECISION
from lightning_gen.losses.swav import FeatureQueue, assign_codes, swapped_prediction_loss
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.backbones import BackboneConfig
from lightning_gen.nets.heads import MLPHead
from lightning_gen.registry import register_method


def _swav_resnet() -> BackboneConfig:
    return BackboneConfig(zero_init_residual=False)  # src/resnet50.py's default, which main_swav.py keeps


@dataclass
class SwAVConfig(SSLConfig):
    backbone: BackboneConfig = field(default_factory=_swav_resnet)
    # SGD inside apex's LARC (trust 0.001, clip=False), over every parameter
    optimizer: str = choice("larc", "adam", "adamw", "sgd", "lars", "larc")
    exclude_bias_norm: bool = False  # main_swav.py decays and adapts biases, BatchNorm and prototypes too
    lr: float = 0.6
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    global_bn: bool = True  # BatchNorm over all ranks under DDP, as the paper's implementation (SyncBN)
    weight_decay: float = 1e-6
    min_lr_ratio: float = 1e-3
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    num_prototypes: int = 3000  # K
    temperature: float = bounded(0.1, 0, low_open=True)  # τ
    sinkhorn_epsilon: float = bounded(0.05, 0, low_open=True)  # ε
    sinkhorn_iterations: int = 3
    queue_size: int = 3840  # embeddings kept per code view; 0 disables the queue
    queue_start_epoch: int = 15
    freeze_prototypes_epochs: float = 1.0


@register_method("swav", SwAVConfig)
class SwAV(SSLMethod):
    """SwAV: swapped prediction of Sinkhorn-Knopp cluster codes between multi-crop views."""

    config_class = SwAVConfig

    def __init__(self, cfg: SwAVConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        if self.views.num_global < 2:
            raise ConfigError("SwAV needs at least 2 global crops: set method.views.global_crops.n >= 2")
        self.projector = MLPHead(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        if cfg.queue_size > 0:
            self.queue = FeatureQueue(self.views.num_global, cfg.queue_size, cfg.proj_dim)

    def frozen_module_names(self) -> set[str]:
        return {"queue"}

    def buffers_identical_on_all_ranks(self) -> list[str]:
        return ["queue.features", "queue.filled"] if self.cfg.queue_size > 0 else []  # gathered pushes

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def embed_views(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Unit-norm embeddings of every view, and the backbone features of the first global crop.
        Crops of one resolution go through the network together (one forward per crop size)."""
        features = self.encode_by_size(views)
        z = self.projector(torch.cat(features))
        z = F.normalize(z.float() if z.dtype in LOW_PRECISION else z, dim=1)  # float32 under autocast
        return list(z.chunk(len(views))), features[0]

    def queue_in_use(self) -> bool:
        return self.cfg.queue_size > 0 and self.current_epoch >= self.cfg.queue_start_epoch

    def ssl_loss(self, views, batch):
        cfg, n_code = self.cfg, self.views.num_global
        embeddings, features = self.embed_views(views)
        scores = [self.prototypes(z) for z in embeddings]
        use_queue = self.queue_in_use() and self.queue.full
        codes = []
        for a in range(n_code):
            queue_scores = self.prototypes(self.queue.local_rows(a)).detach() if use_queue else None
            codes.append(
                assign_codes(scores[a].detach(), queue_scores, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations)
            )
        loss = swapped_prediction_loss(scores, codes, cfg.temperature)
        if self.queue_in_use():
            # filled after use, so the current batch is never in its own queue rows
            self.queue.push(embeddings[:n_code])
        self.log_value("train/queue_used", float(use_queue), on_step=True, on_epoch=False)
        return loss, features

    def prototypes_frozen(self) -> bool:
        progress = self.progress()
        return progress.step < progress.steps(self.cfg.freeze_prototypes_epochs)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.prototypes_frozen():
            self.prototypes.weight.grad = None  # skipped by the optimizer: no update, no decay

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.normalize_prototypes()

    def on_train_epoch_end(self) -> None:
        # The queue must be the same on every rank; a cheap fingerprint catches any drift.
        if self.cfg.queue_size > 0 and is_distributed():
            fingerprint = torch.stack([self.queue.features.double().sum(), self.queue.filled.double()])
            seen = gather_no_grad(fingerprint.view(1, 2))
            if not torch.equal(seen, seen[:1].expand_as(seen)):
                raise RuntimeError(
                    f"SwAV queue differs between ranks (sum, filled per rank: {seen.tolist()})"
                )
