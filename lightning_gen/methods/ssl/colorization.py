"""Colorization (Zhang, Isola & Efros 2016) and the split-brain autoencoder (Zhang et al. 2017).

The image is converted to CIE Lab. The network sees only the lightness L (X in R^{HxWx1}) and
predicts the colour channels ab (Y in R^{HxWx2}); it can only do so by recognising what is in the
picture (grass is green, sky is blue). Colour prediction is multimodal, so by default it is a
per-pixel *classification* over Q quantised ab bins, with soft-encoded targets Z and class
rebalancing weights v (rare saturated colours weigh more, else the output is grey-brown):

    L_cl = -1/P sum_pixels v(argmax Z_p) sum_q Z_{p,q} log softmax(logits_p)_q

and decoded with the annealed mean (T = 0.38). ``loss: regression`` is the plain L2 on ab.
The bin prior behind v is counted from the training data as it streams by (summed over DDP
ranks, kept in the checkpoint); before any count it is uniform and v = 1.

Split-brain (``split_brain: true``): a second network predicts L from ab (classification over
``l_bins`` lightness bins, or L2), and the representation is the concatenation of both encoders'
features, so that each half has learned from the channels the other could not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_gen import distributed
from lightning_gen.config import bounded, choice
from lightning_gen.methods.ssl.color import (
    ab_gamut_bins,
    annealed_mean,
    lab_to_rgb,
    rebalancing_weights,
    rgb_to_lab,
    soft_encode,
)
from lightning_gen.methods.ssl.pretext import EncoderDecoder, PretextConfig, PretextMethod
from lightning_gen.nets.deterministic import cross_entropy_map
from lightning_gen.registry import register_method

AB_SCALE = 110.0  # |a|, |b| <= ~110 for sRGB colours


@dataclass
class ColorizationConfig(PretextConfig):
    loss: str = choice("classification", "classification", "regression")
    split_brain: bool = False  # also predict L from ab; represent with both encoders
    ab_step: float = bounded(10.0, 0, low_open=True)  # width of the ab bins
    soft_neighbours: int = 5  # soft-encoding: the k nearest bins ...
    soft_sigma: float = bounded(5.0, 0, low_open=True)  # ... with Gaussian weights of this width
    rebalance: bool = True
    rebalance_mix: float = bounded(0.5, 0, 1)  # lambda: mix of the empirical prior with the uniform one
    temperature: float = bounded(0.38, 0, low_open=True)  # annealed-mean decoding
    l_bins: int = 50  # split-brain ab -> L classes
    decoder_width: int = 32


@register_method("colorization", ColorizationConfig)
class Colorization(PretextMethod):
    """Colorization: predict Lab ab from L (rebalanced ab-bin classification or L2); split-brain option."""

    config_class = ColorizationConfig
    input_range = "unit"

    def __init__(self, cfg: ColorizationConfig, data=None):
        super().__init__(cfg, data)
        info, cfg = self.data_info, self.cfg
        if info.channels != 3:
            raise ValueError(
                f"colorization needs colour images but {info.name!r} has {info.channels} channel(s): "
                f"use data=color_digits (digits tinted in colour), cifar10, stl10 or a colour image folder"
            )
        self.register_buffer("ab_centres", ab_gamut_bins(cfg.ab_step).clone())
        self.register_buffer("ab_counts", torch.zeros(len(self.ab_centres)))
        classify = cfg.loss == "classification"
        self.l_to_ab = EncoderDecoder(
            cfg.backbone, 1, len(self.ab_centres) if classify else 2, info.image_size, cfg.decoder_width
        )
        feature_dim = self.l_to_ab.out_dim
        if cfg.split_brain:
            self.ab_to_l = EncoderDecoder(
                cfg.backbone, 2, cfg.l_bins if classify else 1, info.image_size, cfg.decoder_width
            )
            feature_dim += self.ab_to_l.out_dim
        self.setup_online_probe(feature_dim)

    # ------------------------------------------------------------------ channels
    @staticmethod
    def lab(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB in [0, 1] -> (L in [0, 100] (N, 1, H, W), ab (N, 2, H, W)), always in float32."""
        with torch.autocast(x.device.type, enabled=False):
            lab = rgb_to_lab(x.float())
        return lab[:, :1], lab[:, 1:]

    @staticmethod
    def l_input(lightness: torch.Tensor) -> torch.Tensor:
        return lightness / 50.0 - 1.0

    @staticmethod
    def ab_input(ab: torch.Tensor) -> torch.Tensor:
        return ab / AB_SCALE

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        lightness, ab = self.lab(x)
        features = self.l_to_ab.encode(self.l_input(lightness))
        if self.cfg.split_brain:
            features = torch.cat([features, self.ab_to_l.encode(self.ab_input(ab))], dim=1)
        return features

    # ------------------------------------------------------------------ L -> ab
    def ab_loss(self, output: torch.Tensor, ab: torch.Tensor, stage: str) -> torch.Tensor:
        if self.cfg.loss == "regression":
            return F.mse_loss(output.float(), self.ab_input(ab))
        logits = output.float().permute(0, 2, 3, 1).reshape(-1, len(self.ab_centres))
        target = soft_encode(
            ab.permute(0, 2, 3, 1).reshape(-1, 2),
            self.ab_centres,
            self.cfg.soft_neighbours,
            self.cfg.soft_sigma,
        )
        cross_entropy = -(target * F.log_softmax(logits, dim=1)).sum(1)
        if not self.cfg.rebalance:
            return cross_entropy.mean()
        if stage == "train":
            with torch.no_grad():  # the prior counts every rank's pixels, so all ranks weigh alike
                self.ab_counts += distributed.all_reduce_mean(target.sum(0)) * distributed.world_size()
        weights = rebalancing_weights(
            self.ab_counts, self.ab_centres, self.cfg.rebalance_mix, self.cfg.soft_sigma
        )
        return (weights[target.argmax(1)] * cross_entropy).mean()

    def predict_ab(self, lightness: torch.Tensor) -> torch.Tensor:
        output = self.l_to_ab(self.l_input(lightness))
        if self.cfg.loss == "regression":
            return output.float() * AB_SCALE
        return annealed_mean(output, self.ab_centres, self.cfg.temperature)

    # ------------------------------------------------------------------ ab -> L (split-brain)
    def l_loss(self, output: torch.Tensor, lightness: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "regression":
            return F.mse_loss(output.float(), self.l_input(lightness))
        target = (lightness[:, 0] / 100.0 * self.cfg.l_bins).long().clamp(0, self.cfg.l_bins - 1)
        return cross_entropy_map(output.float(), target)  # deterministic under trainer.deterministic

    def predict_l(self, ab: torch.Tensor) -> torch.Tensor:
        output = self.ab_to_l(self.ab_input(ab)).float()
        if self.cfg.loss == "regression":
            return (output + 1.0) * 50.0
        centres = (torch.arange(self.cfg.l_bins, device=ab.device) + 0.5) * (100.0 / self.cfg.l_bins)
        return torch.einsum("nkhw,k->nhw", output.softmax(1), centres)[:, None]

    # ------------------------------------------------------------------ objective
    def pretext_loss(self, x, stage):
        lightness, ab = self.lab(x)
        ab_loss = self.ab_loss(self.l_to_ab(self.l_input(lightness)), ab, stage)
        if not self.cfg.split_brain:
            return ab_loss, {}
        l_loss = self.l_loss(self.ab_to_l(self.ab_input(ab)), lightness)
        return ab_loss + l_loss, {"ab_loss": ab_loss, "l_loss": l_loss}

    @torch.no_grad()
    def images_for_logging(self, batch):
        x = self.to_float(batch["image"][:32], "unit")
        lightness, ab = self.lab(x)
        shown = {
            "input": x,
            "grey": lab_to_rgb(torch.cat([lightness, torch.zeros_like(ab)], 1)),
            "colorized": lab_to_rgb(torch.cat([lightness, self.predict_ab(lightness)], 1)),
        }
        if self.cfg.split_brain:
            shown["lightness_from_ab"] = lab_to_rgb(torch.cat([self.predict_l(ab), ab], 1))
        return shown
