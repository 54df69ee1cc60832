"""Masked autoencoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Split the image into non-overlapping patches and mask a large random subset (75%). The ViT
encoder runs on the *visible* patches only (no mask tokens: a quarter of the tokens, hence cheap),
a light decoder gets the encoded visible tokens plus a shared learned mask token at every masked
position (with position embeddings), and predicts the pixels of every patch. The loss is the MSE
on the masked patches only, against per-patch normalised pixels (each target patch minus its
mean, over its std), which the paper found gives better representations:

    L = 1/|M| sum_{i in M} || dec(enc(x_visible))_i - (x_i - mean(x_i)) / std(x_i) ||^2 / (p^2 C)

Each training image is first cut by a random resized crop of 20-100 % of its area and flipped
horizontally with probability 0.5 (``crop_scale``, ``flip_p``: facebookresearch/mae ``main_pretrain.py``).
The encoder and decoder are initialised as ``models_mae.py`` does (``backbone.vit_init: mae``: Xavier
linears, the patch projection as a linear map, LayerNorm eps 1e-6, fixed sine-cosine positions).

The decoder is thrown away afterwards; ``embed`` runs the encoder on all patches of the image and
returns the [CLS] token, as the official linear probe does (``embed_pool: mean`` averages the patch
tokens instead, the pooling of its fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_gen.config import bounded, choice
from lightning_gen.data.views import random_resized_crop
from lightning_gen.methods.ssl.pretext import PretextConfig, PretextMethod, random_patch_mask
from lightning_gen.nets.backbones import BackboneConfig, build_backbone
from lightning_gen.nets.vit import Block, VisionTransformer, init_transformer_layers, position_embedding
from lightning_gen.registry import register_method


def _mae_vit() -> BackboneConfig:
    return BackboneConfig(name="vit", pos_embed="sincos", vit_init="mae")


@dataclass
class MAEConfig(PretextConfig):
    backbone: BackboneConfig = field(default_factory=_mae_vit)
    mask_ratio: float = bounded(0.75, 0, 1, low_open=True, high_open=True)  # of the patches
    # pre-training augmentation (main_pretrain.py): random resized crop of this area fraction, then a flip
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_p: float = bounded(0.5, 0, 1)
    decoder_width: int = 128  # paper: 512 (with a 768-1280 wide encoder)
    decoder_depth: int = 2  # paper: 8; the decoder is < 10% of the encoder's compute per token
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # per-patch normalised targets
    # the representation: the [CLS] token, as the official linear probe (main_linprobe.py --cls_token), or the
    # mean of the patch tokens (its fine-tuning's global pool)
    embed_pool: str = choice("cls", "mean", "cls")
    optimizer: str = "adamw"
    lr: float = 1.5e-4  # x global batch / 256 (paper)
    lr_scaling: str = "linear"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05


def patch_pixels(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (N, C, H, W) -> pixels of each patch (N, L, p*p*C), patches in raster order like the ViT's."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatch_pixels(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    n, length, _ = patches.shape
    side = int(round(length**0.5))
    x = patches.reshape(n, side, side, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, side * patch, side * patch)


class MAEDecoder(nn.Module):
    """Light transformer: encoded visible tokens + mask tokens back in place -> pixels of every patch."""

    def __init__(
        self,
        encoder_width: int,
        num_patches: int,
        patch_dim: int,
        width: int,
        depth: int,
        heads: int,
        pos_embed: str = "learned",
        layer_norm_eps: float = 1e-6,
        init: str = "torch",
    ):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = position_embedding(pos_embed, int(round(num_patches**0.5)), width)
        self.blocks = nn.ModuleList(Block(width, heads, layer_norm_eps=layer_norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.predict = nn.Linear(width, patch_dim)
        init_transformer_layers(self, init)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """``encoded`` (N, 1 + V, D_enc), [CLS] first; ``keep`` (N, V): positions of the visible patches."""
        tokens = self.embed(encoded)
        n, width = len(tokens), tokens.shape[-1]
        full = self.mask_token.to(tokens.dtype).expand(n, num_patches, width).clone()  # bf16 autocast
        full.scatter_(1, keep[..., None].expand(-1, -1, width), tokens[:, 1:])
        x = torch.cat([tokens[:, :1], full], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))[:, 1:]


@register_method("mae", MAEConfig)
class MAE(PretextMethod):
    """Masked autoencoder: ViT encoder on the 25% visible patches, light decoder, MSE on masked patches."""

    config_class = MAEConfig

    def __init__(self, cfg: MAEConfig, data=None):
        super().__init__(cfg, data)
        info, cfg = self.data_info, self.cfg
        self.encoder = build_backbone(cfg.backbone, info.channels, info.image_size)
        if not isinstance(self.encoder, VisionTransformer):
            raise ValueError(f"MAE needs a ViT encoder (method.backbone.name=vit), got {cfg.backbone.name!r}")
        self.patch = self.encoder.patch_size
        self.decoder = MAEDecoder(
            self.encoder.out_dim,
            self.encoder.num_patches,
            self.patch**2 * info.channels,
            cfg.decoder_width,
            cfg.decoder_depth,
            cfg.decoder_heads,
            cfg.backbone.pos_embed,  # the decoder's embeddings are of the encoder's kind, as in the paper
            cfg.backbone.layer_norm_eps,
            cfg.backbone.vit_init,
        )
        self.setup_online_probe(self.encoder.out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_tokens(self.encoder.patchify(x))
        return tokens[:, 0] if self.cfg.embed_pool == "cls" else tokens[:, 1:].mean(1)

    def encode_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Only the visible patch tokens enter the encoder (gathered *after* patch + position embedding)."""
        tokens = self.encoder.patchify(x)
        visible = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        return self.encoder.forward_tokens(visible)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        target = patch_pixels(x.float(), self.patch)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def draw_mask(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's random draw: which patches of each image stay visible (``keep``) and which are masked."""
        return random_patch_mask(n, self.encoder.num_patches, self.cfg.mask_ratio, device)

    def forward_mae(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep, mask = self.draw_mask(len(x), x.device)
        prediction = self.decoder(self.encode_visible(x, keep), keep, self.encoder.num_patches)
        return prediction, mask, keep

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-training crop and flip, per sample, at the input's size."""
        return random_resized_crop(x, x.shape[-1], self.cfg.crop_scale, (3 / 4, 4 / 3), self.cfg.flip_p)

    def pretext_loss(self, x, stage):
        if stage == "train":
            x = self.augment(x)
        prediction, mask, _ = self.forward_mae(x)
        per_patch = (prediction.float() - self.targets(x)).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum(), {}

    @torch.no_grad()
    def images_for_logging(self, batch):
        x = self.to_float(batch["image"][:32], self.input_range)
        prediction, mask, _ = self.forward_mae(x)
        pixels = patch_pixels(x.float(), self.patch)
        if self.cfg.norm_pix_loss:  # show predictions in the scale of the patch they replace
            mean, std = pixels.mean(-1, keepdim=True), (pixels.var(-1, keepdim=True) + 1e-6).sqrt()
            prediction = prediction * std + mean
        m = mask[..., None].float()
        channels = x.shape[1]
        mean_ = torch.tensor(self.data_info.mean, device=x.device).view(1, -1, 1, 1)
        std_ = torch.tensor(self.data_info.std, device=x.device).view(1, -1, 1, 1)
        to_unit = lambda t: (unpatch_pixels(t, self.patch, channels) * std_ + mean_).clamp(0, 1)
        return {
            "input": to_unit(pixels),
            "masked": to_unit(pixels * (1 - m)),
            "reconstruction": to_unit(pixels * (1 - m) + prediction * m),
        }
