"""Metrics from nearest neighbours in feature space: precision, recall, density, coverage and memorisation.

With real features X_1..X_N, generated features Y_1..Y_M and NND_k(Z) the distance from Z to its
k-th nearest neighbour in its own set (itself excluded), B(Z, r) the closed ball of radius r:

- ``prdc`` -> ``precision``, ``recall`` (improved precision and recall, Kynkäänniemi et al. 2019,
  arXiv:1904.06991) and ``density``, ``coverage`` (Naeem et al. 2020, arXiv:2002.09797), k = 3:

      precision = 1/M sum_j 1[ Y_j in some B(X_i, NND_k(X_i)) ]          realism: samples on the real manifold
      recall    = 1/N sum_i 1[ X_i in some B(Y_j, NND_k(Y_j)) ]          diversity: reals on the sample manifold
      density   = 1/(kM) sum_j sum_i 1[ Y_j in B(X_i, NND_k(X_i)) ]      realism, robust to real outliers
      coverage  = 1/N sum_i 1[ some Y_j in B(X_i, NND_k(X_i)) ]          diversity, robust to fake outliers

  Precision and recall are in [0, 1]; density can exceed 1 (samples crowding dense real regions).
  The real set is a seeded draw of ``prdc_num_real`` real features (default: as many as samples, as
  both papers compare equal numbers): the balls' radii shrink as the set grows.
- ``memorization``: the fraction of samples whose nearest training image is closer than the
  ``memorization_percentile`` (5th) percentile tau of the held-out (test) images' distances to their
  nearest training image:

      memorization = 1/M sum_j 1[ min_i ||Y_j - X_i|| < tau ]      X: all training features

  A model that samples like the data distribution scores about 0.05 (test images do, by definition);
  copies of training images score 1 (distance 0). tau is reported as ``memorization_threshold``.

Distances are Euclidean, in float64 (|a|^2 + |b|^2 - 2 a.b, clamped at 0), on the metric's device,
computed block by block (``BLOCK`` entries at a time) so memory stays bounded for any N and M.
The generated features are gathered over ranks in sample order and every rank computes the same
values as one process; the real-side radii and distances are computed once, in ``set_reference``.
"""

from __future__ import annotations

import torch
from torchmetrics.utilities import dim_zero_cat

from lightning_gen.config import ConfigError
from lightning_gen.eval.gen_metrics import GenerativeMetric, Results, register_metric

BLOCK = 1 << 22  # float64 distances per block: 32 MB


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64."""
    a, b = a.double(), b.double()
    squared = a.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * a @ b.T
    return squared.clamp_min_(0).sqrt_()


def blocks(n_rows: int, n_cols: int):
    """Row slices, each with the column slices that tile it, in blocks of about BLOCK entries."""
    cols = max(1, min(n_cols, BLOCK))
    rows = max(1, BLOCK // cols)
    for r in range(0, n_rows, rows):
        yield (
            slice(r, min(r + rows, n_rows)),
            [slice(c, min(c + cols, n_cols)) for c in range(0, n_cols, cols)],
        )


def k_smallest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest distances (len(queries), k) from each query to ``bank``, ascending."""
    out = [torch.zeros(0, k, dtype=torch.float64, device=queries.device)]
    for rows, column_blocks in blocks(len(queries), len(bank)):
        best = None
        for cols in column_blocks:
            block = distances(queries[rows], bank[cols])
            candidates = block if best is None else torch.cat([best, block], dim=1)
            best = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False, sorted=True).values
        out.append(best)
    return torch.cat(out)


def kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """NND_k: the distance of each point to its k-th nearest neighbour in the set, itself excluded
    (the (k+1)-th smallest distance, the first being its own 0)."""
    return k_smallest(points, points, k + 1)[:, k]


def check_k(name: str, k: int, num_fake: int, num_real: int | None) -> None:
    smaller = min(num_fake, num_real if num_real is not None else num_fake)
    if k >= smaller:
        raise ConfigError(
            f"{name} with k={k} needs more than k generated and real images, got {num_fake} and "
            f"{num_real if num_real is not None else '?'}: lower prdc_k or use more images"
        )


@register_metric("prdc")
class PrecisionRecallDensityCoverage(GenerativeMetric):
    """Improved precision / recall and density / coverage with k-NN balls (module docstring)."""

    higher_is_better = True

    def __init__(self, num_features: int, k: int = 3, num_real: int | None = None, seed: int = 0):
        super().__init__(num_features)
        self.k, self.num_real, self.seed = k, num_real, seed
        self.add_state("fake", [], dist_reduce_fx="cat")

    @classmethod
    def from_config(cls, settings, num_features, num_samples, seed):
        return cls(num_features, settings.prdc_k, settings.prdc_num_real or num_samples, seed)

    @classmethod
    def check(cls, settings, num_fake, num_real) -> None:
        wanted = settings.prdc_num_real
        if wanted is not None and num_real is not None and wanted > num_real:
            raise ConfigError(f"prdc_num_real={wanted} is more than the {num_real} real images")
        used = min(wanted or num_fake, num_real) if num_real is not None else (wanted or num_fake)
        check_k("prdc", settings.prdc_k, num_fake, used)

    def set_reference(self, features, labels=None, held_out=None) -> None:
        real = features.to(self.device, torch.float64)
        if self.num_real is not None and self.num_real < len(real):  # a seeded draw, the same on every rank
            pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(self.seed))[
                : self.num_real
            ]
            real = real[pick.to(real.device)]
        if self.k >= len(real):
            raise ConfigError(f"prdc with k={self.k} needs more than k real images, got {len(real)}")
        self.reference = (real, kth_neighbour_radii(real, self.k))

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
        self.fake.append(fake.to(self.device, torch.float64))

    def compute(self) -> Results:
        real, real_radii = self.reference_or_error()
        fake = dim_zero_cat(self.fake)
        check_k("prdc", self.k, len(fake), len(real))
        fake_radii = kth_neighbour_radii(fake, self.k)
        in_real_balls = torch.zeros(
            len(fake), dtype=torch.float64, device=fake.device
        )  # per sample: how many
        covered = torch.zeros(len(real), dtype=torch.bool, device=fake.device)  # real ball holds a sample
        recalled = torch.zeros(len(real), dtype=torch.bool, device=fake.device)  # real in a sample's ball
        for rows, column_blocks in blocks(len(real), len(fake)):
            for cols in column_blocks:
                d = distances(real[rows], fake[cols])  # (reals, samples)
                inside = d <= real_radii[rows, None]
                in_real_balls[cols] += inside.sum(0)
                covered[rows] |= inside.any(1)
                recalled[rows] |= (d <= fake_radii[None, cols]).any(1)
        return {
            ("precision", ""): float((in_real_balls > 0).double().mean()),
            ("recall", ""): float(recalled.double().mean()),
            ("density", ""): float(in_real_balls.sum() / (self.k * len(fake))),
            ("coverage", ""): float(covered.double().mean()),
        }


@register_metric("memorization")
class Memorization(GenerativeMetric):
    """The fraction of samples closer to a training image than the 5th percentile of held-out images' distances."""

    needs_held_out = True

    def __init__(self, num_features: int, percentile: float = 5.0):
        super().__init__(num_features)
        self.percentile = percentile
        self.add_state("fake", [], dist_reduce_fx="cat")

    @classmethod
    def from_config(cls, settings, num_features, num_samples, seed):
        return cls(num_features, settings.memorization_percentile)

    def set_reference(self, features, labels=None, held_out=None) -> None:
        """``features``: the training images'; ``held_out``: images the model was not trained on."""
        if held_out is None or not len(held_out):
            raise ConfigError(
                "memorization needs held-out real images (e.g. the test split) besides the training set"
            )
        train = features.to(self.device, torch.float64)
        nearest = k_smallest(held_out.to(self.device, torch.float64), train, 1)[:, 0]
        # linear interpolation between order statistics
        threshold = torch.quantile(nearest, self.percentile / 100)
        self.reference = (train, threshold)

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
        self.fake.append(fake.to(self.device, torch.float64))

    def compute(self) -> Results:
        train, threshold = self.reference_or_error()
        nearest = k_smallest(dim_zero_cat(self.fake), train, 1)[:, 0]
        return {
            ("memorization", ""): float((nearest < threshold).double().mean()),
            ("memorization", "_threshold"): float(threshold),
        }
