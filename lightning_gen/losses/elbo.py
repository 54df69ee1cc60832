"""VAE evidence lower bound pieces (Kingma & Welling 2014): closed-form KL, decoder likelihoods, bits/dim,
and the importance-weighted bound (Burda et al. 2016, arXiv:1509.00519).

ELBO(x) = E_{z~q(z|x)}[log p(x|z)] - KL(q(z|x) || N(0, I))
KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)
IWAE_k(x) = E_{z_1..z_k ~ q(z|x)}[log 1/k sum_j w_j],  w_j = p(x|z_j) p(z_j) / q(z_j|x)
            IWAE_1 = ELBO <= IWAE_k <= IWAE_{k+1} -> log p(x) as k -> infinity
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_gen.losses.precision import full_precision

LOG_2PI = math.log(2 * math.pi)


@full_precision
def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1)


@full_precision
def log_normal(
    z: torch.Tensor, mu: torch.Tensor | float = 0.0, logvar: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)) per sample, summed over dimensions (nats); the defaults: N(0, I)."""
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return (-0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))).expand_as(z).flatten(1).sum(1)


@full_precision
def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log 1/k sum_j w_j from log w (k, N), per sample (N,): the IWAE estimate of log p(x), computed
    stably in float64 (log w of images are thousands of nats)."""
    log_weights = log_weights.double()
    return torch.logsumexp(log_weights, dim=0) - math.log(len(log_weights))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I): a sample whose gradient flows into mu and sigma."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)


@full_precision
def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor | float) -> torch.Tensor:
    """-log N(x; mean, exp(logvar)) per sample, summed over dimensions (nats).

    A fixed variance is a Python number and stays one (a tensor made of it inside the step would be
    a blocking host-to-device copy on a GPU)."""
    precision = torch.exp(-logvar) if isinstance(logvar, torch.Tensor) else math.exp(-logvar)
    nll = 0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * precision)
    return nll.expand_as(x).flatten(1).sum(1)


@full_precision
def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x; sigmoid(logits)) per sample (x in [0, 1], the continuous-Bernoulli-free form)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def bits_per_dim(nll_nats: torch.Tensor, num_dims: int, scale: float = 1.0) -> torch.Tensor:
    """Bits per dimension of 8-bit data under a continuous density (the usual dequantisation bound).

    Pixels mapped to a range of width ``scale`` (1 for [0, 1]) put each of the 256 values in a bin
    of width scale/256, so -log P(bin) ~= nll + D log(256/scale).
    """
    return (nll_nats + num_dims * math.log(256 / scale)) / (num_dims * math.log(2))


def discrete_bits_per_dim(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits/dim of an exact discrete likelihood (PixelCNN's 256-way softmax): nll / (D ln 2)."""
    return nll_nats / (num_dims * math.log(2))
