"""What the autoencoders of latent diffusion and VQGAN share: a reconstruction loss and a patch discriminator.

    L_AE = L_rec(x, x^) + (the autoencoder's own terms: KL, commitment) + [disc on] lambda * disc_weight * L_G
    L_rec = sum over pixels of |x - x^| (l1) or (x - x^)^2 (l2), averaged over the batch
    L_G = -mean D(x^)                                      (hinge generator loss)
    L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x^)))  (hinge discriminator loss)
    lambda = ||grad_{w_L} L_rec|| / (||grad_{w_L} L_G|| + 1e-4)   (adaptive weight, Esser et al. 2021)

with w_L the decoder's last conv weight: the GAN term is rescaled so that its gradient at the output
is as large as the reconstruction's, whatever the scale of either loss. The discriminator (a PatchGAN,
Isola et al. 2017) restores the texture a pixel loss blurs. It is switched on after
``disc_start_epochs`` of training, once reconstructions are reasonable: before that neither D nor the
GAN term trains. Two optimizers, stepped by hand: the autoencoder's, then the discriminator's.

A subclass builds ``self.autoencoder`` (with ``last_layer``) and ``self.discriminator``
(``build_discriminator``), and writes ``autoencoder_loss(x) -> (x^, L_rec, L_AE without the GAN term)``;
its ``training_step`` is then ``self.adversarial_step(x, self.autoencoder_loss)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lightning_gen.config import bounded, choice
from lightning_gen.losses.gan import adaptive_weight, hinge_discriminator_loss, hinge_generator_loss
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod
from lightning_gen.nets.patch_discriminator import PatchDiscriminator
from lightning_gen.randomness import isolated


@dataclass
class GANAutoencoderConfig(GenerativeConfig):
    reconstruction: str = choice("l1", "l1", "l2")
    disc_start_epochs: float = bounded(
        1.0, 0, hint="epochs of training before the discriminator is switched on"
    )
    disc_weight: float = bounded(0.5, 0)  # multiplies the adaptive weight
    disc_width: int = bounded(64, 1)
    disc_layers: int = bounded(2, 1, hint="stride-2 convs of the PatchGAN; 3 is the paper's 70-px patch")
    disc_lr: float | None = bounded(None, 0)  # defaults to lr
    adaptive_weight_max: float = bounded(1e4, 0)  # the adaptive weight is clamped to [0, this] (LDM: 1e4)
    # Adam with LDM's betas; LDM scales 4.5e-6 per image of the global batch, i.e. 4.5e-4 at batch 96
    optimizer: str = choice("adam", "adam", "adamw", "sgd", "lars")
    lr: float = bounded(4.5e-4, 0)
    betas: tuple[float, float] = (0.5, 0.9)
    ema_decay: float = 0.0  # optional EMA of the autoencoder (then it encodes and decodes)


class GANAutoencoder(GenerativeMethod):
    """Base of the autoencoders trained with a reconstruction loss and a PatchGAN (not registered itself)."""

    is_generative = False  # it reconstructs; sampling is the prior's (diffusion, token model) job
    monitor = ("val/loss", "min")  # the validation reconstruction error
    ddp_find_unused_parameters = True  # the D step leaves the autoencoder without gradients and vice versa
    embed_value_range = "symmetric"

    def build_discriminator(self) -> None:
        self.automatic_optimization = False
        self.discriminator = PatchDiscriminator(
            self.data_info.channels, self.cfg.disc_width, self.cfg.disc_layers
        )

    def architecture(self) -> dict:
        """Config and data that rebuild this module without its file (the weights come from a state dict)."""
        return {"cfg": dataclasses.asdict(self.cfg), "data": dataclasses.asdict(self.data_info)}

    @classmethod
    def from_architecture(cls, architecture: dict):
        return cls(architecture["cfg"], architecture["data"]).frozen()

    def frozen(self):
        """As a model on its latents keeps it: eval mode, no gradients, no discriminator (only training uses it)."""
        self.discriminator = None
        return self.eval().requires_grad_(False)

    def compile_networks(self) -> list[str]:
        for net in (self.autoencoder.encoder, self.autoencoder.decoder, self.discriminator):
            net.compile()
        return ["autoencoder.encoder", "autoencoder.decoder", "discriminator"]

    def configure_optimizers(self):
        lr = self.scaled_lr()
        d_lr = self.scaled_lr(self.cfg.disc_lr) if self.cfg.disc_lr is not None else lr
        ae = self.build_optimizer(self.parameter_groups({"ae": self.autoencoder}, lr, self.cfg.weight_decay))
        d = self.build_optimizer(
            self.parameter_groups({"d": self.discriminator}, d_lr, self.cfg.weight_decay)
        )
        return [ae, d]

    def discriminator_on(self, batch_idx: int) -> bool:
        """Whether the discriminator trains at this batch: after ``disc_start_epochs`` of training progress
        (``schedules.training_progress``: data seen, the same on any world size)."""
        progress = self.progress()
        return progress.step >= progress.steps(self.cfg.disc_start_epochs)

    def reconstruction_loss(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Summed over pixels, averaged over the batch (LDM's scale, against which kl_weight is set)."""
        error = reconstruction.float() - x.float()
        error = error.abs() if self.cfg.reconstruction == "l1" else error.square()
        return error.flatten(1).sum(1).mean()

    def adversarial_step(self, x: torch.Tensor, autoencoder_loss, batch_idx: int) -> None:
        """One manual step of the autoencoder (its loss plus the GAN term once D is on), then one of D."""
        ae_opt, d_opt = self.optimizers()
        gan_on = self.discriminator_on(batch_idx)

        self.toggle_optimizer(ae_opt)
        reconstruction, rec, loss = autoencoder_loss(x)
        if gan_on:
            g_loss = hinge_generator_loss(self.discriminator(reconstruction).float())
            weight = self.cfg.disc_weight * adaptive_weight(
                rec, g_loss, self.autoencoder.last_layer, max_weight=self.cfg.adaptive_weight_max
            )
            loss = loss + weight * g_loss
            self.log("train/g_loss", g_loss, on_step=True, on_epoch=True)
            self.log("train/disc_weight", weight, on_step=True, on_epoch=True)
        ae_opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        ae_opt.step()
        self.update_ema()  # manual optimisation: Lightning's optimizer_step hook does not run
        self.untoggle_optimizer(ae_opt)

        if gan_on:
            self.toggle_optimizer(d_opt)
            d_loss = hinge_discriminator_loss(
                self.discriminator(x).float(), self.discriminator(reconstruction.detach()).float()
            )
            d_opt.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            d_opt.step()
            self.untoggle_optimizer(d_opt)
            self.log("train/d_loss", d_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/reconstruction", rec / x[0].numel(), on_step=True, on_epoch=True)

    def log_reconstruction(self, x: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Validation: the reconstruction loss per pixel and the PSNR of the [0, 1] images."""
        reconstruction = reconstruction.float()
        # PSNR of [0, 1] images; in [-1, 1] the squared error is 4x larger
        mse = ((reconstruction.clamp(-1, 1) - x.float()) / 2).square().flatten(1).mean(1)
        psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean()
        self.log("val/loss", self.reconstruction_loss(x, reconstruction) / x[0].numel(), sync_dist=True)
        self.log("val/psnr", psnr, sync_dist=True, prog_bar=True)

    def reference_images(self, count: int) -> torch.Tensor | None:
        """The first ``count`` images of the train split in order (read once, drawing no randomness): the
        same images on every rank, for statistics that every rank must compute alike (latent scale,
        decoder noise). None outside a fit."""
        cached = getattr(self, "_reference_images", None)
        if cached is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "eval_dataloader"):
                return None
            images, seen = [], 0
            with isolated():  # a DataLoader draws its base seed from the global generator
                for batch in datamodule.eval_dataloader("train"):
                    images.append(batch["image"])
                    seen += len(batch["image"])
                    if seen >= count:
                        break
            cached = self._reference_images = torch.cat(images)[:count]
        return cached
