"""Jigsaw puzzles (Noroozi & Favaro 2016).

Cut the image into a 3x3 grid of tiles (gap and jitter between them), shuffle the tiles with one
permutation out of a fixed set of P, and classify *which* permutation was used (P-way). Each tile
goes through the same encoder on its own (the "context-free network": no tile sees another
before the features are concatenated in shuffled order), then an MLP predicts the index:

    L = -log p_theta(p | [f(t_{pi_p(1)}), ..., f(t_{pi_p(9)})]),   p ~ U{0..P-1}.

The permutation set is chosen for maximal Hamming distance between its members, so that the
classes are not near-duplicates. It is computed once from ``permutation_seed``, stored as a
buffer (hence in every checkpoint), written to ``<run_dir>/jigsaw_permutations.json`` and checked
to be identical on every DDP rank before training starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_gen import distributed
from lightning_gen.methods.ssl.pretext import (
    PretextConfig,
    PretextMethod,
    TileGrid,
    classifier_head,
    cross_entropy_with_accuracy,
    extract_tiles,
    maximal_hamming_permutations,
    normalize_tiles,
)
from lightning_gen.nets.backbones import build_backbone
from lightning_gen.registry import register_method


@dataclass
class JigsawConfig(PretextConfig):
    grid: int = 3
    num_permutations: int = 100  # the paper's best is 1000 on ImageNet
    permutation_seed: int = 0
    tile_size: int = 0  # 0: the largest power of two that fits a cell with the gap
    gap: int = -1  # -1: about a sixth of a cell
    jitter: bool = True
    normalize_tiles: bool = True  # per-tile mean/std, against low-level matching cues
    head_hidden: int = 512


@register_method("jigsaw", JigsawConfig)
class Jigsaw(PretextMethod):
    """Jigsaw puzzles: classify which of P maximal-Hamming permutations shuffled the 3x3 tiles."""

    config_class = JigsawConfig

    def __init__(self, cfg: JigsawConfig, data=None):
        super().__init__(cfg, data)
        info = self.data_info
        self.grid = TileGrid(info.image_size, self.cfg.grid, self.cfg.tile_size, self.cfg.gap)
        perms = maximal_hamming_permutations(
            self.cfg.num_permutations, self.grid.num_tiles, self.cfg.permutation_seed
        )
        self.register_buffer("permutations", perms.clone())
        self.backbone = build_backbone(self.cfg.backbone, info.channels, self.grid.tile)
        feature_dim = self.grid.num_tiles * self.backbone.out_dim
        self.head = classifier_head(feature_dim, self.cfg.num_permutations, self.cfg.head_hidden)
        self.setup_online_probe(feature_dim)

    def tiles(self, x: torch.Tensor, jitter: bool) -> torch.Tensor:
        tiles = extract_tiles(x, self.grid, jitter)
        return normalize_tiles(tiles) if self.cfg.normalize_tiles else tiles

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, T, C, t, t) -> (N, T * D): each tile encoded alone, features concatenated in order."""
        return self.backbone(tiles.flatten(0, 1)).view(len(tiles), -1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.tile_features(self.tiles(x, jitter=False))

    def shuffle(self, tiles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Position j of puzzle i holds tile permutations[labels[i], j]."""
        order = self.permutations[labels]  # (N, T)
        batch = torch.arange(len(tiles), device=tiles.device)[:, None]
        return tiles[batch, order]

    def pretext_loss(self, x, stage):
        labels = torch.randint(0, len(self.permutations), (len(x),), device=x.device)
        puzzles = self.shuffle(self.tiles(x, jitter=self.cfg.jitter and self.training), labels)
        return cross_entropy_with_accuracy(self.head(self.tile_features(puzzles)), labels)

    def on_fit_start(self) -> None:
        # The set is a pure function of the seed; this guards against any rank computing another.
        gathered = distributed.gather_no_grad(self.permutations[None])
        if not bool((gathered == gathered[:1]).all()):
            raise RuntimeError("jigsaw permutation sets differ between DDP ranks; they must be identical")
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "jigsaw_permutations.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps(
                    {
                        "seed": self.cfg.permutation_seed,
                        "grid": self.cfg.grid,
                        "min_hamming_distance": min_pairwise_hamming(self.permutations),
                        "permutations": self.permutations.tolist(),
                    }
                )
                + "\n"
            )


def min_pairwise_hamming(perms: torch.Tensor) -> int:
    if len(perms) < 2:
        return 0
    distance = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    distance.fill_diagonal_(perms.shape[1] + 1)
    return int(distance.min())
