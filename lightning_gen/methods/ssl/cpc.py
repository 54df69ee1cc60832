"""Contrastive Predictive Coding on images (van den Oord et al. 2018; Hénaff et al. 2020).

The image is cut into a grid of overlapping patches (50% overlap, ``grid`` x ``grid``); every
patch is encoded on its own, z_ij = g_enc(x_ij) (the backbone). A context network g_ar sees only
the rows at and above i ("use top rows as context to predict bottom rows"): a stack of
vertically causal convolutions gives c_ij. For every offset k = 1..``pred_steps`` the score of a
candidate code z is s_k(z, c_ij) = zᵀ W_k c_ij, and InfoNCE asks c_ij to pick the true future
z_(i+k)j among the codes of all positions and all images of the global batch: under DDP the
codes of every rank are negatives, gathered with gradient, so N processes train exactly as one
process on the concatenated batch does (apart from BatchNorm statistics). The representation is
the patch codes z averaged over the grid.

``patch_jitter`` adds the spatial half of CPC v2's patch augmentation (Hénaff et al. 2020): while
training, every patch is cut at its own random offset, so the overlap between a patch and the one
below no longer lets exact pixel matching solve the task (on digits this is the difference between
codes below a random encoder and clearly above it, docs/results-digits.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import bounded, choice
from lightning_gen.data.views import CropConfig, ViewsConfig
from lightning_gen.losses.contrastive import info_nce
from lightning_gen.methods.ssl.common import SSLConfig, SSLMethod
from lightning_gen.nets.backbones import BackboneConfig, build_backbone
from lightning_gen.registry import register_method


def _cpc_views() -> ViewsConfig:
    return ViewsConfig(
        recipe="moco_v1", global_crops=CropConfig(n=1, scale=(0.6, 1.0), jitter_p=0.0, grayscale_p=0.0)
    )


@dataclass
class CPCConfig(SSLConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="conv"))
    views: ViewsConfig = field(default_factory=_cpc_views)
    optimizer: str = choice("adam", "adam", "adamw", "sgd", "lars")
    lr: float = 2e-4
    grid: int = 7  # patches per side (50% overlap: patch side = 2 * image / (grid + 1))
    pred_steps: int = 5  # predict rows i+1 .. i+pred_steps (CPC v1: "up to five rows")
    context_dim: int = 256
    context_layers: int = 3
    temperature: float = bounded(1.0, 0, low_open=True)
    # CPC v2's patch augmentation, spatial part: while training every patch is cut at its own random
    # offset of up to this many pixels, so the 50% overlap no longer lets pixel matching solve the task
    patch_jitter: int = 0


class CausalRowConv(nn.Module):
    """Conv over the (rows, cols) grid whose output at row i sees rows <= i only (pad the top)."""

    def __init__(self, cin: int, cout: int, height: int = 2, width: int = 3):
        super().__init__()
        self.pad = (width // 2, width // 2, height - 1, 0)
        self.conv = nn.Conv2d(cin, cout, (height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


@register_method("cpc", CPCConfig)
class CPC(SSLMethod):
    """CPC: patch codes, a top-to-bottom context network, InfoNCE on future rows of patches."""

    config_class = CPCConfig

    def __init__(self, cfg: CPCConfig, data=None):
        super().__init__(cfg, data)
        cfg = self.cfg  # a dataclass even when rebuilt from a checkpoint's dict
        size = self.data_info.image_size
        self.patch = 2 * size // (cfg.grid + 1)
        self.stride = self.patch // 2
        if (
            cfg.grid < cfg.pred_steps + 1
            or self.patch < 4
            or (cfg.grid - 1) * self.stride + self.patch > size
        ):
            raise ValueError(
                f"CPC grid {cfg.grid} with {cfg.pred_steps} prediction steps does not fit {size}px images: "
                f"need grid > pred_steps and patches of >= 4 px (patch side = 2 * image / (grid + 1))"
            )
        if not 0 <= cfg.patch_jitter < self.patch:
            raise ValueError(
                f"method.patch_jitter={cfg.patch_jitter} must be between 0 and the patch side - 1 "
                f"({self.patch - 1} px for grid {cfg.grid} on {size}px images)"
            )
        # g_enc works on patches, so it is built for the patch size (replacing the image-size backbone).
        self.backbone = build_backbone(cfg.backbone, self.data_info.channels, self.patch)
        d = self.feature_dim
        layers: list[nn.Module] = [CausalRowConv(d, cfg.context_dim)]
        for _ in range(cfg.context_layers - 1):
            layers += [nn.ReLU(), CausalRowConv(cfg.context_dim, cfg.context_dim)]
        self.context = nn.Sequential(*layers)
        self.predictors = nn.ModuleList(
            nn.Conv2d(cfg.context_dim, d, 1, bias=False) for _ in range(cfg.pred_steps)
        )

    def patch_codes(self, x: torch.Tensor, jitter: int = 0) -> torch.Tensor:
        """(N, C, H, W) -> z (N, D, grid, grid); ``jitter`` > 0 moves every patch by its own random
        offset in [-jitter, jitter] pixels (edges replicated)."""
        n, c, g, p = x.shape[0], x.shape[1], self.cfg.grid, self.patch
        if jitter == 0:
            patches = x.unfold(2, p, self.stride).unfold(3, p, self.stride)[:, :, :g, :g]
            patches = patches.permute(0, 2, 3, 1, 4, 5)
        else:
            x = F.pad(x, (jitter,) * 4, mode="replicate")
            corner = torch.arange(g, device=x.device) * self.stride
            shift = torch.randint(0, 2 * jitter + 1, (2, n, g, g), device=x.device)
            top = (corner.view(1, g, 1) + shift[0]).unsqueeze(-1) + torch.arange(p, device=x.device)
            left = (corner.view(1, 1, g) + shift[1]).unsqueeze(-1) + torch.arange(p, device=x.device)
            image = torch.arange(n, device=x.device).view(n, 1, 1, 1, 1)
            # advanced indices around a slice: (N, g, g, p, p, C); the permute below puts C first
            patches = x[image, :, top.unsqueeze(-1), left.unsqueeze(-2)].permute(0, 1, 2, 5, 3, 4)
        patches = patches.reshape(n * g * g, c, p, p)
        return self.backbone(patches.contiguous()).view(n, g, g, -1).permute(0, 3, 1, 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_codes(x).mean((2, 3))

    def ssl_loss(self, views, batch):
        z = self.patch_codes(views[0], self.cfg.patch_jitter)
        c = self.context(z)
        losses = []
        for k, w_k in enumerate(self.predictors, start=1):
            pred = w_k(c[:, :, :-k])  # contexts of rows 0 .. G-1-k predict rows k .. G-1
            target = z[:, :, k:]
            queries = pred.permute(0, 2, 3, 1).reshape(-1, pred.shape[1])
            keys = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
            losses.append(info_nce(queries, keys, self.cfg.temperature))
        loss = torch.stack(losses).mean()
        return loss, z.mean((2, 3))
