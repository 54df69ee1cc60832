"""Relative patch location (Doersch, Gupta & Efros 2015).

Cut a 3x3 grid of patches out of the image, with a gap between them and a random jitter of each
patch inside its cell, so that the task cannot be solved by continuing lines or textures across
the border. Take the centre patch and one of its eight neighbours; the *same* encoder embeds both
(a late-fusion siamese network), their features are concatenated and a small MLP classifies
where the neighbour lies (8-way):

    L = -log p_theta(k | f(x_centre), f(x_neighbour_k)),   k ~ U{0..7}.

The representation of a whole image is the concatenation of the encoder features of its nine
patches in grid order (no jitter), i.e. what the encoder learned to describe, laid out in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.device_constants import device_constant
from lightning_gen.methods.ssl.pretext import (
    CENTRE,
    NEIGHBOURS,
    PretextConfig,
    PretextMethod,
    TileGrid,
    classifier_head,
    cross_entropy_with_accuracy,
    extract_tiles,
    normalize_tiles,
)
from lightning_gen.nets.backbones import build_backbone
from lightning_gen.registry import register_method


@dataclass
class RelativePatchConfig(PretextConfig):
    tile_size: int = 0  # 0: the largest power of two that fits a cell with the gap
    gap: int = -1  # pixels between neighbouring patches; -1: about a sixth of a cell
    jitter: bool = True  # random position of each patch inside its cell
    normalize_patches: bool = True  # per-patch mean/std: removes brightness cues
    head_hidden: int = 512  # fc layers after the concatenated pair (Doersch: fc6-fc8)


@register_method("relative_patch", RelativePatchConfig)
class RelativePatch(PretextMethod):
    """Relative patch location: classify which of the 8 neighbours a patch is, given the centre patch."""

    config_class = RelativePatchConfig

    def __init__(self, cfg: RelativePatchConfig, data=None):
        super().__init__(cfg, data)
        info = self.data_info
        self.grid = TileGrid(info.image_size, 3, self.cfg.tile_size, self.cfg.gap)
        self.backbone = build_backbone(self.cfg.backbone, info.channels, self.grid.tile)
        self.head = classifier_head(2 * self.backbone.out_dim, len(NEIGHBOURS), self.cfg.head_hidden)
        self.setup_online_probe(self.grid.num_tiles * self.backbone.out_dim)

    def tiles(self, x: torch.Tensor, jitter: bool) -> torch.Tensor:
        tiles = extract_tiles(x, self.grid, jitter)
        return normalize_tiles(tiles) if self.cfg.normalize_patches else tiles

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tiles = self.tiles(x, jitter=False)
        features = self.backbone(tiles.flatten(0, 1))
        return features.view(len(x), -1)

    def pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centre patches, neighbour patches, labels): label k means the neighbour is NEIGHBOURS[k]."""
        tiles = self.tiles(x, jitter=self.cfg.jitter and self.training)
        labels = torch.randint(0, len(NEIGHBOURS), (len(x),), device=x.device)
        neighbour_index = device_constant(NEIGHBOURS, x.device, torch.long)[labels]
        batch = torch.arange(len(x), device=x.device)
        return tiles[:, CENTRE], tiles[batch, neighbour_index], labels

    def pretext_loss(self, x, stage):
        centre, neighbour, labels = self.pairs(x)
        features = self.backbone(torch.cat([centre, neighbour]))  # one pass: BatchNorm sees both
        pair = torch.cat(features.chunk(2), dim=1)
        return cross_entropy_with_accuracy(self.head(pair), labels)
