"""The commitment loss of vector quantisation (van den Oord et al. 2017, arXiv:1711.00937, eq. 3).

    L_commit = ||z_e - sg(z_q)||^2  (mean over elements)

It pulls the encoder's output z_e toward the code z_q it was assigned, so that the encodings do not
drift away from a codebook that moves only by its exponential moving averages.
"""

from __future__ import annotations

import torch

from lightning_gen.losses.precision import full_precision


@full_precision
def commitment_loss(encoding: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return (encoding - quantized.detach()).square().mean()
