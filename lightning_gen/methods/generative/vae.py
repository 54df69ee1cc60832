"""Variational autoencoder (Kingma & Welling 2014).

    q_phi(z|x) = N(mu(x), diag sigma^2(x)),  z = mu + sigma * eps,  p(z) = N(0, I)
    loss = -E_q[log p_theta(x|z)] + beta KL(q_phi(z|x) || p(z))      (the negative ELBO when beta = 1)

Decoder likelihood (papers and implementations differ, so all are offered): ``gaussian_fixed`` N(mu(z), sigma^2 I)
with a fixed sigma (then the reconstruction term is the L2 distance / 2 sigma^2), ``gaussian_learned``
with a learned per-pixel log-variance output, or ``bernoulli`` on [0, 1] pixels. Logged: ELBO terms and
bits/dim (dequantisation bound, Gaussian decoders). Sampling: z ~ N(0, I), the decoder mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_gen.config import bounded, choice
from lightning_gen.losses import elbo
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.nets.conv import ConvDecoder, ConvEncoder
from lightning_gen.registry import register_method


@dataclass
class VAEConfig(GenerativeConfig):
    latent_dim: int = 16
    width: int = 32
    decoder: str = choice("gaussian_fixed", "gaussian_fixed", "gaussian_learned", "bernoulli")
    decoder_std: float = bounded(
        0.1, 0, low_open=True
    )  # sigma of the fixed-variance Gaussian decoder, on [0, 1] pixels
    beta: float = bounded(1.0, 0)  # KL weight (beta-VAE; latent-diffusion autoencoders use a very small one)
    lr: float = 1e-3
    ema_decay: float = 0.0  # one decoder pass per sample: EMA is optional here


class VAENets(torch.nn.Module):
    """Encoder (x -> mu, log sigma^2) and decoder (z -> mean [, log-variance]) kept together so the
    EMA copy and sampling see one module."""

    def __init__(self, channels: int, image_size: int, latent_dim: int, width: int, learned_variance: bool):
        super().__init__()
        self.channels = channels
        self.encoder = ConvEncoder(channels, image_size, 2 * latent_dim, width=width)
        self.decoder = ConvDecoder(
            latent_dim, channels * (2 if learned_variance else 1), image_size, width=width
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


@register_method("vae", VAEConfig)
class VAE(GenerativeMethod):
    """Variational autoencoder: Gaussian encoder, Gaussian (fixed/learned variance) or Bernoulli decoder."""

    config_class = VAEConfig
    embed_value_range = "unit"

    def __init__(self, cfg: VAEConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dict when rebuilt from a checkpoint; the base class made it the dataclass
        info = self.data_info
        self.nets = VAENets(
            info.channels, info.image_size, cfg.latent_dim, cfg.width, cfg.decoder == "gaussian_learned"
        )
        self.setup_ema("nets")

    def decoder_mean(self, out: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) in [0, 1] (the image a sample shows)."""
        return torch.sigmoid(out[:, : self.data_info.channels])

    def likelihood(self, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p(x|z) per sample (nats) and the decoder mean in [0, 1]."""
        if self.cfg.decoder == "bernoulli":
            return elbo.bernoulli_nll(x, out), torch.sigmoid(out)
        if self.cfg.decoder == "gaussian_learned":
            mean_logits, logvar = out.chunk(2, dim=1)
            mean = torch.sigmoid(mean_logits)
            return elbo.gaussian_nll(x, mean, logvar.clamp(-10, 2)), mean
        mean = torch.sigmoid(out)
        return elbo.gaussian_nll(x, mean, 2 * math.log(self.cfg.decoder_std)), mean

    def step(self, batch, stage: str) -> torch.Tensor:
        x = self.to_float(batch["image"], "unit")
        mu, logvar = self.nets.encode(x)
        z = elbo.reparameterize(mu, logvar)
        nll, _ = self.likelihood(x, self.nets.decode(z).float())
        kl = elbo.kl_standard_normal(mu.float(), logvar.float())
        loss = (nll + self.cfg.beta * kl).mean() / x[0].numel()  # per dimension: LR independent of image size
        sync, on_step = stage != "train", stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=sync)
        self.log(f"{stage}/kl", kl.mean(), on_step=on_step, on_epoch=True, sync_dist=sync)
        self.log(f"{stage}/reconstruction_nll", nll.mean(), on_step=on_step, on_epoch=True, sync_dist=sync)
        self.log(f"{stage}/elbo", -(nll + kl).mean(), on_step=on_step, on_epoch=True, sync_dist=sync)
        if (
            self.cfg.decoder != "bernoulli"
        ):  # a Bernoulli likelihood of grey levels is no density of 8-bit data
            bpd = elbo.bits_per_dim(nll + kl, x[0].numel()).mean()
            self.log(f"{stage}/bits_per_dim", bpd, on_step=on_step, on_epoch=True, sync_dist=sync)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets.encode(x)[0]

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.cfg.latent_dim,)

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, noise=None):
        """``noise``: latents z (n, latent_dim) to decode instead of draws from the prior."""
        self.check_sample_options(cond, {})
        with evaluating(self.sampling_net()) as nets:
            z = noise
            if z is None:
                z = torch.randn(
                    n,
                    self.cfg.latent_dim,
                    generator=generator,
                    device=generator.device if generator else self.device,
                )
            return self.decoder_mean(nets.decode(z.to(self.device)).float())

    @torch.no_grad()
    def posterior_mean(self, images: torch.Tensor) -> torch.Tensor:
        """mu(x) of q(z|x) for uint8 images, by the sampling weights (latent traversals start there)."""
        with evaluating(self.sampling_net()) as nets:
            return nets.encode(self.to_float(images, "unit"))[0].float()

    @torch.no_grad()
    def images_for_logging(self, batch):
        shown = super().images_for_logging(batch)
        mu, _ = self.nets.encode(shown["real"])
        shown["reconstruction"] = self.decoder_mean(self.nets.decode(mu).float())
        return shown
