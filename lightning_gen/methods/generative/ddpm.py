"""DDPM (Ho et al. 2020), classifier-free guidance (Ho & Salimans 2022), DDIM sampling (Song et al. 2021).

Algorithm 1 (training):  t ~ U{1..T}, eps ~ N(0, I),
    minimise || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t, y) ||^2
with y replaced by the null class with probability ``label_dropout`` (conditional models only), so
the same network is conditional and unconditional. Sampling (``lightning_gen.diffusion``) runs
ancestral DDPM (Algorithm 2) or DDIM with any number of steps on the EMA weights, with guidance
eps = (1 + w) eps(x, y) - w eps(x, null), both passes batched together.
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


@dataclass
class DDPMConfig(GenerativeConfig):
    timesteps: int = 1000
    schedule_name: str = choice("linear", "linear", "cosine")  # linear: beta 1e-4 .. 0.02 (Ho et al.)
    width: int = 64
    mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = bounded(0.1, 0, 1, high_open=True)
    conditional: bool = False  # class-conditional with classifier-free guidance
    label_dropout: float = bounded(0.1, 0, 1)  # p(y -> null) in training; Ho & Salimans used 0.1-0.2
    sampler: str = choice("ddim", "ddpm", "ddim")  # default sampler of sample()/FID
    sample_steps: int = 50  # DDIM steps by default
    # DDIM's eta by default: 0 is the deterministic sampler of the paper. An undertrained eps-model errs at
    # high t (where eps ~ x_t), 1/sqrt(alpha_bar) amplifies that into x0_hat, and eta = 0 carries the clipped
    # error to the end as a noise image; eta = 1 re-noises each step and washes it out (docs/results-digits.md, samplers).
    sample_eta: float = bounded(0.0, 0, 1)
    guidance: float = bounded(0.0, 0)  # default CFG weight w at sampling time
    clip_x0: bool = True  # clamp the predicted x_0 to [-1, 1] while sampling
    lr: float = 2e-4
    ema_decay: float = 0.999


@register_method("ddpm", DDPMConfig)
class DDPM(GenerativeMethod):
    """Denoising diffusion (eps-prediction U-Net), DDPM/DDIM samplers, optional classifier-free guidance."""

    config_class = DDPMConfig
    sample_options = ("sampler", "steps", "guidance", "eta")

    def __init__(self, cfg: DDPMConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dict when rebuilt from a checkpoint; the base class made it the dataclass
        info = self.data_info
        self.conditional = cfg.conditional and info.num_classes > 0
        self.schedule = diffusion.NoiseSchedule.build(cfg.schedule_name, cfg.timesteps)
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

    def draw_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1's random draws for a batch: timestep indices t ~ U{0..T-1} and eps ~ N(0, I)."""
        return torch.randint(0, self.schedule.T, (len(x0),), device=x0.device), torch.randn_like(x0)

    def step(self, batch, stage: str) -> torch.Tensor:
        x0 = self.to_float(batch["image"], "symmetric")
        i, eps = self.draw_noise(x0)
        y = self.drop_labels(batch["label"], self.cfg.label_dropout) if self.conditional else None
        loss = squared_error(self.net(self.schedule.q_sample(x0, i, eps), i, y), eps)
        self.log_loss(stage, loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, sampler=None, steps=None, guidance=None, eta=None):
        self.check_sample_options(cond, {})
        eta = self.cfg.sample_eta if eta is None else eta
        sampler, guidance = sampler or self.cfg.sampler, self.cfg.guidance if guidance is None else guidance
        if guidance and not self.conditional:
            raise ValueError("guidance needs a conditional model (method.conditional=true)")
        labels = self.sample_labels(n, cond)
        info = self.data_info
        shape = (n, info.channels, info.image_size, info.image_size)
        clip = 1.0 if self.cfg.clip_x0 else None
        with evaluating(self.sampling_net()) as net:
            eps_fn = diffusion.guided(net, labels, info.num_classes, float(guidance))
            if sampler == "ddpm":
                if steps not in (None, self.schedule.T):
                    raise ValueError(
                        f"the ddpm sampler runs all T={self.schedule.T} steps; use sampler=ddim for fewer"
                    )
                x = diffusion.ddpm_sample(eps_fn, self.schedule, shape, self.device, generator, clip=clip)
            elif sampler == "ddim":
                x = diffusion.ddim_sample(
                    eps_fn,
                    self.schedule,
                    shape,
                    steps or self.cfg.sample_steps,
                    eta,
                    self.device,
                    generator,
                    clip=clip,
                )
            else:
                raise ValueError(f"unknown sampler {sampler!r}: use ddpm or ddim")
        return ((x + 1) / 2).clamp(0, 1)
