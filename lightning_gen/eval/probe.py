"""Linear probe: a linear classifier on frozen features.

Recipe: normalise the features with statistics of the training features (standardise, as a
BatchNorm without affine would, or L2), then fit ``W x + b`` by cross-entropy for a fixed budget:

- ``sgd``: mini-batch SGD with momentum and a cosine learning rate over ``epochs`` (the usual
  recipe for large feature sets), shuffled by a seeded generator;
- ``lbfgs``: full-batch L-BFGS with strong-Wolfe line search on the L2-regularised objective
  ``mean CE + weight_decay / 2 * ||W||^2`` (bias unpenalised): deterministic, and the optimum of
  multinomial logistic regression, which is what the tests compare with scikit-learn.

``augment=true`` is the papers' augmented linear evaluation instead (MoCo's ``main_lincls.py``, as
SimCLR, BYOL, SimSiam, DINO and MAE evaluate): every SGD step sees a fresh random resized crop and flip
of each training image, through the encoder frozen in eval mode (its BatchNorm statistics fixed), and
the classifier is scored on the whole, unaugmented evaluation images. It costs an encoder forward per
image and epoch where the fixed-feature probes cost one in total.

Everything runs on the device the features are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import bounded, choice
from lightning_gen.eval import EvalError
from lightning_gen.randomness import isolated


@dataclass
class ProbeConfig:
    optimizer: str = choice("sgd", "sgd", "lbfgs")
    epochs: int = 100  # sgd: passes over the training features
    lr: float = 0.1  # sgd, at batch_size 256 (scaled linearly with the batch)
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0  # sgd: decoupled from the loss as usual; lbfgs: the L2 penalty above
    lbfgs_iterations: int = 200
    normalize: str = choice("standardize", "standardize", "l2", "none")
    seed: int = 0
    # the papers' augmented linear evaluation (MoCo's main_lincls.py): fresh crops and flips of the training
    # images through the frozen encoder (eval mode) at every SGD step, instead of fixed features
    augment: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)  # augment: area fraction of the random resized crops
    flip_p: float = bounded(0.5, 0, 1)  # augment: horizontal flip probability


class LinearProbe(nn.Module):
    """Feature normalisation (fixed from the training features) followed by a linear layer."""

    def __init__(self, dim: int, num_classes: int, normalize: str = "standardize"):
        super().__init__()
        self.normalize = normalize
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def fit_normalization(self, x: torch.Tensor) -> None:
        if self.normalize == "standardize":
            self.mean.copy_(x.mean(0))
            self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "standardize":
            return (x - self.mean) / self.std
        if self.normalize == "l2":
            return F.normalize(x, dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.prepare(x))


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise EvalError(
            f"{what} needs labels for every sample; got {labels.numel()} samples, some unlabeled (-1)"
        )
    if int(labels.max()) >= num_classes:
        raise EvalError(f"{what}: label {int(labels.max())} is out of range for num_classes={num_classes}")


def train_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig | None = None
) -> LinearProbe:
    """Fit a linear probe on (N, D) features and (N,) labels; returns it in eval mode on their device."""
    cfg = cfg or ProbeConfig()
    check_labels(labels, num_classes, "the linear probe")
    features = features.float()
    with isolated(cfg.seed):  # the layer's initialisation, without touching the caller's streams
        probe = LinearProbe(features.shape[1], num_classes, cfg.normalize).to(features.device)
    probe.fit_normalization(features)
    x = probe.prepare(features)
    if cfg.optimizer == "lbfgs":
        _fit_lbfgs(probe.linear, x, labels, cfg)
    else:
        _fit_sgd(probe.linear, x, labels, cfg)
    return probe.eval()


def _fit_sgd(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig) -> None:
    n = len(x)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = cfg.epochs * steps_per_epoch
    lr = cfg.lr * batch / 256
    optimizer = torch.optim.SGD(
        linear.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for chunk in order.split(batch):
            for group in optimizer.param_groups:  # cosine to zero over the fixed budget
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(linear(x[chunk]), y[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def _fit_lbfgs(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig) -> None:
    optimizer = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=cfg.lbfgs_iterations,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(linear(x), y) + 0.5 * cfg.weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Fraction of samples whose label is among the k highest scores (k capped at the number of classes)."""
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = float((top == labels[:, None]).any(1).float().mean())
    return out


@torch.no_grad()
def evaluate_probe(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    check_labels(labels, probe.linear.out_features, "the linear probe's evaluation")
    logits = probe(features.float())
    acc = topk_accuracy(logits, labels)
    return {"top1": acc[1], "top5": acc[5], "loss": float(F.cross_entropy(logits, labels))}


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig | None = None,
) -> dict[str, float]:
    """Train on (train_x, train_y), report top-1/top-5 (fractions) on (test_x, test_y)."""
    with torch.enable_grad():
        probe = train_linear_probe(train_x, train_y, num_classes, cfg)
    result = evaluate_probe(probe, test_x, test_y)
    result["train_top1"] = evaluate_probe(probe, train_x, train_y)["top1"]
    return result


def augmented_linear_probe(
    method,
    train_set,
    train_features: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The augmented linear evaluation: a linear classifier trained by SGD (momentum, cosine lr) on the
    frozen encoder's features of randomly cropped and flipped training images, fresh at every step.

    ``train_set`` yields the uint8 training images; ``train_features`` (their unaugmented features)
    fix the normalisation; the result is scored on ``test_x``, ``test_y`` (unaugmented features).
    """
    from torch.utils.data import DataLoader, RandomSampler, default_collate

    from lightning_gen.data.views import random_resized_crop

    if cfg.optimizer != "sgd":
        raise EvalError(
            "probe.augment=true trains on fresh crops at every step, by SGD: set probe.optimizer=sgd"
        )
    check_labels(test_y, num_classes, "the linear probe's evaluation")
    was_training = method.training
    method.eval()  # main_lincls.py: the encoder in eval mode, BatchNorm statistics fixed
    batch = min(cfg.batch_size, len(train_set))
    total = cfg.epochs * math.ceil(len(train_set) / batch)
    lr = cfg.lr * batch / 256
    with isolated(cfg.seed), torch.enable_grad():  # crops, flips, order and init from the seed alone
        probe = LinearProbe(train_features.shape[1], num_classes, cfg.normalize).to(device)
        probe.fit_normalization(train_features.float().to(device))
        optimizer = torch.optim.SGD(
            probe.linear.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        sampler = RandomSampler(train_set, generator=generator)
        loader = DataLoader(train_set, batch_size=batch, sampler=sampler, collate_fn=default_collate)
        step = 0
        for _ in range(cfg.epochs):
            for items in loader:
                labels = torch.as_tensor(items["label"]).long().to(device)
                images = items["image"].to(device)
                images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
                views = random_resized_crop(
                    images, images.shape[-1], cfg.crop_scale, (3 / 4, 4 / 3), cfg.flip_p
                )
                with torch.no_grad():
                    features = method.embed_images(views).float().flatten(1)
                for group in optimizer.param_groups:  # cosine to zero over the fixed budget
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                labeled = labels >= 0  # unlabeled samples (-1) train nothing; a mask, not an index
                losses = F.cross_entropy(probe(features), labels.clamp(min=0), reduction="none")
                loss = (losses * labeled).sum() / labeled.sum().clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    method.train(was_training)
    probe.eval()
    result = evaluate_probe(probe, test_x.to(device), test_y.to(device))
    result["final_train_loss"] = float(loss.detach())
    return result
