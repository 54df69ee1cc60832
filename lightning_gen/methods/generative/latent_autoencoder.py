"""The autoencoder of latent diffusion (Rombach et al. 2022, arXiv:2112.10752): a KL-regularised
convolutional autoencoder trained with a reconstruction loss and a patch discriminator.

    q(z|x) = N(mu(x), diag sigma^2(x)) at 1/f of the image resolution, C channels;  x^ = D(z), z ~ q(z|x)
    L_AE = L_rec(x, x^) + kl_weight * KL(q(z|x) || N(0, I)) + [disc on] lambda * disc_weight * L_G
    L_rec = sum over pixels of |x - x^| (l1) or (x - x^)^2 (l2), averaged over the batch
    L_G = -mean D(x^)                                      (hinge generator loss)
    L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x^)))  (hinge discriminator loss)
    lambda = ||grad_{w_L} L_rec|| / (||grad_{w_L} L_G|| + 1e-4)   (adaptive weight, Esser et al. 2021)

with w_L the decoder's last conv weight: the GAN term is rescaled so that its gradient at the output
is as large as the reconstruction's, whatever the scale of either loss. A very small KL weight
(1e-6) keeps the latent close to a standard scale without forcing out information; the discriminator
(a PatchGAN, Isola et al. 2017) restores the texture a pixel loss blurs. It is switched on after
``disc_start_epochs`` of training, once reconstructions are reasonable: before that neither D nor
the GAN term trains.

Latent diffusion then uses ``encode_latents`` / ``decode_latents``: latents are scaled by
``latent_scale`` = 1 / std of the latents of the first ``scale_images`` training images (recomputed
at the end of every training epoch, a buffer of the checkpoint) so the diffusion model sees
unit-variance data. ``from_pretrained`` builds the same module from a published KL autoencoder in
the diffusers layout (Stable Diffusion's f8c4 VAE), with its own scale and shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_gen.config import ConfigError, bounded
from lightning_gen.losses import elbo
from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.generative.gan_autoencoder import GANAutoencoder, GANAutoencoderConfig
from lightning_gen.methods.generative.generator import evaluating
from lightning_gen.nets.kl_autoencoder import KLAutoencoder
from lightning_gen.registry import register_method


@dataclass
class LatentAutoencoderConfig(GANAutoencoderConfig):
    # architecture: one level per entry, f = 2^(levels - 1) (28 px: 3 levels -> 7x7 latents, 2 -> 14x14)
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = bounded(1, 1)  # residual blocks per encoder level (the decoder has one more)
    latent_channels: int = bounded(4, 1)  # C
    norm_groups: int = bounded(8, 1)  # GroupNorm groups; must divide every width
    attention: bool = True  # self-attention in the middle blocks, at the lowest resolution
    quant_conv: bool = True  # the 1x1 convs around the latent (Stable Diffusion 1/2 have them, SD3/FLUX not)
    # objective (reconstruction, discriminator and optimizer: GANAutoencoderConfig)
    kl_weight: float = bounded(1e-6, 0)
    scale_images: int = bounded(512, 1, hint="training images whose latents set latent_scale")
    pretrained: str | None = None  # set by from_pretrained: the diffusers folder the weights came from


@register_method("latent_autoencoder", LatentAutoencoderConfig)
class LatentAutoencoder(GANAutoencoder):
    """Latent-diffusion KL autoencoder: L1/L2 + tiny KL + PatchGAN with the adaptive weight; latents for LDM."""

    config_class = LatentAutoencoderConfig

    def __init__(self, cfg: LatentAutoencoderConfig, data=None):
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
            self.autoencoder = KLAutoencoder(
                info.channels,
                info.channels,
                tuple(cfg.channels),
                cfg.layers_per_block,
                cfg.latent_channels,
                cfg.norm_groups,
                cfg.attention,
                cfg.quant_conv,
                cfg.quant_conv,
            )
        except ValueError as error:
            raise ConfigError(f"method.channels / method.norm_groups: {error}") from error
        self.build_discriminator()
        # (z - shift) * scale are the latents diffusion sees; set from the data at every epoch end
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_shift", torch.zeros(()))
        self.setup_ema("autoencoder")

    # ---------------------------------------------------------------- what latent diffusion uses
    @property
    def downsampling_factor(self) -> int:
        return self.autoencoder.downsampling_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H/f, W/f) of the latents of the images this autoencoder was trained on."""
        size = self.data_info.image_size // self.downsampling_factor
        return (self.cfg.latent_channels, size, size)

    @property
    def trained_on(self) -> dict:
        """The data it was trained on (a pretrained autoencoder: any dataset with its channel count)."""
        info = self.data_info
        return {"data": info.name or None, "image_size": info.image_size, "channels": info.channels}

    def check_data(self, data: DataInfo, source: str = "the autoencoder") -> None:
        """A ConfigError in one line when ``data`` is not what this autoencoder can encode."""
        mine = self.data_info
        if mine.name and (mine.name, mine.image_size, mine.channels) != (
            data.name,
            data.image_size,
            data.channels,
        ):
            raise ConfigError(
                f"{source} was trained on {mine.name} at {mine.image_size} px with {mine.channels} channel(s), "
                f"but this run's data is {data.name} at {data.image_size} px with {data.channels} channel(s): "
                f"train an autoencoder on this data (method=latent_autoencoder) or choose its data"
            )
        if data.channels != mine.channels or data.image_size % self.downsampling_factor:
            raise ConfigError(
                f"{source} encodes {mine.channels}-channel images whose size is a multiple of "
                f"{self.downsampling_factor}; this run's data is {data.name} with {data.channels} channel(s) "
                f"at {data.image_size} px"
            )

    @torch.no_grad()
    def encode_latents(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents (z - shift) * scale of images in [-1, 1]: the posterior mean, or a sample."""
        mean, std = self.posterior(x)
        return self.scale_latents(mean, std if sample else None, generator)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z|x) for images in [-1, 1], unscaled (what `lgen latents` caches)."""
        with evaluating(self.sampling_net()) as net:
            mean, logvar = net.encode(x)
        return mean, (0.5 * logvar).exp()

    def scale_latents(
        self, mean: torch.Tensor, std: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(z - shift) * scale for z = mean, or z ~ N(mean, std^2) when ``std`` is given."""
        z = mean
        if std is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise
        return (z - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) from scaled latents."""
        with evaluating(self.sampling_net()) as net:
            return net.decode(z / self.latent_scale + self.latent_shift)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> reconstructions in [0, 1] through the posterior mean."""
        x = self.to_float(images, "symmetric")
        return ((self.decode_latents(self.encode_latents(x)) + 1) / 2).clamp(0, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean, flattened: the latent as a representation (for lgen eval probe / knn)."""
        return self.sampling_net().encode(x)[0].flatten(1)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        self.adversarial_step(self.to_float(batch["image"], "symmetric"), self.autoencoder_loss, batch_idx)

    def autoencoder_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x^, L_rec, L_rec + kl_weight KL) with z ~ q(z|x)."""
        mean, logvar = self.autoencoder.encode(x)
        reconstruction = self.autoencoder.decode(elbo.reparameterize(mean, logvar))
        rec = self.reconstruction_loss(x, reconstruction)
        kl = elbo.kl_standard_normal(mean.float(), logvar.float()).mean()
        self.log("train/kl", kl, on_step=True, on_epoch=True)
        return reconstruction, rec, rec + self.cfg.kl_weight * kl

    def validation_step(self, batch, batch_idx):
        x = self.to_float(batch["image"], "symmetric")
        mean, logvar = self.autoencoder.encode(x)
        self.log_reconstruction(x, self.autoencoder.decode(mean))
        self.log("val/kl", elbo.kl_standard_normal(mean.float(), logvar.float()).mean(), sync_dist=True)

    # ---------------------------------------------------------------- the latent scale
    def buffers_identical_on_all_ranks(self) -> list[str]:
        # every rank computes them from the same images: DDP need not re-broadcast them every step
        return [*super().buffers_identical_on_all_ranks(), "latent_scale", "latent_shift"]

    def on_train_epoch_end(self) -> None:
        # Before the epoch's checkpoints are written (Lightning runs them after this hook).
        self.update_latent_scale()

    @torch.no_grad()
    def update_latent_scale(self) -> None:
        """latent_scale = 1 / std of the posterior means of the first ``scale_images`` training images
        (as LDM computes its scale factor from data). The same images on every rank: equal buffers."""
        images = self.reference_images(self.cfg.scale_images)
        if images is None:
            return
        with evaluating(self.sampling_net()) as net, torch.autocast(self.device.type, enabled=False):
            means = [
                net.encode(self.to_float(chunk.to(self.device), "symmetric"))[0]
                for chunk in images.split(256)
            ]
        self.latent_scale.copy_(torch.cat(means).float().std().reciprocal())

    # ---------------------------------------------------------------- images, pretrained weights
    @torch.no_grad()
    def images_for_logging(self, batch):
        x = self.to_float(batch["image"][:32], "unit")
        return {"input": x, "reconstruction": self.reconstruct(x)}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LatentAutoencoder:
        """A frozen module from a diffusers-layout AutoencoderKL (folder or weights file), any dataset with
        its channel count; its scaling_factor and shift_factor become latent_scale and latent_shift."""
        from lightning_gen.nets.diffusers_vae import load_pretrained_autoencoder

        loaded = load_pretrained_autoencoder(path)
        config = loaded.config
        in_channels = config.get("in_channels", 3)
        if config.get("out_channels", in_channels) != in_channels:
            raise ConfigError(
                f"{path}: an autoencoder whose output channels differ from its input's cannot be used"
            )
        if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
            raise ConfigError(
                f"{path}: use_quant_conv and use_post_quant_conv differ, which is not supported"
            )
        cfg = LatentAutoencoderConfig(
            name="latent_autoencoder",
            channels=tuple(config.get("block_out_channels", (64,))),
            layers_per_block=config.get("layers_per_block", 1),
            latent_channels=config.get("latent_channels", 4),
            norm_groups=config.get("norm_num_groups", 32),
            attention=config.get("mid_block_add_attention", True),
            quant_conv=config.get("use_quant_conv", True),
            pretrained=str(path),
        )
        size = config.get("sample_size", 256)
        size = size[0] if isinstance(size, list | tuple) else size
        module = cls(cfg, DataInfo(name="", channels=in_channels, image_size=int(size), num_classes=0))
        module.autoencoder.load_state_dict(loaded.net.state_dict())
        module.latent_scale.fill_(loaded.scaling_factor)
        module.latent_shift.fill_(loaded.shift_factor)
        return module.eval().requires_grad_(False)


def load_latent_autoencoder(source: str | Path, map_location: str = "cpu") -> LatentAutoencoder:
    """A frozen latent autoencoder from an ``lgen train`` checkpoint or a diffusers-layout folder/file."""
    from lightning_gen.checkpoint import load_checkpoint
    from lightning_gen.methods.base import load_method

    path = Path(source).expanduser()
    if path.is_dir() or path.suffix in (".safetensors", ".bin"):
        return LatentAutoencoder.from_pretrained(path)
    name = load_checkpoint(path, map_location).get("hyper_parameters", {}).get("method")
    if name != "latent_autoencoder":
        raise ConfigError(
            f"{path} is a {name} checkpoint, not a latent autoencoder: train one with "
            f"method=latent_autoencoder, or give a diffusers AutoencoderKL folder"
        )
    return load_method(str(path), map_location).requires_grad_(False)


def frozen_autoencoder(
    latents: str, data: DataInfo, given: LatentAutoencoder | None = None
) -> LatentAutoencoder:
    """The frozen autoencoder of ``method.latents=<latents>`` for a model trained on ``data``: read from
    ``ckpt:<path>`` unless ``given``; checked against ``data``; every problem a one-line ConfigError."""
    where = f"method.latents={latents}"
    if given is None:
        if latents == "stage1":
            raise ConfigError(
                f"{where} names the experiment's stage-1 autoencoder, which `lgen train` resolves; "
                "elsewhere give ckpt:<checkpoint>"
            )
        if not latents.startswith("ckpt:"):
            raise ConfigError(
                f"{where}: give ckpt:<latent_autoencoder checkpoint or diffusers AutoencoderKL folder>, "
                "or stage1 (the experiment's stage-1 autoencoder)"
            )
        path = Path(latents.removeprefix("ckpt:")).expanduser()
        if not path.exists():
            raise ConfigError(
                f"{where}: no such file or folder. Train one (lgen train experiment=latent_autoencoder_digits) "
                "and name its checkpoint, or run an experiment whose stage1 section trains it first"
            )
        given = load_latent_autoencoder(path)
    given.check_data(data, f"the autoencoder of {where}")
    return given.frozen()
