"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He 2021).

BYOL without the momentum encoder: one encoder f (backbone + projection MLP) for both views, a
prediction MLP h on one side and a stop-gradient on the other. The stop-gradient is what prevents
collapse (the paper shows the loss collapses to -1 without it).

    z_1 = f(x_1),  z_2 = f(x_2),  p_1 = h(z_1),  p_2 = h(z_2)
    L = ½ D(p_1, stopgrad(z_2)) + ½ D(p_2, stopgrad(z_1)),   D(p, z) = -p·z / (||p|| ||z||)

Published recipe (``conf/method/simsiam.yaml``, the paper's ImageNet setting): ResNet-50, a 3-layer
projection MLP (2048-d, BN on every layer including the output), a 2-layer predictor with a 512-d
bottleneck, SGD (momentum 0.9) lr 0.05 x B/256 with cosine decay and no warm-up, weight decay 1e-4,
batch 512, MoCo v2's augmentation. The predictor's learning rate is *not* decayed (``fix_predictor_lr``,
the paper's best variant in its predictor ablation); it keeps lr x B/256 throughout. Weight decay applies
to every parameter, biases and BatchNorm included, as facebookresearch/simsiam ``main_simsiam.py``'s SGD. Under DDP the
BatchNorm statistics are those of all ranks (``global_bn``, the paper's SyncBN); the loss is a
per-sample mean, so nothing else crosses ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.config import choice
from lightning_gen.losses.noncontrastive import negative_cosine
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.heads import MLPHead
from lightning_gen.registry import register_method


@dataclass
class SimSiamConfig(SSLConfig):
    optimizer: str = choice("sgd", "adam", "adamw", "sgd", "lars")
    lr: float = 0.05
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    global_bn: bool = True  # BatchNorm over all ranks under DDP, as the paper (SyncBN)
    weight_decay: float = 1e-4
    exclude_bias_norm: bool = False  # main_simsiam.py: SGD(weight_decay=1e-4) over every parameter
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    proj_layers: int = 3  # 2 in the paper's CIFAR-10 setting
    pred_hidden_dim: int = 512  # the predictor's bottleneck
    fix_predictor_lr: bool = True  # the predictor's lr stays at its base value (no warm-up, no decay)


@register_method("simsiam", SimSiamConfig)
class SimSiam(SSLMethod):
    """SimSiam: shared encoder, predictor on one side, stop-gradient on the other (no negatives, no momentum)."""

    config_class = SimSiamConfig

    def __init__(self, cfg: SimSiamConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        self.projector = MLPHead(
            self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bn=True
        )
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2)

    def parameter_groups(self, modules, lr, weight_decay):
        if not self.cfg.fix_predictor_lr or "predictor" not in modules:
            return super().parameter_groups(modules, lr, weight_decay)
        rest = {name: m for name, m in modules.items() if name != "predictor"}
        fixed = super().parameter_groups({"predictor": modules["predictor"]}, lr, weight_decay)
        for group in fixed:
            group["fixed_lr"] = True  # Method.on_train_batch_start leaves these at base_lr
        return super().parameter_groups(rest, lr, weight_decay) + fixed

    def ssl_loss(self, views, batch):
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)  # z's detached inside
        return loss, f1
