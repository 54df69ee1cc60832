"""Exact, differentiable sRGB <-> CIE Lab (D65) in torch, and the quantised ab space of colorization.

Conversion (IEC 61966-2-1 sRGB, CIE 1976 L*a*b*, reference white D65):

    linear = srgb / 12.92                      if srgb <= 0.04045
           = ((srgb + 0.055) / 1.055) ** 2.4   otherwise
    XYZ    = M @ linear,   (X, Y, Z) /= white
    f(t)   = t ** (1/3)                        if t > (6/29)^3
           = t / (3 (6/29)^2) + 4/29           otherwise
    L = 116 f(Y) - 16,   a = 500 (f(X) - f(Y)),   b = 200 (f(Y) - f(Z))

Each branch is evaluated on an input clamped into its own domain, so ``torch.where`` never
multiplies an infinite derivative (of t^(1/3) at 0) by zero: gradients are finite everywhere.

Quantised ab (Zhang, Isola & Efros 2016): a grid of ``step``-wide bins over ab, keeping only the
bins that some sRGB colour reaches. For step 10 this exact sRGB gamut gives 261 bins; the paper
reports 313, drawn by a procedure it does not give, so the set here is computed rather than copied.
"""

from __future__ import annotations

import functools

import torch

from lightning_gen.device_constants import device_constant

# sRGB primaries -> XYZ for D65 (Lindbloom's matrix, the one behind the usual published Lab values).
RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
XYZ_TO_RGB = torch.linalg.inv(RGB_TO_XYZ)
WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_DELTA = 6.0 / 29.0


def _apply_matrix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", device_constant(matrix, x.device, x.dtype), x)


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def _f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _DELTA**3, t.clamp(min=_DELTA**3) ** (1 / 3), t / (3 * _DELTA**2) + 4 / 29)


def _f_inverse(f: torch.Tensor) -> torch.Tensor:
    return torch.where(f > _DELTA, f.clamp(min=_DELTA) ** 3, 3 * _DELTA**2 * (f - 4 / 29))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) -> Lab (N, 3, H, W) with L in [0, 100], a and b roughly in [-110, 110]."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_lab expects (N, 3, H, W) sRGB images, got {tuple(rgb.shape)}")
    xyz = _apply_matrix(RGB_TO_XYZ, srgb_to_linear(rgb)) / device_constant(
        WHITE_D65, rgb.device, rgb.dtype
    ).view(1, 3, 1, 1)
    fx, fy, fz = _f(xyz).unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Inverse of ``rgb_to_lab``; ``clamp`` clips out-of-gamut colours into [0, 1]."""
    if lab.ndim != 4 or lab.shape[1] != 3:
        raise ValueError(f"lab_to_rgb expects (N, 3, H, W) Lab images, got {tuple(lab.shape)}")
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    xyz = _f_inverse(f) * device_constant(WHITE_D65, lab.device, lab.dtype).view(1, 3, 1, 1)
    rgb = linear_to_srgb(_apply_matrix(XYZ_TO_RGB, xyz))
    return rgb.clamp(0, 1) if clamp else rgb


# ------------------------------------------------------------------------------ quantised ab


@functools.lru_cache(maxsize=4)
def ab_gamut_bins(step: float = 10.0, levels: int = 64) -> torch.Tensor:
    """Centres (Q, 2) of the ``step``-wide ab bins that some sRGB colour falls into."""
    values = torch.linspace(0, 1, levels, dtype=torch.float64)
    rgb = torch.stack(torch.meshgrid(values, values, values, indexing="ij")).reshape(1, 3, -1, 1)
    ab = rgb_to_lab(rgb)[0, 1:, :, 0].T  # (levels^3, 2)
    index = torch.unique(torch.round(ab / step).long(), dim=0)
    return (index.double() * step).float()


def soft_encode(
    ab: torch.Tensor, centres: torch.Tensor, neighbours: int = 5, sigma: float = 5.0
) -> torch.Tensor:
    """Soft one-hot targets (P, Q) of ab (P, 2): Gaussian weights on the nearest bins (Zhang: 5, sigma 5)."""
    distance = torch.cdist(ab.float(), centres.to(ab.device).float())
    near, index = distance.topk(neighbours, dim=1, largest=False)
    weights = torch.softmax(-near.pow(2) / (2 * sigma**2), dim=1)
    return torch.zeros_like(distance).scatter_(1, index, weights)


def rebalancing_weights(counts: torch.Tensor, centres: torch.Tensor, mix: float = 0.5, sigma: float = 5.0):
    """Class-rebalancing weights w (Q,) of Zhang et al. (Eq. 4): w ~ ((1 - mix) p~ + mix / Q)^-1,
    normalised so that E_p~[w] = 1, with p~ the empirical bin distribution smoothed by a Gaussian
    over ab. Rare, saturated colours get large weights, so the network does not learn to predict
    grey-brown everywhere. With no counts yet, p~ is uniform and w = 1."""
    q = len(centres)
    total = counts.sum()
    p = counts.double() / total
    kernel = torch.exp(-torch.cdist(centres.double(), centres.double()).pow(2) / (2 * sigma**2)).to(p.device)
    smoothed = kernel @ p
    smoothed = smoothed / smoothed.sum()
    w = 1.0 / ((1 - mix) * smoothed + mix / q)
    w = (w / (smoothed * w).sum()).float()
    # chosen on the device (an `if` on the count would make the host wait for the GPU); the unused
    # branch is NaN when nothing was counted yet
    return torch.where(total > 0, w, torch.ones_like(w))


def annealed_mean(logits: torch.Tensor, centres: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Decode (N, Q, H, W) bin logits to ab (N, 2, H, W): the mean of the distribution sharpened by T
    (Zhang: T = 0.38, between the mean's desaturation and the mode's spatial incoherence)."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("nqhw,qc->nchw", probs, centres.to(probs))
