"""Discrete bottlenecks of a VQ autoencoder: vector quantisation with an EMA codebook, or finite scalar
quantisation. Both map encodings (N, D, h, w) to indices (N, h, w) and back.

Vector quantisation (van den Oord et al. 2017, arXiv:1711.00937). K codes e_1..e_K in R^D; each
position's encoding z goes to its nearest code:

    k*(z) = argmin_k ||z - e_k||^2,    z_q = e_{k*}
    forward value z_q, gradient the identity: z + sg(z_q - z)   (the straight-through estimator)
    commitment loss beta ||z - sg(z_q)||^2 (losses/quantization.py)

The codebook is not trained by gradients but follows exponential moving averages of the encodings
assigned to each code (the paper's appendix; Razavi et al. 2019), with decay gamma:

    N_k <- gamma N_k + (1 - gamma) n_k,     n_k = #{i : k*(z_i) = k}
    S_k <- gamma S_k + (1 - gamma) s_k,     s_k = sum of the z_i with k*(z_i) = k
    e_k  = S_k / N_k

Dead-code restarts (as in Jukebox, Dhariwal et al. 2020): after the update every code whose N_k is
below ``restart_threshold`` (a code not assigned for a while; N_k starts at 1, so every code unused in
the first batch) is moved onto an encoding drawn at random from the batch, with N_k = threshold and
S_k = threshold e_k. The initial codebook is random; the first batch's restarts put the codes onto the
data. ``l2_normalised`` (Yu et al. 2022, ViT-VQGAN, arXiv:2110.04627): encodings and codes are
l2-normalised before the lookup, so codes are compared by cosine similarity and live on the unit sphere;
the moving averages then average normalised encodings.

Under DDP every rank computes the same codebook, the one a single process computes from the whole
global batch: n_k and s_k are summed over the ranks (all-reduce), and the restart candidates are
drawn from the encodings of all ranks (all-gathered, in rank order) with a generator seeded alike on
every rank (``seed``: the training step). The buffers are then kept out of DDP's broadcast from rank 0
(the method lists them in ``buffers_identical_on_all_ranks``). The training batches of the ranks have
equal sizes (the training loader drops the last, incomplete batch), as the all-gather needs.

Finite scalar quantisation (Mentzer et al. 2023, arXiv:2309.15505) has no codebook at all: each of d
channels is bounded to L_i levels and rounded,

    f(z) = tanh(z + shift) h - offset,   h = (L - 1)(1 - 1e-3) / 2,  offset = 1/2 for even L, else 0
    z_q = round_ste(f(z)) / (L // 2)          (shift = atanh(offset / h), so that f(0) = 0)

giving prod L_i implicit codes (index = sum_i (z_q,i (L_i // 2) + L_i // 2) prod_{j<i} L_j), all of
them used by construction, nothing to learn, update or synchronise.

Distances, lookups and averages are computed in float32 with autocast off: in bf16, nearest codes
would be chosen on 8 bits of mantissa.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.distributed import all_reduce_sum, gather_no_grad
from lightning_gen.losses.quantization import commitment_loss


class Quantized(NamedTuple):
    quantized: torch.Tensor  # (N, D, h, w), straight-through: the gradient reaches the encoding unchanged
    indices: torch.Tensor  # (N, h, w) long
    loss: torch.Tensor  # the commitment loss (0 for FSQ)
    perplexity: torch.Tensor  # exp(entropy of the batch's code frequencies): codes in effective use
    usage: torch.Tensor  # fraction of the codes used in the batch


def _channels_last(z: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) -> (N h w, D)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _channels_first(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n, _, h, w = like.shape
    return flat.view(n, h, w, -1).permute(0, 3, 1, 2)


def code_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, fraction of codes used) of code counts (K,)."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        beta: float = 0.25,
        restart_threshold: float = 1.0,
        l2_normalised: bool = False,
    ):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"the codebook's EMA decay must be in [0, 1), got {decay}")
        self.codebook_size, self.dim, self.decay, self.beta = codebook_size, dim, decay, beta
        self.restart_threshold, self.l2_normalised = restart_threshold, l2_normalised
        # From a generator of its own: the same on every rank whatever the global random state, as DDP
        # does not broadcast these buffers (the first batch's restarts move the codes onto the data).
        codebook = torch.randn(codebook_size, dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", codebook.clone())

    def buffer_names(self) -> list[str]:
        return ["codebook", "ema_count", "ema_sum"]

    def lookup_space(self, vectors: torch.Tensor) -> torch.Tensor:
        """Where nearest codes are searched: the vectors themselves, or their directions."""
        return F.normalize(vectors, dim=-1) if self.l2_normalised else vectors

    def codes(self) -> torch.Tensor:
        """The K codes as the decoder receives them (K, D)."""
        return self.lookup_space(self.codebook)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row of ``flat`` (M, D), already in the lookup space."""
        codes = self.codes()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code of a row
        distances = codes.square().sum(1) - 2 * flat @ codes.T
        return distances.argmin(1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of indices (N, h, w) as an encoding (N, D, h, w)."""
        return self.codes()[indices].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, seed: int = 0) -> Quantized:
        """Quantise ``z`` (N, D, h, w); in training mode also update the codebook (``seed``: the restarts'
        draw, the same on every rank)."""
        with torch.autocast(z.device.type, enabled=False):
            flat = self.lookup_space(_channels_last(z.float()))
            indices = self.nearest(flat)
            # (M, K), for sums by a matmul (no atomics); F.one_hot would read the indices' range back
            one_hot = (indices[:, None] == torch.arange(self.codebook_size, device=z.device)).float()
            counts = one_hot.sum(0)
            if self.training:
                counts = self.update(flat.detach(), one_hot, counts, seed)
            quantized = _channels_first(self.codes()[indices], z)
            encoding = _channels_first(flat, z)
            loss = self.beta * commitment_loss(encoding, quantized)
            straight_through = encoding + (quantized - encoding).detach()
        perplexity, usage = code_statistics(counts)
        return Quantized(straight_through, indices.view(z.shape[0], *z.shape[2:]), loss, perplexity, usage)

    @torch.no_grad()
    def update(
        self, flat: torch.Tensor, one_hot: torch.Tensor, counts: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """The EMA step and the restarts; returns the counts of the global batch."""
        counts = all_reduce_sum(counts)
        sums = all_reduce_sum(one_hot.T @ flat)
        self.ema_count.lerp_(counts, 1 - self.decay)
        self.ema_sum.lerp_(sums, 1 - self.decay)
        self.codebook.copy_(self.ema_sum / self.ema_count.clamp_min(1e-12)[:, None])
        if self.restart_threshold > 0:
            self.restart_dead_codes(flat, seed)
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor, seed: int) -> None:
        """Every code with N_k < threshold onto a random encoding of the global batch. Written without a
        data-dependent shape: a candidate is drawn for every code and kept where the code is dead."""
        everything = gather_no_grad(flat)
        generator = torch.Generator(flat.device).manual_seed(seed)
        pick = torch.randint(len(everything), (self.codebook_size,), generator=generator, device=flat.device)
        candidates = everything[pick]
        dead = (self.ema_count < self.restart_threshold)[:, None]
        self.codebook.copy_(torch.where(dead, candidates, self.codebook))
        self.ema_sum.copy_(torch.where(dead, candidates * self.restart_threshold, self.ema_sum))
        self.ema_count.copy_(torch.where(dead[:, 0], self.restart_threshold, self.ema_count))


class FiniteScalarQuantizer(nn.Module):
    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ needs at least one channel of at least 2 levels, got {list(levels)}")
        self.levels = tuple(int(v) for v in levels)
        self.dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        half = [(v - 1) * (1 - 1e-3) / 2 for v in self.levels]
        offset = [0.5 if v % 2 == 0 else 0.0 for v in self.levels]
        constants = {
            "half_range": half,
            "offset": offset,
            "shift": [math.atanh(o / h) for o, h in zip(offset, half)],
            "half_width": [v // 2 for v in self.levels],
            "level_count": list(self.levels),
            "bases": [math.prod(self.levels[:i]) for i in range(self.dim)],
        }
        for name, values in constants.items():  # from the configuration: rebuilt, not saved
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)

    def buffer_names(self) -> list[str]:
        return ["half_range", "offset", "shift", "half_width", "level_count", "bases"]

    def forward(self, z: torch.Tensor, seed: int = 0) -> Quantized:
        with torch.autocast(z.device.type, enabled=False):
            bounded = torch.tanh(_channels_last(z.float()) + self.shift) * self.half_range - self.offset
            rounded = bounded + (bounded.round() - bounded).detach()  # round with the identity gradient
            flat = rounded / self.half_width
            indices = self.indices_of(flat.detach())
        counts = code_counts(indices, self.codebook_size)
        perplexity, usage = code_statistics(all_reduce_sum(counts) if self.training else counts)
        zero = z.new_zeros((), dtype=torch.float32)
        return Quantized(
            _channels_first(flat, z), indices.view(z.shape[0], *z.shape[2:]), zero, perplexity, usage
        )

    def indices_of(self, flat: torch.Tensor) -> torch.Tensor:
        levels = (flat * self.half_width + self.half_width).round()  # 0 .. L_i - 1
        return (levels * self.bases).sum(-1).long()

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """The quantised encoding (N, d, h, w) of indices (N, h, w)."""
        flat = indices.reshape(-1, 1).float()
        levels = torch.remainder(torch.div(flat, self.bases, rounding_mode="floor"), self.level_count)
        return (levels - self.half_width).div(self.half_width).view(*indices.shape, -1).permute(0, 3, 1, 2)


def code_counts(indices: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of ``size`` codes occurs in ``indices``: by sorting, which (unlike bincount or
    index_add on a GPU) is deterministic and needs no (M, K) one-hot matrix for large implicit codebooks."""
    ordered = indices.flatten().sort().values
    edges = torch.searchsorted(ordered, torch.arange(size + 1, device=indices.device))
    return (edges[1:] - edges[:-1]).float()
