"""Shared machinery of the pretext-task methods: label generators and patch geometry.

Everything here is a pure tensor function (testable on its own) except ``PretextMethod``, the
small base class that the rotation, relative-patch, jigsaw, colorization, inpainting and MAE files
build on: a backbone from ``nets/backbones.py``, the online probe on the embedding of the *clean*
image, and the train/val step skeleton, so that each method file only writes its paper's loss.

Label generators (each returns the transformed input *and* the label that says what was done):

- ``rotate_all``: the four rotations of every image, labels 0..3 = k x 90 degrees counter-clockwise.
- ``extract_tiles`` + ``TileGrid``: a grid x grid layout of square tiles with a guaranteed gap and a
  random jitter inside each cell (relative patch location, jigsaw).
- ``NEIGHBOURS``: the eight neighbours of the centre cell of a 3x3 grid, in reading order.
- ``maximal_hamming_permutations``: the jigsaw permutation set, greedy maximal minimum Hamming
  distance, deterministic from its seed.
- ``block_mask`` / ``random_patch_mask``: the inpainting hole and the MAE patch mask.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.methods.base import Method, MethodConfig
from lightning_gen.nets.backbones import BackboneConfig, build_backbone
from lightning_gen.nets.conv import ConvDecoder

# ------------------------------------------------------------------------------------ rotation


def rotate_all(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of each image (RotNet feeds them in the same batch, Gidaris et al. 2018).

    Returns images (4N, C, H, W) ordered [all images at 0 deg, at 90, at 180, at 270] and labels
    (4N,) with label k meaning a rotation by k x 90 degrees counter-clockwise (``torch.rot90``).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotated, labels


# ------------------------------------------------------------------------------------ tiles


@dataclass(frozen=True)
class TileGrid:
    """A grid x grid layout of ``tile``-pixel tiles over an ``image_size`` image.

    Each cell is ``image_size // grid`` pixels; a tile sits inside its cell at offset
    ``gap // 2 + jitter`` with jitter in [0, max_jitter], so two neighbouring tiles are always at
    least ``gap`` pixels apart: the network cannot solve the task by continuing edges across the
    border (Doersch et al. 2015; Noroozi & Favaro 2016).
    """

    image_size: int
    grid: int = 3
    tile: int = 0  # 0: the largest power of two that fits in a cell with the gap
    gap: int = -1  # -1: about a sixth of a cell

    def __post_init__(self):
        cell = self.image_size // self.grid
        gap = max(1, round(cell / 6)) if self.gap < 0 else self.gap
        tile = self.tile or (2 ** int(math.log2(max(cell - gap, 1))))
        object.__setattr__(self, "gap", gap)
        object.__setattr__(self, "tile", tile)
        if tile + gap > cell:
            raise ValueError(
                f"tiles of {tile} px with a gap of {gap} px do not fit in the {cell} px cells of a "
                f"{self.grid}x{self.grid} grid over {self.image_size} px images: "
                f"lower method.tile_size / method.gap or raise data.image_size"
            )

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    @property
    def max_jitter(self) -> int:
        return self.cell - self.tile - self.gap

    @property
    def num_tiles(self) -> int:
        return self.grid * self.grid

    def offsets(self, n: int, jitter: bool, device=None, generator: torch.Generator | None = None):
        """Top-left corners (n, grid*grid) of every tile, rows then columns in reading order."""
        margin = (self.image_size - self.grid * self.cell) // 2
        cells = torch.arange(self.grid, device=device) * self.cell + margin + self.gap // 2
        rows = cells.repeat_interleave(self.grid).expand(n, -1)
        cols = cells.repeat(self.grid).expand(n, -1)
        if jitter and self.max_jitter > 0:
            shape, draw_on = (n, self.num_tiles), generator.device if generator is not None else device
            rows = rows + torch.randint(
                0, self.max_jitter + 1, shape, generator=generator, device=draw_on
            ).to(rows.device)
            cols = cols + torch.randint(
                0, self.max_jitter + 1, shape, generator=generator, device=draw_on
            ).to(cols.device)
        else:
            rows, cols = rows + self.max_jitter // 2, cols + self.max_jitter // 2
        return rows, cols


def crop(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample square crops: out[i] = x[i, :, tops[i]:tops[i]+size, lefts[i]:lefts[i]+size]."""
    steps = torch.arange(size, device=x.device)
    rows = (tops.to(x.device)[:, None] + steps)[:, :, None]  # (N, size, 1)
    cols = (lefts.to(x.device)[:, None] + steps)[:, None, :]  # (N, 1, size)
    batch = torch.arange(len(x), device=x.device)[:, None, None]
    return x[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # advanced dims first: (N, s, s, C)


def extract_tiles(x: torch.Tensor, grid: TileGrid, jitter: bool, generator: torch.Generator | None = None):
    """Tiles (N, grid*grid, C, tile, tile) in reading order: tile j is cell (j // grid, j % grid)."""
    if x.shape[-1] != grid.image_size or x.shape[-2] != grid.image_size:
        raise ValueError(
            f"images are {tuple(x.shape[-2:])}, the tile grid was built for {grid.image_size} px"
        )
    rows, cols = grid.offsets(len(x), jitter, x.device, generator)
    tiles = [crop(x, rows[:, j], cols[:, j], grid.tile) for j in range(grid.num_tiles)]
    return torch.stack(tiles, dim=1)


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each tile to zero mean and unit variance on its own, so that tiles cannot be matched by
    their brightness or contrast (a low-level shortcut Noroozi & Favaro remove the same way)."""
    dims = tuple(range(-3, 0))
    mean = tiles.mean(dim=dims, keepdim=True)
    std = tiles.var(dim=dims, keepdim=True, unbiased=False).add(eps).sqrt()
    return (tiles - mean) / std


# In a 3x3 grid the centre is tile 4; its eight neighbours in reading order are the 8 classes of
# relative patch location: 0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, ...
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
CENTRE = 4


# ------------------------------------------------------------------------------------ jigsaw


@functools.lru_cache(maxsize=8)
def _all_permutations(num_tiles: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(num_tiles))), dtype=np.int8)


@functools.lru_cache(maxsize=8)
def maximal_hamming_permutations(count: int, num_tiles: int = 9, seed: int = 0) -> torch.Tensor:
    """``count`` permutations of ``num_tiles`` tiles, chosen greedily for maximal Hamming distance.

    Noroozi & Favaro (2016, Alg. 1) start from a random permutation and repeatedly add the
    candidate farthest from the chosen set. Here "farthest" is the largest *minimum* Hamming
    distance to the chosen ones, so that no two puzzles are nearly the same. Ties (there are many)
    are broken by a seeded shuffle of the candidates, which makes the set a pure function of
    (count, num_tiles, seed): every DDP rank and every resume computes the same one.
    Returns a LongTensor (count, num_tiles); row p lists, for each position, the tile placed there.
    """
    if num_tiles > 9:
        raise ValueError(
            f"{num_tiles} tiles have {math.factorial(num_tiles)} permutations: use a 2x2 or 3x3 grid"
        )
    candidates = _all_permutations(num_tiles)
    if not 1 <= count <= len(candidates):
        raise ValueError(
            f"method.num_permutations must be in 1..{len(candidates)} for {num_tiles} tiles, got {count}"
        )
    candidates = candidates[np.random.default_rng(seed).permutation(len(candidates))]
    chosen = [0]
    min_distance = (candidates != candidates[0]).sum(1).astype(np.int8)
    min_distance[0] = -1
    for _ in range(count - 1):
        best = int(np.argmax(min_distance))  # first maximum in the seeded order
        chosen.append(best)
        np.minimum(min_distance, (candidates != candidates[best]).sum(1).astype(np.int8), out=min_distance)
        min_distance[best] = -1
    return torch.from_numpy(candidates[chosen].astype(np.int64))


# ------------------------------------------------------------------------------------ masks


def block_mask(
    n: int, size: int, mode: str, fraction: float, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Inpainting holes (n, 1, size, size), 1 = masked (Pathak et al. 2016).

    ``centre``: one centred square covering ``fraction`` of the image area.
    ``random``: random rectangles of 1/8 to 1/3 of the side, added until ``fraction`` is covered.
    """
    mask = torch.zeros(n, 1, size, size, device=device)
    if mode == "centre":
        side = max(1, round(size * math.sqrt(fraction)))
        start = (size - side) // 2
        mask[:, :, start : start + side, start : start + side] = 1
        return mask
    if mode != "random":
        raise ValueError(f"unknown mask mode {mode!r}: centre or random")
    low, high = max(1, size // 8), max(2, size // 3)
    for i in range(n):
        while mask[i].mean() < fraction:
            h, w = torch.randint(low, high + 1, (2,), generator=generator).tolist()
            top = int(torch.randint(0, size - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
            mask[i, :, top : top + h, left : left + w] = 1
    return mask


def random_patch_mask(
    n: int, num_patches: int, ratio: float, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE masking: per sample, a uniformly random subset of exactly round(ratio * L) patches is masked.

    Returns ``keep`` (n, L_visible) indices of the visible patches (sorted, so the encoder sees
    them in raster order) and ``mask`` (n, L) with True on masked patches.
    """
    num_masked = int(round(ratio * num_patches))
    if not 0 < num_masked < num_patches:
        raise ValueError(f"mask ratio {ratio} of {num_patches} patches leaves none visible or none masked")
    draw_on = generator.device if generator is not None else device  # drawn where it is used: no copy
    noise = torch.rand(n, num_patches, generator=generator, device=draw_on).to(device)
    keep = noise.argsort(dim=1)[:, : num_patches - num_masked].sort(dim=1).values
    mask = torch.ones(n, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return keep, mask


# ------------------------------------------------------------------------------------ dense nets


class EncoderDecoder(nn.Module):
    """Backbone -> pooled code -> ConvDecoder, then a conv head that also sees the network input.

    The dense pretext tasks (colorization, inpainting) predict an image from an image; the pooled
    code is the representation that evaluation uses (``encode``), and concatenating the input
    back before the head lets fine spatial detail bypass the bottleneck (the code must carry what
    the input cannot tell: the colours, the missing content).
    """

    def __init__(
        self, backbone: BackboneConfig, in_channels: int, out_channels: int, image_size: int, width: int
    ):
        super().__init__()
        self.encoder = build_backbone(backbone, in_channels, image_size)
        self.decoder = ConvDecoder(self.encoder.out_dim, width, image_size, width=width)
        self.head = nn.Sequential(
            nn.Conv2d(width + in_channels, width, 3, padding=1),
            nn.GroupNorm(min(8, width), width),
            nn.SiLU(),
            nn.Conv2d(width, out_channels, 1),
        )
        self.out_dim = self.encoder.out_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.decoder(self.encoder(x)), x], dim=1))


def classifier_head(in_dim: int, num_classes: int, hidden: int) -> nn.Module:
    """The small MLP on top of the backbone that solves the pretext classification."""
    if hidden <= 0:
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


# ------------------------------------------------------------------------------------ base class


@dataclass
class PretextConfig(MethodConfig):
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lr: float = 1e-3
    weight_decay: float = 1e-4


class PretextMethod(Method):
    """Base of the pretext methods: ``pretext_loss`` is the paper; the probe sees ``embed(clean x)``."""

    config_class = PretextConfig
    input_range = "standard"  # value range the pretext task and ``embed`` work in

    @property
    def embed_value_range(self) -> str:  # type: ignore[override]
        return self.input_range

    def pretext_loss(self, x: torch.Tensor, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pretext objective on a batch of float images; returns (loss, extra metrics to log)."""
        raise NotImplementedError

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        x = self.to_float(batch["image"], self.input_range)
        loss, metrics = self.pretext_loss(x, stage)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        if self.online_probe is None:
            return loss
        with torch.no_grad():  # the probe learns on what evaluation will see: the clean image's embedding
            features = self.embed(x)
        return loss + self.probe_loss(features, batch["label"], stage)

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


def cross_entropy_with_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return F.cross_entropy(logits.float(), labels), {"pretext_acc": accuracy(logits, labels)}
