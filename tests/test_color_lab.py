"""sRGB <-> CIE Lab against an independent numpy implementation and published values; ab bins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_gen.methods.ssl.color import (
    ab_gamut_bins,
    annealed_mean,
    lab_to_rgb,
    rebalancing_weights,
    rgb_to_lab,
    soft_encode,
)


def reference_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE 1976 L*a*b* of sRGB (..., 3) in the kappa/epsilon form of the CIE standard (Lindbloom)."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    epsilon, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > epsilon, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def as_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).T.reshape(1, 3, -1, 1)  # (P, 3) -> (1, 3, P, 1)


def test_lab_matches_independent_numpy_formulas():
    rgb = np.random.default_rng(0).random((500, 3))
    rgb[:10] = np.random.default_rng(1).random((10, 3)) * 0.02  # the linear branches near black
    ours = rgb_to_lab(as_image(rgb))[0, :, :, 0].T.numpy()
    np.testing.assert_allclose(ours, reference_lab(rgb), atol=1e-9)


@pytest.mark.parametrize(
    "rgb,lab",
    [  # published sRGB (D65) values
        ((1, 0, 0), (53.2408, 80.0925, 67.2032)),
        ((0, 1, 0), (87.7347, -86.1827, 83.1793)),
        ((0, 0, 1), (32.2970, 79.1875, -107.8602)),
        ((1, 1, 1), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
    ],
)
def test_lab_of_primaries_matches_published_values(rgb, lab):
    ours = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(ours, torch.tensor(lab, dtype=torch.float64), atol=2e-3)


def test_rgb_lab_round_trip_is_exact():
    rgb = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-12)
    float32 = torch.rand(4, 3, 8, 8)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(float32)), float32, atol=1e-4)


def test_lab_conversion_is_differentiable_with_finite_gradients():
    rgb = (torch.rand(1, 3, 3, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(rgb_to_lab, (rgb,))
    lab = rgb_to_lab(rgb.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lab_to_rgb(t, clamp=False), (lab,))
    black = torch.zeros(1, 3, 1, 1, requires_grad=True)  # t^(1/3) has an infinite slope at 0
    rgb_to_lab(black).sum().backward()
    assert torch.isfinite(black.grad).all()


def test_every_srgb_colour_is_near_an_ab_bin():
    centres = ab_gamut_bins(10.0)
    assert 200 < len(centres) < 320
    rgb = torch.rand(1, 3, 4000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ab = rgb_to_lab(rgb)[0, 1:, :, 0].T.float()
    assert torch.cdist(ab, centres).min(1).values.max() <= 5.0 * 2**0.5 + 1e-4  # inside its 10x10 bin


def test_soft_encoding_weights_sum_to_one_on_the_nearest_bins():
    centres = ab_gamut_bins(10.0)
    ab = centres[:7] + torch.tensor([1.0, -2.0])
    z = soft_encode(ab, centres, neighbours=5, sigma=5.0)
    assert torch.allclose(z.sum(1), torch.ones(7)) and ((z > 0).sum(1) == 5).all()
    assert torch.equal(z.argmax(1), torch.arange(7))


def test_rebalancing_weights_favour_rare_colours_and_average_to_one():
    centres = ab_gamut_bins(10.0)
    assert torch.equal(rebalancing_weights(torch.zeros(len(centres)), centres), torch.ones(len(centres)))
    counts = torch.ones(len(centres))
    grey = int(centres.norm(dim=1).argmin())
    counts[grey] = 1e4  # a grey-dominated dataset
    w = rebalancing_weights(counts, centres, mix=0.5, sigma=5.0)
    far = int(centres.norm(dim=1).argmax())
    assert w[grey] < 1 < w[far]
    kernel = torch.exp(-torch.cdist(centres.double(), centres.double()).pow(2) / 50)
    smoothed = kernel @ (counts.double() / counts.sum())
    smoothed = smoothed / smoothed.sum()
    assert torch.isclose((smoothed * w.double()).sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)


def test_annealed_mean_goes_from_mean_to_mode():
    centres = ab_gamut_bins(10.0)
    logits = torch.zeros(1, len(centres), 1, 1)
    logits[0, 3], logits[0, 10] = 2.0, 1.0
    mode = annealed_mean(logits, centres, temperature=0.01)[0, :, 0, 0]
    assert torch.allclose(mode, centres[3], atol=1e-3)
    mean = annealed_mean(logits, centres, temperature=1.0)[0, :, 0, 0]
    assert torch.allclose(mean, (logits[0, :, 0, 0].softmax(0)[:, None] * centres).sum(0), atol=1e-4)
