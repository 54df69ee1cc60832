"""Semi-supervised fine-tuning with 1% / 10% of the labels (SimCLR's protocol, Chen et al. 2020).

The labeled subset is class-balanced: the same number of images of every class,
``round(fraction * N / C)`` (at least 1), drawn by a permutation seeded with ``seed`` — so the same
seed always gives the same subset (the indices are written next to the results). The encoder
(everything ``embed`` uses) and a new linear head are then trained end to end with cross-entropy on
the subset: SGD with Nesterov momentum and a cosine schedule for a fixed number of epochs (SimCLR:
60 epochs for 1 %, 30 for 10 %, lr 0.05 x batch / 256), with small random translations as the only
augmentation, and evaluated top-1 / top-5 on the evaluation split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.eval import EvalError
from lightning_gen.eval.features import require_embed
from lightning_gen.eval.probe import topk_accuracy
from lightning_gen.randomness import isolated


@dataclass
class FinetuneConfig:
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    epochs: list[int] = field(default_factory=lambda: [60, 30])  # per fraction (SimCLR)
    min_steps: int = 100  # tiny subsets: at least this many optimizer steps
    batch_size: int = 256
    lr: float = 0.05  # at batch 256, scaled linearly
    weight_decay: float = 0.0
    translate: float = 0.125  # random shifts up to this fraction of the image size; 0 disables
    seed: int = 0


def balanced_subset(
    labels: torch.Tensor, fraction: float, seed: int = 0, num_classes: int | None = None
) -> torch.Tensor:
    """Sorted indices of a class-balanced subset with ``fraction`` of the samples (equal count per class)."""
    labels = torch.as_tensor(labels).cpu()
    if not 0 < fraction <= 1:
        raise EvalError(f"label fraction must be in (0, 1], got {fraction}")
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise EvalError("a labeled subset needs labels: the training split has unlabeled samples (-1)")
    num_classes = num_classes or int(labels.max()) + 1
    per_class = max(1, round(fraction * len(labels) / num_classes))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise EvalError(
                f"class {c} has {len(members)} training samples, fewer than the {per_class} per class that a "
                f"balanced {fraction:.0%} subset needs; use a smaller fraction"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


class Classifier(nn.Module):
    """The method's encoder (through ``embed_images``) followed by a linear head."""

    def __init__(self, method, num_classes: int, feature_dim: int):
        super().__init__()
        self.method = method
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.method.embed_images(images).float().flatten(1))


def random_translate(images: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Shift every uint8 image by up to ``amount`` of its size (zero fill), independently per image."""
    if amount <= 0:
        return images
    n = len(images)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * amount * 2  # affine_grid units: 2 = image size
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    moved = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved.round().clamp(0, 255).to(torch.uint8)


def finetune(
    method,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_loader,
    num_classes: int,
    epochs: int,
    cfg: FinetuneConfig,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Fine-tune a copy of ``method`` + a new linear head on labeled uint8 images; top-1/5 on eval_loader."""
    require_embed(method)
    device = torch.device(device)
    method = copy.deepcopy(method).to(device).float()
    with torch.no_grad():
        method.eval()
        dim = method.embed_images(train_images[:2].to(device)).flatten(1).shape[1]
    with isolated(cfg.seed):  # the head's initialisation, without touching the caller's streams
        model = Classifier(method, num_classes, dim).to(device)
    n = len(train_images)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = max(epochs * steps_per_epoch, cfg.min_steps)
    lr = cfg.lr * batch / 256
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    step = 0
    with torch.enable_grad():
        while step < total:
            for chunk in torch.randperm(n, generator=generator).split(batch):
                if step >= total:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                images = random_translate(train_images[chunk], cfg.translate, generator).to(device)
                loss = F.cross_entropy(model(images), train_labels[chunk].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in eval_loader:
            logits.append(model(batch["image"].to(device)))
            labels.append(torch.as_tensor(batch["label"]).to(device))
    acc = topk_accuracy(torch.cat(logits), torch.cat(labels))
    return {
        "top1": acc[1],
        "top5": acc[5],
        "train_samples": n,
        "steps": total,
        "final_train_loss": float(loss.detach()),
    }
