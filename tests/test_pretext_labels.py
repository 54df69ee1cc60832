"""Pretext label generators: each label must describe exactly the transformation applied to its input.

Geometry is checked on "coordinate images" whose pixels hold their own (row, column), so any crop,
rotation or shuffle can be read back from the pixel values alone.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.ssl.jigsaw import Jigsaw, JigsawConfig, min_pairwise_hamming
from lightning_gen.methods.ssl.pretext import (
    NEIGHBOURS,
    TileGrid,
    block_mask,
    extract_tiles,
    maximal_hamming_permutations,
    normalize_tiles,
    rotate_all,
)
from lightning_gen.methods.ssl.relative_patch import RelativePatch, RelativePatchConfig
from lightning_gen.nets.backbones import BackboneConfig

SMALL_CONV = BackboneConfig(name="conv", conv_width=8, conv_dim=16)


def coordinate_images(n: int, size: int) -> torch.Tensor:
    """(n, 2, size, size): channel 0 = row index, channel 1 = column index (+ 1000 * sample index)."""
    rows = torch.arange(size).view(size, 1).expand(size, size).float()
    cols = torch.arange(size).view(1, size).expand(size, size).float()
    x = torch.stack([rows, cols]).expand(n, 2, size, size).clone()
    return x + 1000 * torch.arange(n).view(n, 1, 1, 1)


# ------------------------------------------------------------------------------------ rotation


def test_rotation_labels_match_the_rotation_applied():
    x = torch.randn(3, 2, 5, 5)
    rotated, labels = rotate_all(x)
    assert rotated.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    xn = x.numpy()
    for image, k, source in zip(rotated.numpy(), labels.tolist(), itertools.cycle(range(3))):
        expected = xn[source]
        for _ in range(k):
            expected = quarter_turn_counter_clockwise(expected)
        np.testing.assert_array_equal(image, expected)


def quarter_turn_counter_clockwise(a: np.ndarray) -> np.ndarray:
    """out[:, i, j] = in[:, j, W - 1 - i], written out pixel by pixel."""
    channels, height, width = a.shape
    out = np.empty((channels, width, height), dtype=a.dtype)
    for i in range(width):
        for j in range(height):
            out[:, i, j] = a[:, j, width - 1 - i]
    return out


def test_rotation_rejects_non_square_images():
    with pytest.raises(ValueError, match="square"):
        rotate_all(torch.zeros(1, 1, 4, 6))


# ------------------------------------------------------------------------------------ tiles


@pytest.mark.parametrize("size,grid", [(40, 3), (64, 3), (33, 2)])
def test_tiles_are_contiguous_crops_inside_their_cells_with_the_gap(size, grid):
    layout = TileGrid(size, grid)
    tiles = extract_tiles(
        coordinate_images(4, size), layout, jitter=True, generator=torch.Generator().manual_seed(0)
    )
    assert tiles.shape == (4, grid * grid, 2, layout.tile, layout.tile)
    margin = (size - grid * layout.cell) // 2
    tops = tiles[:, :, 0, 0, 0] % 1000
    lefts = tiles[:, :, 1, 0, 0] % 1000
    for j in range(grid * grid):
        steps = torch.arange(layout.tile).float()
        assert torch.equal(
            tiles[:, j, 0] % 1000, (tops[:, j, None] + steps).unsqueeze(-1).expand(-1, -1, layout.tile)
        )
        assert torch.equal(
            tiles[:, j, 1] % 1000, (lefts[:, j, None] + steps).unsqueeze(1).expand(-1, layout.tile, -1)
        )
        cell_top = margin + (j // grid) * layout.cell + layout.gap // 2
        cell_left = margin + (j % grid) * layout.cell + layout.gap // 2
        assert ((tops[:, j] >= cell_top) & (tops[:, j] <= cell_top + layout.max_jitter)).all()
        assert ((lefts[:, j] >= cell_left) & (lefts[:, j] <= cell_left + layout.max_jitter)).all()
    right_neighbour_gap = lefts[:, 1] - (lefts[:, 0] + layout.tile)
    assert (right_neighbour_gap >= layout.gap).all()
    assert torch.equal(tiles[:, :, 0, 0, 0] // 1000, torch.arange(4).float()[:, None].expand(-1, grid * grid))


def test_tiles_without_jitter_are_centred_and_deterministic():
    layout = TileGrid(40, 3)
    a = extract_tiles(coordinate_images(2, 40), layout, jitter=False)
    b = extract_tiles(coordinate_images(2, 40), layout, jitter=False)
    assert torch.equal(a, b)
    assert a[0, 0, 0, 0, 0] == (40 - 3 * layout.cell) // 2 + layout.gap // 2 + layout.max_jitter // 2


def test_tile_grid_that_does_not_fit_says_what_to_change():
    with pytest.raises(ValueError, match="tile_size"):
        TileGrid(12, 3, tile=4, gap=2)


def test_normalize_tiles_gives_zero_mean_unit_variance_per_tile():
    tiles = normalize_tiles(torch.rand(2, 9, 3, 8, 8) * 5 + 3)
    assert torch.allclose(tiles.mean((-3, -2, -1)), torch.zeros(2, 9), atol=1e-5)
    assert torch.allclose(tiles.std((-3, -2, -1), unbiased=False), torch.ones(2, 9), atol=1e-3)


# ------------------------------------------------------------------------------------ relative patch

# Reading order of the 8 neighbours: (row step, column step) from the centre patch.
DIRECTIONS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def test_relative_patch_label_is_the_direction_of_the_neighbour():
    torch.manual_seed(0)
    cfg = RelativePatchConfig(backbone=SMALL_CONV, normalize_patches=False, head_hidden=0)
    method = RelativePatch(cfg, DataInfo(channels=2, image_size=40, num_classes=0)).train()
    centre, neighbour, labels = method.pairs(coordinate_images(64, 40))
    assert set(labels.tolist()) == set(range(8))  # all eight classes occur in 64 draws
    layout = method.grid
    margin = (40 - 3 * layout.cell) // 2
    cell_of = lambda v: int((v % 1000 - margin) // layout.cell)  # grid row/column a pixel coordinate lies in
    for c, nb, k in zip(centre, neighbour, labels.tolist()):
        assert (cell_of(c[0, 0, 0]), cell_of(c[1, 0, 0])) == (1, 1)
        d_row, d_col = cell_of(nb[0, 0, 0]) - 1, cell_of(nb[1, 0, 0]) - 1
        assert (d_row, d_col) == DIRECTIONS[k]
        assert nb[0, 0, 0] // 1000 == c[0, 0, 0] // 1000  # both patches from the same image
    assert NEIGHBOURS == (0, 1, 2, 3, 5, 6, 7, 8)


# ------------------------------------------------------------------------------------ jigsaw


def test_jigsaw_label_is_the_permutation_applied_to_the_tiles():
    torch.manual_seed(0)
    cfg = JigsawConfig(backbone=SMALL_CONV, num_permutations=30, normalize_tiles=False, head_hidden=0)
    method = Jigsaw(cfg, DataInfo(channels=2, image_size=40, num_classes=0))
    layout = method.grid
    tiles = extract_tiles(coordinate_images(16, 40), layout, jitter=True)
    labels = torch.randint(0, 30, (16,))
    puzzles = method.shuffle(tiles, labels)
    margin = (40 - 3 * layout.cell) // 2
    for puzzle, p in zip(puzzles, labels.tolist()):
        for position in range(9):
            row, col = puzzle[position, 0, 0, 0] % 1000, puzzle[position, 1, 0, 0] % 1000
            source = int((row - margin) // layout.cell) * 3 + int((col - margin) // layout.cell)
            assert source == int(method.permutations[p, position])


def test_maximal_hamming_set_is_greedy_max_min_distance_and_deterministic():
    count = 12
    perms = maximal_hamming_permutations(count, 9, 3).numpy()
    assert np.array_equal(perms, maximal_hamming_permutations(count, 9, 3).numpy())
    assert not np.array_equal(perms, maximal_hamming_permutations(count, 9, 4).numpy())
    assert len({tuple(p) for p in perms}) == count and all(sorted(p) == list(range(9)) for p in perms)
    everything = np.array(list(itertools.permutations(range(9))))  # independent brute force
    for k in range(1, count):
        to_chosen = np.stack([(everything != perms[i]).sum(1) for i in range(k)], 1).min(1)
        assert (perms[k] != perms[:k]).sum(1).min() == to_chosen.max()


def test_maximal_hamming_set_is_farther_apart_than_random_permutations():
    chosen = maximal_hamming_permutations(100, 9, 0)
    random = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i)) for i in range(100)])
    assert min_pairwise_hamming(chosen) > min_pairwise_hamming(random)
    assert min_pairwise_hamming(chosen) >= 6  # 100 of 9! permutations leave room to differ in 6+ places


def test_too_many_permutations_is_a_clear_error():
    with pytest.raises(ValueError, match="num_permutations"):
        maximal_hamming_permutations(25, 4, 0)


# ------------------------------------------------------------------------------------ inpainting masks


def test_centre_mask_is_a_centred_square_of_the_requested_area():
    mask = block_mask(2, 32, "centre", 0.25)
    assert mask.sum((1, 2, 3)).tolist() == [256.0, 256.0]
    rows = mask[0, 0].sum(1).nonzero().flatten()
    assert rows.min() == 8 and rows.max() == 23


def test_random_mask_covers_at_least_the_fraction_and_differs_per_image():
    mask = block_mask(4, 32, "random", 0.3, generator=torch.Generator().manual_seed(0))
    assert (mask.mean((1, 2, 3)) >= 0.3).all()
    assert not torch.equal(mask[0], mask[1])
