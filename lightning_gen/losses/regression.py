"""Squared-error regression targets of the diffusion and flow models (Ho et al. 2020; Liu et al. 2023).

DDPM regresses the noise eps, rectified flow the velocity z - x; both are a mean squared error
between the network's prediction and the target, computed in float32 (``full_precision``).
"""

from __future__ import annotations

import torch

from lightning_gen.losses.precision import full_precision


@full_precision
def squared_error(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``mean``: the mean over every element; ``sum``: summed over each sample's elements, then
    averaged over the batch (the textbook ||.||² per sample)."""
    err = (prediction - target).pow(2)
    if reduction == "mean":
        return err.mean()
    if reduction == "sum":
        return err.flatten(1).sum(1).mean()
    raise ValueError(f"unknown reduction {reduction!r}: use mean or sum")
