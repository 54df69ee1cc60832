"""DCGAN (Goodfellow et al. 2014; Radford et al. 2016) with manual optimisation.

    for each batch:   D step: maximise log D(x) + log(1 - D(G(z)))
    every k batches:  G step: minimise -log D(G(z))  (non-saturating)  or  log(1 - D(G(z)))  (minimax)

Lightning 2 has no ``optimizer_idx``: ``automatic_optimization = False`` and ``training_step`` runs
both updates itself, each with fresh noise. "k D-steps per G step" counts batches, so every D step
sees a new real minibatch, as in Goodfellow's Algorithm 1. Optional class-conditional G and
(projection) D. The EMA of G samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.config import choice
from lightning_gen.losses.gan import discriminator_loss, generator_loss
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.nets.dcgan import Discriminator, Generator
from lightning_gen.registry import register_method


@dataclass
class GANConfig(GenerativeConfig):
    z_dim: int = 100
    g_width: int = 64
    d_width: int = 64
    generator_loss: str = choice("non_saturating", "non_saturating", "minimax")
    d_steps: int = 1  # discriminator updates (batches) per generator update
    conditional: bool = False
    optimizer: str = choice("adam", "adam", "adamw", "sgd", "lars")
    lr: float = 2e-4  # DCGAN: Adam 2e-4, beta1 = 0.5
    d_lr: float | None = None  # defaults to lr
    betas: tuple[float, float] = (0.5, 0.999)
    ema_decay: float = 0.999


@register_method("gan", GANConfig)
class GAN(GenerativeMethod):
    """DCGAN: minimax or non-saturating loss, k D steps per G step, optional conditional G and D."""

    config_class = GANConfig
    # D's and G's losses do not measure sample quality: the best checkpoint is chosen by FID when the
    # FID callback runs (run.best_checkpoint_rule), otherwise the newest is kept
    monitor = None
    # the D step leaves G without gradients and vice versa: DDP must look for unused parameters
    ddp_find_unused_parameters = True

    def __init__(self, cfg: GANConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dict when rebuilt from a checkpoint; the base class made it the dataclass
        self.automatic_optimization = False
        info = self.data_info
        self.conditional = cfg.conditional and info.num_classes > 0
        classes = info.num_classes if self.conditional else 0
        if cfg.d_steps < 1:
            raise ValueError(f"method.d_steps must be >= 1, got {cfg.d_steps}")
        self.generator = Generator(cfg.z_dim, info.channels, info.image_size, cfg.g_width, classes)
        self.discriminator = Discriminator(info.channels, info.image_size, cfg.d_width, classes)
        self.setup_ema("generator")

    def configure_optimizers(self):
        g_lr = self.scaled_lr()
        d_lr = self.scaled_lr(self.cfg.d_lr) if self.cfg.d_lr is not None else g_lr
        g_opt = self.build_optimizer(
            self.parameter_groups({"g": self.generator}, g_lr, self.cfg.weight_decay)
        )
        d_opt = self.build_optimizer(
            self.parameter_groups({"d": self.discriminator}, d_lr, self.cfg.weight_decay)
        )
        return [g_opt, d_opt]

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.randn(n, self.cfg.z_dim, generator=generator, device=device).to(self.device)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Checked on the host batch (no device sync): a conditional GAN has no null class to give
        # unlabeled images (DDPM and flow do, for classifier-free guidance).
        if self.conditional and self.training and bool((batch["label"] < 0).any()):
            raise ValueError(
                "a conditional GAN (method.conditional=true) needs a label for every training image, but this "
                "training set has unlabeled ones (STL-10 trains on train+unlabeled by default): set "
                "data.train_split=train, or method.conditional=false"
            )
        return batch

    def training_step(self, batch, batch_idx):
        g_opt, d_opt = self.optimizers()
        real = self.to_float(batch["image"], "symmetric")
        labels = batch["label"] if self.conditional else None
        n = len(real)

        self.toggle_optimizer(d_opt)
        fake = self.generator(self.noise(n), labels).detach()
        d_loss = discriminator_loss(self.discriminator(real, labels), self.discriminator(fake, labels))
        d_opt.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        d_opt.step()
        self.untoggle_optimizer(d_opt)
        self.log("train/d_loss", d_loss, on_step=True, on_epoch=True, prog_bar=True)

        if (batch_idx + 1) % self.cfg.d_steps == 0:
            self.toggle_optimizer(g_opt)
            fake_logits = self.discriminator(self.generator(self.noise(n), labels), labels)
            g_loss = generator_loss(fake_logits, self.cfg.generator_loss)
            g_opt.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            g_opt.step()
            self.update_ema()  # manual optimisation: Lightning's optimizer_step hook does not run
            self.untoggle_optimizer(g_opt)
            self.log("train/g_loss", g_loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("train/d_fake_prob", torch.sigmoid(fake_logits).mean(), on_step=False, on_epoch=True)
        self.log("train/loss", d_loss, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        real = self.to_float(batch["image"], "symmetric")
        labels = batch["label"].clamp(min=0) if self.conditional else None  # val/test splits are labeled
        fake = self.generator(self.noise(len(real)), labels)
        d_loss = discriminator_loss(self.discriminator(real, labels), self.discriminator(fake, labels))
        self.log("val/d_loss", d_loss, on_epoch=True, sync_dist=True)
        self.log("val/loss", d_loss, on_epoch=True, sync_dist=True)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.cfg.z_dim,)

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, noise=None):
        """``noise``: the generator's input z (n, z_dim) instead of fresh draws."""
        self.check_sample_options(cond, {})
        labels = self.sample_labels(n, cond)
        z = self.noise(n, generator) if noise is None else noise.to(self.device)
        with evaluating(self.sampling_net()) as g:
            return ((g(z, labels) + 1) / 2).clamp(0, 1)
