"""Metrics of a generator computed from features: FID and KID, behind a registry that more can join.

The interface (what the FID callback, and any other evaluation that samples, relies on):

- A metric is a ``torchmetrics.Metric`` registered with ``@register_metric("<name>")`` and listed by
  that name in ``callbacks.fid.metrics``. ``from_config(cfg, num_features)`` builds it from the
  callback's settings (it reads the fields it needs, e.g. ``kid_subsets``).
- ``set_reference(features, labels)`` gives it the real features (N, D) and their class labels
  (or None), once: every rank passes the same full set (the callback's cache), so nothing about
  the reference is synced and its statistics are computed once per run, not per evaluation.
- ``update(fake, labels)`` is called by every rank, exactly once per evaluation, with its own share
  of the generated features (n_r, D) (n_r may be 0) and the classes a conditional model was asked
  for (None when unconditional). Ranks hold contiguous runs of sample indices in rank order, so a
  list state (``dist_reduce_fx="cat"``) synced by torchmetrics holds the samples in sample order:
  the same tensor, bitwise, as one process would hold.
- ``compute()`` syncs over ranks (torchmetrics) and returns ``{(metric, suffix): value}``; the
  callback logs ``val/<metric>_<extractor><suffix>``, e.g. ``val/fid_digits``, ``val/kid_digits_std``.
  Everything statistical is float64, with autocast off; randomness (KID's subsets) comes from a
  generator seeded by ``cfg.seed``, never from the global streams.

Metrics here: ``fid`` (Heusel et al. 2017, arXiv:1706.08500) and ``kid`` (Binkowski et al. 2018,
arXiv:1801.01401; unbiased MMD^2 with the cubic polynomial kernel over random subsets).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

from lightning_gen.config import ConfigError, did_you_mean

METRICS: dict[str, type[GenerativeMetric]] = {}
Results = dict[tuple[str, str], float]


def register_metric(name: str):
    """Class decorator: make a metric selectable as ``callbacks.fid.metrics: [<name>]``."""

    def wrap(cls):
        METRICS[name] = cls
        cls.name = name
        return cls

    return wrap


def check_metric_names(names: list[str], where: str = "callbacks.fid.metrics") -> list[str]:
    for name in names:
        if name not in METRICS:
            raise ConfigError(
                f"unknown metric {name!r} in {where}{did_you_mean(name, METRICS)}; "
                f"available: {', '.join(METRICS)}"
            )
    return list(dict.fromkeys(names))  # each once, in the order given


def build_metrics(names: list[str], cfg: Any, num_features: int) -> list[GenerativeMetric]:
    return [METRICS[name].from_config(cfg, num_features) for name in check_metric_names(names)]


class GenerativeMetric(Metric):
    """Base of the registered metrics: the interface of the module docstring."""

    name: ClassVar[str]
    full_state_update = False
    higher_is_better = False

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.reference: Any = None  # set by set_reference: the metric's own summary of the real features

    @classmethod
    def from_config(cls, cfg: Any, num_features: int) -> GenerativeMetric:
        return cls(num_features)

    def set_reference(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def update(self, fake: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def compute(self) -> Results:
        raise NotImplementedError

    def reference_or_error(self):
        if self.reference is None:
            raise RuntimeError(f"{self.name}: set_reference(real features) must come before update/compute")
        return self.reference


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    x = features.double()
    if len(x) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors per set, got {len(x)}")
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (len(x) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); the trace of the square root as the sum of the
    square roots of the eigenvalues of S1 S2 (real and non-negative up to rounding), in float64."""
    with torch.autocast(mu1.device.type, enabled=False):
        mean_term = (mu1 - mu2).square().sum()
        root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
        return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * root_trace)


def fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two full feature sets held by this process (no sync): e.g. the real-vs-real floor."""
    return frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))


@register_metric("fid")
class FID(GenerativeMetric):
    """Fréchet distance between Gaussians fitted to real and generated features.

    The generated statistics are sums synced by all-reduce (so FID equals one process's up to the
    order of the float64 sums); they are accumulated around the real mean, which keeps the
    covariance free of the cancellation that raw sums of squares suffer when means are large."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        d = num_features
        self.add_state("fake_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fake_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fake_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_reference(self, features, labels=None) -> None:
        self.reference = gaussian_statistics(features.to(self.device))

    def update(self, fake, labels=None) -> None:
        mu_real = self.reference_or_error()[0].to(self.fake_sum.device)
        shifted = fake.to(self.fake_sum.device, torch.float64) - mu_real
        self.fake_sum += shifted.sum(0)
        self.fake_outer += shifted.T @ shifted
        self.fake_count += len(shifted)

    def compute(self) -> Results:
        n = int(self.fake_count)
        if n < 2:
            raise ValueError(f"FID needs at least 2 generated samples, got {n}")
        mu_real, sigma_real = (t.to(self.fake_sum.device) for t in self.reference_or_error())
        mean_shift = self.fake_sum / n
        sigma_fake = (self.fake_outer - n * torch.outer(mean_shift, mean_shift)) / (n - 1)
        return {("fid", ""): frechet_distance(mu_real, sigma_real, mu_real + mean_shift, sigma_fake)}


@register_metric("kid")
class KID(GenerativeMetric):
    """Kernel inception distance: the mean (and std) over ``subsets`` random subsets of
    ``subset_size`` real and generated features (capped at the smaller set) of the unbiased MMD^2
    with k(x, y) = (x.y / D + 1)^3. Subsets come from a generator seeded by ``seed`` and draw as
    torchmetrics' KernelInceptionDistance does (a real then a generated permutation per subset), so
    with the same seed in the global stream the two agree; the generated features are in sample order
    on every rank, so every world size draws the same subsets."""

    def __init__(self, num_features: int, subsets: int = 50, subset_size: int = 1000, seed: int = 0):
        super().__init__(num_features)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.add_state("fake", [], dist_reduce_fx="cat")
        self.reference: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg, num_features):
        return cls(num_features, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)

    def set_reference(self, features, labels=None) -> None:
        self.reference = features.to(self.device, torch.float64)

    def update(self, fake, labels=None) -> None:
        self.fake.append(fake.to(self.device, torch.float64))

    def compute(self) -> Results:
        fake = dim_zero_cat(self.fake)
        real = self.reference_or_error().to(fake.device)
        size = min(self.subset_size, len(real), len(fake))
        if size < 2:
            raise ValueError(
                f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}"
            )
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: the same subsets on any device
        scores = []
        with torch.autocast(fake.device.type, enabled=False):
            for _ in range(self.subsets):
                pick_real = torch.randperm(len(real), generator=generator)[:size].to(real.device)
                pick_fake = torch.randperm(len(fake), generator=generator)[:size].to(fake.device)
                scores.append(poly_mmd(real[pick_real], fake[pick_fake]))
        scores = torch.stack(scores)
        return {("kid", ""): float(scores.mean()), ("kid", "_std"): float(scores.std(unbiased=False))}


def generative_metrics(
    real: torch.Tensor, fake: torch.Tensor, names: list[str], cfg: Any, device="cpu"
) -> Results:
    """The named metrics of ``fake`` (this rank's share, in sample order; all of it on one process)
    against ``real`` (the whole reference, the same on every rank), synced over ranks when distributed."""
    results: Results = {}
    for metric in build_metrics(names, cfg, real.shape[1]):
        metric.to(device)
        metric.set_reference(real)
        metric.update(fake)
        results.update(metric.compute())
    return results
