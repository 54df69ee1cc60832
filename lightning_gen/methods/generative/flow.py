"""Rectified flow (Liu et al. 2023; Lipman et al. 2023) with classifier-free guidance.

    x_t = (1 - t) x + t z,  z ~ N(0, I),  v = z - x,  minimise || f_theta(x_t, t, y) - v ||^2

t = 0 is data and t = 1 is noise. t is drawn uniformly or logit-normal (t = sigmoid(u), u ~ N(0, 1),
which puts more weight on the ambiguous middle noise levels). Sampling integrates dx/dt = v from
t = 1 to 0 with N Euler steps; guidance v = (1 + w) v(x, y) - w v(x, null) with both passes batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen import diffusion
from lightning_gen.config import bounded, choice
from lightning_gen.losses.regression import squared_error
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.nets.unet import UNet
from lightning_gen.registry import register_method

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, the range the sinusoidal embedding was tuned for


@dataclass
class RectifiedFlowConfig(GenerativeConfig):
    time_sampling: str = choice("logit_normal", "logit_normal", "uniform")
    width: int = 64
    mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = bounded(0.1, 0, 1, high_open=True)
    conditional: bool = False
    label_dropout: float = bounded(0.1, 0, 1)  # Ho & Salimans used 0.1-0.2
    sample_steps: int = 50
    guidance: float = bounded(0.0, 0)  # default CFG weight w at sampling time
    loss_reduction: str = choice(
        "mean", "mean", "sum"
    )  # sum over pixels is the textbook form; mean keeps the LR resolution-free
    lr: float = 2e-4


@register_method("flow", RectifiedFlowConfig)
class RectifiedFlow(GenerativeMethod):
    """Rectified flow: velocity-prediction U-Net, Euler sampler with N steps, classifier-free guidance."""

    config_class = RectifiedFlowConfig
    sample_options = ("steps", "guidance")

    def __init__(self, cfg: RectifiedFlowConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dict when rebuilt from a checkpoint; the base class made it the dataclass
        info = self.data_info
        self.conditional = cfg.conditional and info.num_classes > 0
        self.net = UNet(
            info.channels,
            info.image_size,
            cfg.width,
            tuple(cfg.mults),
            cfg.blocks_per_level,
            tuple(cfg.attention_resolutions),
            cfg.dropout,
            info.num_classes if self.conditional else 0,
        )
        self.setup_ema("net")

    def velocity(self, net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return net(x, t * TIME_SCALE, y)

    def sample_time(self, n: int, device) -> torch.Tensor:
        if self.cfg.time_sampling == "logit_normal":
            return torch.randn(n, device=device).sigmoid()
        return torch.rand(n, device=device)

    def step(self, batch, stage: str) -> torch.Tensor:
        x = self.to_float(batch["image"], "symmetric")
        z = torch.randn_like(x)
        t = self.sample_time(len(x), x.device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * z
        y = self.drop_labels(batch["label"], self.cfg.label_dropout) if self.conditional else None
        loss = squared_error(self.velocity(self.net, xt, t, y), z - x, self.cfg.loss_reduction)
        self.log_loss(stage, loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, steps=None, guidance=None):
        self.check_sample_options(cond, {})
        guidance = self.cfg.guidance if guidance is None else guidance
        if guidance and not self.conditional:
            raise ValueError("guidance needs a conditional model (method.conditional=true)")
        labels = self.sample_labels(n, cond)
        info = self.data_info
        with evaluating(self.sampling_net()) as net:
            v_fn = diffusion.guided(
                lambda x, t, y: self.velocity(net, x, t, y), labels, info.num_classes, float(guidance)
            )
            x = diffusion.euler_flow_sample(
                v_fn,
                (n, info.channels, info.image_size, info.image_size),
                steps or self.cfg.sample_steps,
                self.device,
                generator,
            )
        return ((x + 1) / 2).clamp(0, 1)
