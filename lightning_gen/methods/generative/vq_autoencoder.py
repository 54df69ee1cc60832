"""VQ tokenizer: a VQGAN-style autoencoder (Esser et al. 2021, arXiv:2012.09841) whose latent is a grid of
code indices, the "words" an autoregressive Transformer models (method=token_ar).

    z_e = E(x),  z_q = quantise(z_e) (nets/quantizers.py),  x^ = G(z_q)
    L_AE = L_rec(x, x^) + beta ||z_e - sg(z_q)||^2 + [disc on] lambda * disc_weight * L_G

``quantizer=vq``: a codebook of ``codebook_size`` codes of dimension ``code_dim``, nearest-code lookup
(optionally l2-normalised, Yu et al. 2022), straight-through gradients, the commitment loss with weight
``commitment_weight`` (beta; 0.25 in van den Oord et al. 2017), the codebook updated by exponential
moving averages with decay ``codebook_decay`` and dead codes restarted onto encodings of the batch.
``quantizer=fsq``: finite scalar quantisation (Mentzer et al. 2023) with ``fsq_levels`` levels per
channel, prod(levels) implicit codes, no codebook loss. The reconstruction loss, the PatchGAN switched
on after ``disc_start_epochs`` and its adaptive weight are the latent autoencoder's
(methods/generative/gan_autoencoder.py). Codebook usage (fraction of codes used in the batch) and
perplexity (exp of the entropy of the batch's code frequencies) are logged at every step.

What the token model uses: ``encode(images) -> indices`` (N, H/f, W/f) and ``decode(indices) -> images``
in [0, 1], ``token_grid`` and ``codebook_size``, ``check_data``; and ``decoder_nll``, the discretised
Gaussian negative log-likelihood of an image given its tokens, with the noise level ``decoder_std``
fitted on the first ``scale_images`` training images at the end of every epoch (the maximum-likelihood
std of the reconstruction error, a buffer of the checkpoint): with it, token NLL + decoder NLL bounds the
image's negative log-likelihood under "tokens ~ the token model, image ~ N(decoder(tokens), std^2)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.diffusion.likelihood import discretised_gaussian_nll
from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.generative.gan_autoencoder import GANAutoencoder, GANAutoencoderConfig
from lightning_gen.methods.generative.generator import evaluating
from lightning_gen.nets.quantizers import FiniteScalarQuantizer, VectorQuantizer
from lightning_gen.nets.vq_autoencoder import VQAutoencoder as VQAutoencoderNet
from lightning_gen.registry import register_method


@dataclass
class VQAutoencoderConfig(GANAutoencoderConfig):
    # architecture: one level per entry, f = 2^(levels - 1) (28 px: 3 levels -> 7x7 tokens)
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = bounded(1, 1)  # residual blocks per encoder level (the decoder has one more)
    latent_channels: int = bounded(64, 1)  # C: the encoder's output and the decoder's input
    norm_groups: int = bounded(8, 1)  # GroupNorm groups; must divide every width
    attention: bool = True  # self-attention in the middle blocks, at the lowest resolution
    # the quantiser
    quantizer: str = choice("vq", "vq", "fsq")
    codebook_size: int = bounded(512, 2)  # vq: K codes
    code_dim: int = bounded(32, 1)  # vq: D, the dimension of a code
    l2_normalised: bool = False  # vq: compare directions (cosine similarity; ViT-VQGAN)
    codebook_decay: float = bounded(0.99, 0, 0.9999)  # vq: gamma of the codebook's moving averages
    commitment_weight: float = bounded(0.25, 0)  # vq: beta
    restart_threshold: float = bounded(1.0, 0, hint="vq: EMA count below which a code is restarted; 0: never")
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: levels per channel (1000 codes)
    # the decoder's likelihood for bits/dim
    scale_images: int = bounded(512, 1, hint="training images whose reconstruction error sets decoder_std")


def build_quantizer(cfg: VQAutoencoderConfig):
    if cfg.quantizer == "fsq":
        try:
            return FiniteScalarQuantizer(tuple(cfg.fsq_levels))
        except ValueError as error:
            raise ConfigError(f"method.fsq_levels={list(cfg.fsq_levels)}: {error}") from error
    return VectorQuantizer(
        cfg.codebook_size,
        cfg.code_dim,
        cfg.codebook_decay,
        cfg.commitment_weight,
        cfg.restart_threshold,
        cfg.l2_normalised,
    )


@register_method("vq_autoencoder", VQAutoencoderConfig)
class VQAutoencoder(GANAutoencoder):
    """VQ tokenizer (VQGAN): conv encoder/decoder, EMA codebook with restarts or FSQ, optional PatchGAN."""

    config_class = VQAutoencoderConfig

    def __init__(self, cfg: VQAutoencoderConfig, data=None):
        super().__init__(cfg, data)
        cfg, info = self.cfg, self.data_info
        levels = len(cfg.channels)
        factor = 2 ** (levels - 1)
        if info.image_size % factor:
            raise ConfigError(
                f"data.image_size={info.image_size} is not a multiple of the downsampling factor f={factor} "
                f"of method.channels={list(cfg.channels)} ({levels} levels): give a size divisible by "
                f"{factor}, or fewer levels"
            )
        try:
            self.autoencoder = VQAutoencoderNet(
                info.channels,
                tuple(cfg.channels),
                cfg.layers_per_block,
                cfg.latent_channels,
                cfg.norm_groups,
                cfg.attention,
                build_quantizer(cfg),
            )
        except ValueError as error:
            raise ConfigError(f"method.channels / method.norm_groups: {error}") from error
        self.build_discriminator()
        # the std of the decoder's Gaussian in [-1, 1] units, fitted on training images at every epoch end
        self.register_buffer("decoder_std", torch.ones(()))
        self.setup_ema("autoencoder")

    def buffers_identical_on_all_ranks(self) -> list[str]:
        # The codebook and its moving averages are updated alike on every rank (sums all-reduced, restarts
        # drawn with a shared seed): no broadcast from rank 0 before every forward.
        quantizer = self.autoencoder.quantizer
        return [
            *super().buffers_identical_on_all_ranks(),
            *(f"autoencoder.quantizer.{n}" for n in quantizer.buffer_names()),
        ]

    # ---------------------------------------------------------------- what the token model uses
    @property
    def codebook_size(self) -> int:
        return self.autoencoder.codebook_size

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the index grid of the images this tokenizer was trained on."""
        size = self.data_info.image_size // self.autoencoder.downsampling_factor
        return (size, size)

    def check_data(self, data: DataInfo, source: str = "the tokenizer") -> None:
        """A ConfigError in one line when ``data`` is not what this tokenizer was trained on."""
        mine = self.data_info
        if (mine.name, mine.image_size, mine.channels) != (data.name, data.image_size, data.channels):
            raise ConfigError(
                f"{source} was trained on {mine.name} at {mine.image_size} px with {mine.channels} channel(s), "
                f"but this run's data is {data.name} at {data.image_size} px with {data.channels} channel(s): "
                f"train a tokenizer on this data (method=vq_autoencoder) or choose its data"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> code indices (N, h, w)."""
        with evaluating(self.sampling_net()) as net:
            return net.encode(self.to_float(images, "symmetric"))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (N, h, w) -> images in [0, 1]."""
        with evaluating(self.sampling_net()) as net:
            return ((net.decode(indices).float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> reconstructions in [0, 1] through their codes."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def decoder_nll(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """-log p(x | tokens) per image (nats) of uint8 images: the discretised Gaussian with mean
        decoder(tokens) and std ``decoder_std`` over the 8-bit bins of [-1, 1]."""
        with evaluating(self.sampling_net()) as net:
            mean = net.decode(indices).float()
        return discretised_gaussian_nll(self.to_float(images, "symmetric"), mean, self.decoder_std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The quantised encoding, flattened: a representation (for lgen eval probe / knn)."""
        with evaluating(self.sampling_net()) as net:
            return net.quantize(x).quantized.flatten(1)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        self.adversarial_step(self.to_float(batch["image"], "symmetric"), self.autoencoder_loss, batch_idx)

    def autoencoder_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x^, L_rec, L_rec + beta commitment). The restarts' seed is the training step: the same on
        every rank, and restored with it on a resume."""
        reconstruction, q = self.autoencoder(x, seed=self.trainer.global_step)
        rec = self.reconstruction_loss(x, reconstruction)
        self.log("train/commitment", q.loss, on_step=True, on_epoch=True)
        self.log("train/perplexity", q.perplexity, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/codebook_usage", q.usage, on_step=True, on_epoch=True)
        return reconstruction, rec, rec + q.loss

    def validation_step(self, batch, batch_idx):
        x = self.to_float(batch["image"], "symmetric")
        reconstruction, q = self.autoencoder(x)
        self.log_reconstruction(x, reconstruction)
        self.log("val/perplexity", q.perplexity, sync_dist=True)
        self.log("val/codebook_usage", q.usage, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        # Before the epoch's checkpoints are written (Lightning runs them after this hook).
        self.update_decoder_std()

    @torch.no_grad()
    def update_decoder_std(self) -> None:
        """decoder_std = the root mean squared reconstruction error (in [-1, 1]) of the first
        ``scale_images`` training images, at least half a bin. The same images on every rank."""
        images = self.reference_images(self.cfg.scale_images)
        if images is None:
            return
        with torch.autocast(self.device.type, enabled=False):
            errors = [
                (self.reconstruct(chunk.to(self.device)) - chunk.to(self.device).float() / 255) * 2
                for chunk in images.split(256)
            ]
        self.decoder_std.copy_(torch.cat(errors).square().mean().sqrt().clamp_min(1 / 255))

    @torch.no_grad()
    def images_for_logging(self, batch):
        x = self.to_float(batch["image"][:32], "unit")
        return {"input": x, "reconstruction": self.reconstruct(x)}


def load_tokenizer(source: str | Path, map_location: str = "cpu") -> VQAutoencoder:
    """A frozen VQ tokenizer from an ``lgen train method=vq_autoencoder`` checkpoint."""
    from lightning_gen.checkpoint import load_checkpoint
    from lightning_gen.methods.base import load_method

    path = Path(source).expanduser()
    name = load_checkpoint(path, map_location).get("hyper_parameters", {}).get("method")
    if name != "vq_autoencoder":
        raise ConfigError(
            f"{path} is a {name} checkpoint, not a VQ tokenizer: train one with method=vq_autoencoder"
        )
    return load_method(str(path), map_location).eval().requires_grad_(False)
