"""DINO: self-distillation with no labels (Caron et al. 2021).

    s_v = g_s(x_v) for every view v (global and local crops),  t_v = g_t(x_v) for the global crops only
    L = mean over pairs (t_v, s_u), u != v, of H(t_v, s_u)
    H(t, s) = -softmax((t - C)/τ_t) · log softmax(s/τ_s)
    θ_t <- l θ_t + (1 - l) θ_s,   C <- m C + (1 - m) mean_all_ranks(t)

Notation: ``momentum_start/end`` is the teacher momentum l (cosine 0.996 -> 1),
``center_momentum`` is m, ``teacher_temp`` is τ_t, warmed up linearly from ``teacher_temp_start``
(0.04 throughout by default, main_dino.py's; its "boosted" command goes to 0.07 over 30 epochs).
The student's ViT drops residual paths (stochastic depth, ``backbone.drop_path``, 0.1 in
``conf/method/dino.yaml``), the teacher never does.
τ_t and l are pure functions of training progress (``schedules.training_progress``), so a resumed run
uses the same values as an uninterrupted one, on the same allocation or another, and so is the weight decay, a cosine from ``weight_decay`` to ``weight_decay_end``
(0.04 -> 0.4 in the paper). The head's last layer is frozen for ``freeze_last_layer_epochs`` (stability),
and, as in the official code, each parameter's gradient is clipped to norm ``clip_grad`` on its own.
``embed`` (linear probe, kNN, export) is the teacher's backbone, as DINO evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen import schedules
from lightning_gen.config import bounded, choice
from lightning_gen.losses.dino import DINOLoss
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.heads import DINOHead
from lightning_gen.nets.vit import disable_drop_path
from lightning_gen.registry import register_method


@dataclass
class DINOConfig(SSLConfig):
    optimizer: str = choice("adamw", "adam", "adamw", "sgd", "lars")
    lr: float = 5e-4
    lr_scaling: str = choice("linear", "none", "linear", "sqrt")
    weight_decay: float = 0.04
    weight_decay_end: float = bounded(
        0.4, 0
    )  # cosine schedule from weight_decay; set equal for a constant decay
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 2e-3  # 1e-6 at the end for lr 5e-4
    out_dim: int = 65536  # K prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temp: float = bounded(0.1, 0, low_open=True)
    teacher_temp_start: float = bounded(0.04, 0, low_open=True)
    # final τ_t (main_dino.py's default); its "boosted" command: 0.07, warmed up over 30 epochs
    teacher_temp: float = bounded(0.04, 0, low_open=True)
    teacher_temp_warmup_epochs: float = bounded(0.0, 0)
    center_momentum: float = bounded(0.9, 0, 1)
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    freeze_last_layer_epochs: int = 1
    clip_grad: float = bounded(3.0, 0)  # per-parameter gradient-norm clip (official code); 0 disables
    global_bn: bool = True  # ResNet backbones: BatchNorm over all ranks, as the official code's SyncBN


@register_method("dino", DINOConfig)
class DINO(SSLMethod):
    """DINO: student/teacher self-distillation over multi-crop views with centering and sharpening."""

    config_class = DINOConfig
    embed_module = "teacher_backbone"  # the network behind embed(), which `lgen export backbone` writes

    def __init__(self, cfg: DINOConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        if self.views.num_global < 2:
            raise ValueError("DINO needs at least 2 global crops: set method.views.global_crops.n >= 2")
        self.head = DINOHead(self.feature_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        # the teacher is the student's architecture without stochastic depth (main_dino.py builds it
        # without drop_path_rate); only the student drops paths (backbone.drop_path, 0.1 for ViTs)
        self.teacher_backbone = disable_drop_path(self.momentum_copy(self.backbone))
        self.teacher_head = self.momentum_copy(self.head)
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)

    def frozen_module_names(self) -> set[str]:
        return {"teacher_backbone", "teacher_head", "loss_fn"}

    def buffers_identical_on_all_ranks(self) -> list[str]:
        return ["loss_fn.center"]  # all-reduced at every update

    def momentum_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def teacher_temp_at(self, progress: schedules.Progress) -> float:
        warmup = progress.steps(self.cfg.teacher_temp_warmup_epochs)
        return schedules.linear_warmup(
            progress.step, warmup, self.cfg.teacher_temp_start, self.cfg.teacher_temp
        )

    def weight_decay_at(self, progress: schedules.Progress) -> float:
        return schedules.cosine(
            progress.step, progress.total, self.cfg.weight_decay, self.cfg.weight_decay_end
        )

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        decay = self.weight_decay_at(self.progress())
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                # Only the groups built with decay (not biases, norms or the online probe) follow it.
                if group.setdefault("scheduled_decay", group["weight_decay"] > 0):
                    group["weight_decay"] = decay
        self.log_value("train/weight_decay", decay, on_step=True, on_epoch=False)

    def ssl_loss(self, views, batch):
        n_global = self.views.num_global
        # Views of one resolution go through the networks together (one forward per crop size).
        global_feats = self.backbone(torch.cat(views[:n_global]))
        student = list(self.head(global_feats).chunk(n_global))
        if len(views) > n_global:
            student += list(
                self.head(self.backbone(torch.cat(views[n_global:]))).chunk(len(views) - n_global)
            )
        with torch.no_grad():
            teacher_feats = self.teacher_backbone(torch.cat(views[:n_global]))
            teacher = list(self.teacher_head(teacher_feats).chunk(n_global))
        tau_t = self.teacher_temp_at(self.progress())
        loss = self.loss_fn(student, teacher, tau_t)
        self.loss_fn.update_center(teacher)
        self.log_value("train/teacher_temp", tau_t, on_step=True, on_epoch=False)
        return loss, teacher_feats.chunk(n_global)[0]  # the online probe reads what embed() gives

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # The teacher is the encoder DINO evaluates: the momentum average of the student, and the better
        # one throughout training (Caron et al. 2021, Sec. 5.2 and their evaluation code).
        return self.teacher_backbone(x)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients are unscaled here (mixed precision) and about to be applied.
        if self.cfg.clip_grad > 0:
            for module in (self.backbone, self.head):
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_((self.cfg.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        if self.current_epoch < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None
