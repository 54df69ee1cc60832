"""Autoencoder and denoising autoencoder (Hinton & Salakhutdinov 2006; Vincent et al. 2008 for the denoising form).

    z = g_phi(x~),  x^ = f_theta(z),  L = mean (x - x^)^2

with x~ = x for the plain autoencoder and x~ = corrupt(x) for the denoising one (additive Gaussian
noise of std ``noise_std`` and/or masking of a ``mask_prob`` fraction of pixels). The bottleneck z
is lower-dimensional than x, otherwise the identity would be a solution. After training the
decoder is thrown away and the encoder is the representation: ``embed(x) = g_phi(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_gen.config import bounded, choice
from lightning_gen.methods.base import Method, MethodConfig
from lightning_gen.nets.conv import ConvDecoder, ConvEncoder
from lightning_gen.registry import register_method


@dataclass
class AutoencoderConfig(MethodConfig):
    latent_dim: int = 32
    width: int = 32  # channels of the first conv; doubles at every downsampling
    noise_std: float = bounded(
        0.0, 0
    )  # > 0: denoising autoencoder with additive Gaussian noise on [0, 1] pixels
    mask_prob: float = bounded(
        0.0, 0, 1, high_open=True
    )  # > 0: denoising autoencoder with masking noise (pixels set to 0)
    loss: str = choice("mse", "mse", "bce")
    lr: float = 2e-3


@register_method("autoencoder", AutoencoderConfig)
class Autoencoder(Method):
    """Autoencoder / denoising autoencoder with MSE reconstruction; the encoder is the representation."""

    embed_value_range = "unit"

    def __init__(self, cfg: AutoencoderConfig, data=None):
        super().__init__(cfg, data)
        info = self.data_info
        self.encoder = ConvEncoder(info.channels, info.image_size, cfg.latent_dim, width=cfg.width)
        self.decoder = ConvDecoder(cfg.latent_dim, info.channels, info.image_size, width=cfg.width)
        self.setup_online_probe(cfg.latent_dim)

    @property
    def denoising(self) -> bool:
        return self.cfg.noise_std > 0 or self.cfg.mask_prob > 0

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn_like(x)
        if self.cfg.mask_prob > 0:
            x = x * (torch.rand_like(x[:, :1]) >= self.cfg.mask_prob)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1] of images in [0, 1]."""
        return torch.sigmoid(self.decoder(self.encoder(x)))

    def reconstruction_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), x.float())
        return F.mse_loss(torch.sigmoid(logits.float()), x.float())

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        x = self.to_float(batch["image"], "unit")
        x_in = self.corrupt(x) if self.denoising and stage == "train" else x
        z = self.encoder(x_in)
        loss = self.reconstruction_loss(self.decoder(z), x)
        self.log_loss(stage, loss)
        return loss + self.probe_loss(z, batch["label"], stage)

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    @torch.no_grad()
    def images_for_logging(self, batch):
        x = self.to_float(batch["image"][:32], "unit")
        shown = {"input": x, "reconstruction": self.reconstruct(x)}
        if self.denoising:
            noisy = self.corrupt(x).clamp(0, 1)
            shown.update(corrupted=noisy, denoised=self.reconstruct(noisy))
        return shown
