"""Metrics that read class probabilities or requested classes: the Inception Score, per-class FID and CAS.

- ``is``: Inception Score (Salimans et al. 2016, arXiv:1606.03498). With p(y|x) the classifier's
  softmax for a sample and p(y) its mean over a set of samples,

      IS = exp( E_x KL( p(y|x) || p(y) ) ),

  high when each sample is confidently one class (realism, as the classifier sees it) and the
  classes are spread (diversity). As in the original code, the samples are cut into ``is_splits``
  (10) consecutive parts of near-equal size and the mean and (population) std of the parts' scores
  are reported. The probabilities are the extractor's head: the domain classifier, or InceptionV3's
  1008 logits without their bias (what the original code computes). Needs no real images.
- ``class_fid``: for a class-conditional model, the FID of the samples asked for class c against the
  real images of class c, for every class, and their mean: a model can reach a good overall FID
  while mixing up classes, which this exposes.
- ``cas``: the accuracy of a classifier on class-conditional samples, taken as labelled by the class
  they were asked for (in the spirit of the classification accuracy score of Ravuri & Vinyals 2019,
  arXiv:1905.10887, which trains a classifier on samples; here a fixed classifier trained on real
  data judges them): overall and per class. The classifier is named by the caller (the domain
  extractor's head by default).

The per-sample values are gathered over ranks in sample order (list states) and every rank computes
the same float64 result, equal to one process's.
"""

from __future__ import annotations

import torch
from torchmetrics.utilities import dim_zero_cat

from lightning_gen.config import ConfigError
from lightning_gen.eval.gen_metrics import (
    GenerativeMetric,
    Results,
    frechet_distance,
    gaussian_statistics,
    register_metric,
)


def inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """(mean, std) over ``splits`` consecutive parts of exp(mean KL(p(y|x) || p(y))), in float64."""
    if len(logits) < splits:
        raise ValueError(
            f"the Inception Score in {splits} parts needs at least {splits} samples, got {len(logits)}"
        )
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    n = len(log_p)
    for k in range(splits):
        part = log_p[k * n // splits : (k + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - torch.log(
            torch.tensor(float(len(part)), dtype=torch.float64)
        )
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


@register_metric("is")
class InceptionScore(GenerativeMetric):
    """IS of the generated samples from the extractor's class logits (module docstring)."""

    higher_is_better = True
    needs_reference = needs_real = False
    needs_logits = True

    def __init__(self, num_features: int, splits: int = 10):
        super().__init__(num_features)
        self.splits = splits
        self.add_state("logits", [], dist_reduce_fx="cat")

    @classmethod
    def from_config(cls, settings, num_features, num_samples, seed):
        return cls(num_features, settings.is_splits)

    @classmethod
    def check(cls, settings, num_fake, num_real) -> None:
        if num_fake < settings.is_splits:
            raise ConfigError(
                f"the Inception Score in is_splits={settings.is_splits} parts needs at least that many samples, "
                f"got {num_fake}: lower is_splits or generate more"
            )

    def set_reference(self, features, labels=None, held_out=None) -> None:
        pass  # needs no real images

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
        if logits is None:
            raise ValueError("is: update() needs the extractor's class logits")
        self.logits.append(logits.to(self.device, torch.float64))

    def compute(self) -> Results:
        mean, std = inception_score(dim_zero_cat(self.logits), self.splits)
        return {("is", ""): mean, ("is", "_std"): std}


def require_labels(name: str, labels) -> None:
    if labels is None:
        raise ValueError(f"{name}: needs the classes the samples were asked for (a class-conditional model)")


@register_metric("class_fid")
class ClassFID(GenerativeMetric):
    """FID per requested class against the real images of that class, and the mean over classes."""

    conditional = True

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.add_state("fake", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def set_reference(self, features, labels=None, held_out=None) -> None:
        if labels is None or not bool((labels >= 0).any()):
            raise ConfigError("class_fid needs the class labels of the real images; this reference has none")
        self.reference = (features.to(self.device, torch.float64), labels.to(self.device))

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
        require_labels(self.name, labels)
        self.fake.append(fake.to(self.device, torch.float64))
        self.labels.append(labels.to(self.device).long())

    def compute(self) -> Results:
        real, real_labels = self.reference_or_error()
        fake, labels = dim_zero_cat(self.fake), dim_zero_cat(self.labels)
        results, values = {}, []
        for c in torch.unique(labels).tolist():
            mine, theirs = fake[labels == c], real[real_labels == c]
            if len(mine) < 2 or len(theirs) < 2:
                raise ValueError(
                    f"class_fid needs at least 2 generated and 2 real images of every class; class {c} has "
                    f"{len(mine)} and {len(theirs)}: generate more samples"
                )
            with torch.autocast(fake.device.type, enabled=False):
                value = frechet_distance(*gaussian_statistics(theirs), *gaussian_statistics(mine))
            results[("class_fid", f"_{c}")] = value
            values.append(value)
        return {("class_fid", ""): sum(values) / len(values), **results}


@register_metric("cas")
class ClassifierAccuracy(GenerativeMetric):
    """Accuracy of a classifier on the samples, each labelled by its requested class: overall and per class."""

    higher_is_better = True
    needs_reference = needs_real = False
    needs_classifier = conditional = True

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.add_state("predicted", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def set_reference(self, features, labels=None, held_out=None) -> None:
        pass  # the classifier was trained on real data; nothing else is compared

    def update(self, fake, labels=None, logits=None, classifier_logits=None) -> None:
        require_labels(self.name, labels)
        if classifier_logits is None:
            raise ValueError("cas: update() needs the classifier's logits")
        self.predicted.append(classifier_logits.argmax(1).to(self.device))
        self.labels.append(labels.to(self.device).long())

    def compute(self) -> Results:
        predicted, labels = dim_zero_cat(self.predicted), dim_zero_cat(self.labels)
        correct = (predicted == labels).double()
        per_class = {
            ("cas", f"_{c}"): float(correct[labels == c].mean()) for c in torch.unique(labels).tolist()
        }
        return {("cas", ""): float(correct.mean()), **per_class}
