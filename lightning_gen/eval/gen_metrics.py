"""Metrics of a generator computed from features, behind a registry: FID and KID here; IS, per-class
FID and CAS in ``eval/class_metrics.py``; precision/recall, density/coverage and memorisation in
``eval/manifold_metrics.py``.

The interface (what the FID callback and ``lgen eval gen`` rely on):

- A metric is a ``torchmetrics.Metric`` registered with ``@register_metric("<name>")`` and listed by
  that name in ``callbacks.fid.metrics`` (or ``lgen eval gen metrics=``). ``from_config(settings,
  num_features, num_samples, seed)`` builds it (``settings``: a ``MetricSettings``, whose fields the
  callback's and the command's configs share). Class attributes say what it needs besides generated
  features: ``needs_real`` (real features; an .npz of mean and covariance is not enough),
  ``needs_reference`` (any reference at all), ``needs_held_out`` (a second real split),
  ``needs_logits`` (the extractor's class logits), ``needs_classifier`` (a named classifier's
  logits), ``conditional`` (requested classes). ``select_metrics`` keeps those the inputs allow.
- ``set_reference(features, labels=None, held_out=None)`` gives it the real features (N, D), their
  class labels (or None) and held-out real features, once: every rank passes the same full sets (the
  callback's cache), so nothing about the reference is synced and what it derives from them (means,
  covariances, nearest-neighbour radii) is computed once per run, not per evaluation.
  ``FID.set_reference_statistics(mu, sigma)`` takes a published mean and covariance instead.
- ``update(fake, labels=None, logits=None, classifier_logits=None)`` is called by every rank, exactly
  once per evaluation, with its own share of the generated features (n_r, D) (n_r may be 0), the
  classes a conditional model was asked for (None when unconditional), the extractor's class logits
  and the named classifier's. Ranks hold contiguous runs of sample indices in rank order, so a list
  state (``dist_reduce_fx="cat"``) synced by torchmetrics holds the samples in sample order: the same
  tensor, bitwise, as one process would hold. Metrics that compare samples with each other
  (nearest neighbours, subsets, splits) gather the features so; none approximates per rank.
- ``compute()`` syncs over ranks (torchmetrics) and returns ``{(metric, suffix): value}``; the
  callback logs ``val/<metric>_<extractor><suffix>``, e.g. ``val/fid_digits``, ``val/kid_digits_std``.
  Everything statistical is float64, with autocast off; randomness (KID's subsets, PRDC's real
  subset) comes from generators seeded by the evaluation's seed, never from the global streams.
- ``check(settings, num_fake, num_real)`` refuses, before anything is computed, sample counts the
  metric cannot work with (a ConfigError saying which setting to change).

Metrics here: ``fid`` (Heusel et al. 2017, arXiv:1706.08500) and ``kid`` (Binkowski et al. 2018,
arXiv:1801.01401; unbiased MMD^2 with the cubic polynomial kernel over random subsets).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

from lightning_gen.config import ConfigError, bounded, did_you_mean

METRICS: dict[str, type[GenerativeMetric]] = {}
Results = dict[tuple[str, str], float]
# the modules that register the other metrics, imported on first use of the registry
METRIC_MODULES = ("lightning_gen.eval.class_metrics", "lightning_gen.eval.manifold_metrics")
ORDER = ("fid", "kid", "is", "prdc", "memorization", "class_fid", "cas")  # the order "all of them" lists


@dataclass
class MetricSettings:
    """Parameters of the metrics, shared by ``callbacks.fid`` and ``lgen eval gen``."""

    metrics: list[str] | None = (
        None  # None: every metric the inputs allow (fid, kid, is, prdc, memorization, class_fid, cas)
    )
    kid_subsets: int = bounded(50, 1)
    kid_subset_size: int | None = bounded(
        None, 2
    )  # None: min(1000, samples, real); more than either is an error
    is_splits: int = bounded(10, 1)  # Inception Score: the mean and std over this many parts of the samples
    prdc_k: int = bounded(3, 1)  # precision/recall/density/coverage: the k of the k-NN balls
    prdc_num_real: int | None = bounded(
        None, 2
    )  # real features PRDC uses (a seeded draw); None: as many as samples
    memorization_percentile: float = bounded(
        5.0, 0.0, 100.0
    )  # of the held-out images' nearest-train distances


def register_metric(name: str):
    """Class decorator: make a metric selectable as ``callbacks.fid.metrics: [<name>]``."""

    def wrap(cls):
        METRICS[name] = cls
        cls.name = name
        return cls

    return wrap


def registered() -> dict[str, type[GenerativeMetric]]:
    """Every registered metric, in the order of ``ORDER`` (then any other, in registration order)."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names = [n for n in ORDER if n in METRICS] + [n for n in METRICS if n not in ORDER]
    return {name: METRICS[name] for name in names}


def check_metric_names(names: list[str], where: str = "callbacks.fid.metrics") -> list[str]:
    known = registered()
    for name in names:
        if name not in known:
            raise ConfigError(
                f"unknown metric {name!r} in {where}{did_you_mean(name, known)}; available: {', '.join(known)}"
            )
    return list(dict.fromkeys(names))  # each once, in the order given


@dataclass
class Inputs:
    """What an evaluation can give its metrics."""

    real: bool = True  # real features (False: a reference of mean and covariance only, or none)
    reference: bool = True  # any reference at all
    held_out: bool = True  # a held-out real split (memorisation's threshold)
    logits: bool = True  # the extractor has a classifier head
    classifier: bool = True  # a classifier for CAS
    conditional: bool = False  # the samples were asked for classes
    notes: dict[str, str] = field(default_factory=dict)  # why an input is missing, by input name


def missing_input(metric: type[GenerativeMetric], inputs: Inputs) -> str | None:
    """Why ``metric`` cannot be computed from ``inputs`` (None: it can)."""
    needs = [
        ("reference", metric.needs_reference, "a reference (real images or statistics)"),
        ("real", metric.needs_real, "real features (a reference of mean and covariance has none)"),
        ("held_out", metric.needs_held_out, "a held-out real split besides the training images"),
        (
            "logits",
            metric.needs_logits,
            "class probabilities (an extractor with a classifier head: domain, inception)",
        ),
        ("conditional", metric.conditional, "a class-conditional model (samples asked for classes)"),
        ("classifier", metric.needs_classifier, "a classifier of the data's classes"),
    ]
    for key, needed, what in needs:
        if needed and not getattr(inputs, key):
            note = inputs.notes.get(key)
            return f"needs {what}" + (f": {note}" if note else "")
    return None


def select_metrics(
    names: list[str] | None, inputs: Inputs, where: str = "callbacks.fid.metrics"
) -> tuple[list[str], dict[str, str]]:
    """(metrics to compute, {skipped metric: why}). ``names`` None: all that ``inputs`` allow; a listed
    metric the inputs do not allow is a ConfigError."""
    if names is None:
        chosen, skipped = [], {}
        for name, metric in registered().items():
            reason = missing_input(metric, inputs)
            chosen, skipped = (
                (chosen + [name], skipped) if reason is None else (chosen, {**skipped, name: reason})
            )
        return chosen, skipped
    names = check_metric_names(names, where)
    for name in names:
        reason = missing_input(METRICS[name], inputs)
        if reason:
            raise ConfigError(f"{where}: {name} {reason}; leave it out of the list")
    return names, {}


def build_metrics(
    names: list[str], settings: Any, num_features: int, num_samples: int, seed: int
) -> list[GenerativeMetric]:
    known = registered()
    return [
        known[n].from_config(settings, num_features, num_samples, seed) for n in check_metric_names(names)
    ]


def check_counts(names: list[str], settings: Any, num_fake: int, num_real: int | None) -> None:
    """Every metric's ``check``: sample counts it cannot work with are a ConfigError."""
    known = registered()
    for name in check_metric_names(names):
        known[name].check(settings, num_fake, num_real)


class GenerativeMetric(Metric):
    """Base of the registered metrics: the interface of the module docstring."""

    name: ClassVar[str]
    full_state_update = False
    higher_is_better = False
    needs_reference: ClassVar[bool] = True
    needs_real: ClassVar[bool] = True
    needs_held_out: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    needs_classifier: ClassVar[bool] = False
    conditional: ClassVar[bool] = False

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.reference: Any = None  # set by set_reference: the metric's own summary of the real features

    @classmethod
    def from_config(cls, settings: Any, num_features: int, num_samples: int, seed: int) -> GenerativeMetric:
        return cls(num_features)

    @classmethod
    def check(cls, settings: Any, num_fake: int, num_real: int | None) -> None:
        """ConfigError for sample counts this metric cannot work with (``num_real`` None: not known yet)."""

    def set_reference(self, features: torch.Tensor, labels=None, held_out=None) -> None:
        raise NotImplementedError

    def update(self, fake: torch.Tensor, labels=None, logits=None, classifier_logits=None) -> None:
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

    needs_real = False  # a published mean and covariance will do

    @classmethod
    def check(cls, settings, num_fake, num_real) -> None:
        if num_fake < 2 or (num_real is not None and num_real < 2):
            raise ConfigError(
                f"FID needs at least 2 generated and 2 real images, got {num_fake} and {num_real}"
            )

    def set_reference(self, features, labels=None, held_out=None) -> None:
        self.reference = gaussian_statistics(features.to(self.device))

    def set_reference_statistics(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """A reference given by its mean (D,) and covariance (D, D), e.g. from an .npz statistics file."""
        self.reference = (mu.to(self.device, torch.float64), sigma.to(self.device, torch.float64))

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
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
    ``subset_size`` real and generated features (None: 1000, capped at the smaller set) of the unbiased MMD^2
    with k(x, y) = (x.y / D + 1)^3. Subsets come from a generator seeded by ``seed`` and draw as
    torchmetrics' KernelInceptionDistance does (a real then a generated permutation per subset), so
    with the same seed in the global stream the two agree; the generated features are in sample order
    on every rank, so every world size draws the same subsets."""

    def __init__(self, num_features: int, subsets: int = 50, subset_size: int | None = None, seed: int = 0):
        super().__init__(num_features)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.add_state("fake", [], dist_reduce_fx="cat")
        self.reference: torch.Tensor | None = None

    @classmethod
    def from_config(cls, settings, num_features, num_samples, seed):
        return cls(num_features, settings.kid_subsets, settings.kid_subset_size, seed)

    @classmethod
    def check(cls, settings, num_fake, num_real) -> None:
        size = settings.kid_subset_size
        smaller = min(num_fake, num_real if num_real is not None else num_fake)
        if size is not None and size > smaller:
            raise ConfigError(
                f"kid_subset_size={size} is larger than the {num_fake} generated"
                + (f" / {num_real} real" if num_real is not None else "")
                + f" images: set kid_subset_size={smaller} or fewer (or leave it out: min(1000, samples))"
            )

    def set_reference(self, features, labels=None, held_out=None) -> None:
        self.reference = features.to(self.device, torch.float64)

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
        self.fake.append(fake.to(self.device, torch.float64))

    def compute(self) -> Results:
        fake = dim_zero_cat(self.fake)
        real = self.reference_or_error().to(fake.device)
        size = min(self.subset_size or 1000, len(real), len(fake))
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
    real: torch.Tensor,
    fake: torch.Tensor,
    names: list[str],
    settings: Any = None,
    device="cpu",
    seed: int = 0,
    labels: torch.Tensor | None = None,
    real_labels: torch.Tensor | None = None,
    held_out: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    classifier_logits: torch.Tensor | None = None,
) -> Results:
    """The named metrics of ``fake`` (this rank's share, in sample order; all of it on one process)
    against ``real`` (the whole reference, the same on every rank), synced over ranks when distributed."""
    from lightning_gen import distributed

    settings = settings or MetricSettings()
    num_samples = len(fake)
    if distributed.is_distributed():
        num_samples = int(distributed.all_reduce_sum(torch.tensor(float(len(fake)), device=device)).item())
    results: Results = {}
    for metric in build_metrics(names, settings, real.shape[1], num_samples, seed):
        metric.to(device)
        metric.set_reference(real, real_labels, held_out)
        metric.update(fake, labels, logits, classifier_logits)
        results.update(metric.compute())
    return results
