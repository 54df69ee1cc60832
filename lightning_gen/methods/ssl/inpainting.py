"""Context encoders: learning by inpainting (Pathak et al. 2016).

A region M of the image is removed (M = 1 on missing pixels) and the network F reconstructs it
from the context (1 - M) * x:

    L_rec = || M * (x - F((1 - M) * x)) ||^2  / |M|          (mean over the missing pixels)
    L_adv = -log D(x_hat),   x_hat = (1 - M) * x + M * F((1 - M) * x)   (non-saturating, optional)
    L     = lambda_rec L_rec + lambda_adv L_adv              (Pathak: 0.999 / 0.001)

and the discriminator D learns -log D(x) - log(1 - D(x_hat)). L2 alone gives blurry but
correct fills; the adversarial term makes them sharper. The representation is the encoder's
pooled feature of the whole, unmasked image.

How the two players share one optimizer (our call): Lightning 2 runs one optimizer per step in
automatic optimisation. Rather than switching to manual optimisation (which would lose gradient
accumulation, clipping and the shared LR schedule), G's adversarial term is computed through a
*parameter-detached* view of D (``torch.func.functional_call``): D then receives gradients only
from its own loss, on a detached x_hat, and G only from L_rec and L_adv. One backward pass, one
optimizer step, the two updates simultaneous (both from the same weights), which is the usual
simultaneous-gradient GAN update, and DDP sees every parameter used exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_gen.config import bounded, choice
from lightning_gen.methods.ssl.pretext import EncoderDecoder, PretextConfig, PretextMethod, block_mask
from lightning_gen.nets.conv import ConvEncoder
from lightning_gen.registry import register_method


@dataclass
class InpaintingConfig(PretextConfig):
    mask: str = choice("centre", "centre", "random")  # centre square, or random rectangles
    mask_fraction: float = bounded(0.25, 0, 1, low_open=True, high_open=True)  # of the image area
    adversarial: bool = False
    rec_weight: float = bounded(0.999, 0)
    adv_weight: float = bounded(0.001, 0)
    disc_width: int = 32
    decoder_width: int = 32


@register_method("inpainting", InpaintingConfig)
class Inpainting(PretextMethod):
    """Context encoder: reconstruct a masked region (L2 on the hole, optional adversarial loss)."""

    config_class = InpaintingConfig

    def __init__(self, cfg: InpaintingConfig, data=None):
        super().__init__(cfg, data)
        info, cfg = self.data_info, self.cfg
        self.context_encoder = EncoderDecoder(
            cfg.backbone, info.channels, info.channels, info.image_size, cfg.decoder_width
        )
        if cfg.adversarial:
            self.discriminator = ConvEncoder(info.channels, info.image_size, 1, width=cfg.disc_width)
        self.setup_online_probe(self.context_encoder.out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.context_encoder.encode(x)

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        return block_mask(len(x), x.shape[-1], self.cfg.mask, self.cfg.mask_fraction, device=x.device).to(
            x.dtype
        )

    def inpaint(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw prediction, composite with the known context). Missing pixels enter as 0 = the data mean."""
        prediction = self.context_encoder(x * (1 - mask))
        return prediction, x * (1 - mask) + prediction * mask

    def pretext_loss(self, x, stage):
        mask = self.masks(x)
        prediction, composite = self.inpaint(x, mask)
        squared = (prediction.float() - x.float()).pow(2) * mask
        rec = squared.sum() / (mask.sum() * x.shape[1]).clamp(min=1)
        if not self.cfg.adversarial:
            return rec, {}
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_adv = F.softplus(-functional_call(self.discriminator, frozen, (composite,))).mean()  # -log D(x_hat)
        real, fake = self.discriminator(x), self.discriminator(composite.detach())
        d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()  # -log D(x) - log(1 - D(x_hat))
        loss = self.cfg.rec_weight * rec + self.cfg.adv_weight * g_adv + d_loss
        return loss, {"rec_loss": rec, "g_adv_loss": g_adv, "d_loss": d_loss}

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.data_info.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.data_info.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)

    @torch.no_grad()
    def images_for_logging(self, batch):
        x = self.to_float(batch["image"][:32], self.input_range)
        mask = self.masks(x)
        prediction, composite = self.inpaint(x, mask)
        shown_hole = self.to_unit(x) * (1 - mask) + 0.5 * mask  # the hole drawn in mid-grey
        return {
            "input": self.to_unit(x),
            "masked": shown_hole,
            "inpainted": self.to_unit(composite),
            "prediction": self.to_unit(prediction),
        }
