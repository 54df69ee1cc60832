"""Semi-supervised fine-tuning with 1% / 10% of the labels (SimCLR's protocol, Chen et al. 2020).

The labeled subset is class-balanced: the same number of images of every class,
``round(fraction * N / C)`` (at least 1), drawn by a permutation seeded with ``seed`` — so the same
seed always gives the same subset (the indices are written next to the results). The encoder
(everything ``embed`` uses) and a new linear head are then trained end to end with cross-entropy on
the subset: SGD with Nesterov momentum and a cosine schedule for a fixed number of epochs (SimCLR:
60 epochs for 1 %, 30 for 10 %, lr 0.05 x batch / 256), with small random translations as the only
augmentation, and evaluated top-1 / top-5 on the evaluation split.

``freeze=k`` is RotNet's semi-frozen evaluation (Gidaris et al. 2018, Sec. 3; gidariss/
FeatureLearningRotNet's ``*_ConvClassifier_on_RotNet_*`` configs): the first k stages of the encoder
(``nets.backbones.encoder_stages``: a ResNet's stem and layer1-4, a ViT's embedding, blocks and final
norm) keep their weights and, in eval mode, their BatchNorm statistics; the later stages and the head
train. ``reinit`` restarts the later stages from fresh weights, as RotNet trains a new conv block on its
frozen conv2 features. ``freeze=0`` is the full fine-tune.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import bounded
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
    # RotNet's semi-frozen protocol: the first `freeze` encoder stages (stem / blocks) stay fixed, BatchNorm
    # statistics included; 0 fine-tunes everything
    freeze: int = bounded(0, 0)
    reinit: bool = (
        False  # the stages after the frozen ones restart from fresh weights (RotNet's CIFAR-10 classifier)
    )


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


def freeze_stages(method, stages: int, reinit: bool = False) -> list[nn.Module]:
    """Make the encoder behind ``method.embed`` trainable except its first ``stages`` stages; returns the
    frozen modules (to keep in eval mode while the rest trains).

    Every parameter of the encoder trains otherwise, also where training kept it fixed (DINO's teacher,
    a momentum copy; MoCo v3's frozen patch projection), except a fixed sine-cosine position table."""
    from lightning_gen.export import backbone_of
    from lightning_gen.nets.backbones import encoder_stages

    net = backbone_of(method)
    try:
        parts = encoder_stages(net)
    except ValueError as error:
        if stages == 0 and not reinit:
            return []  # a full fine-tune of an encoder without known stages
        raise EvalError(f"finetune.freeze={stages}: {error}") from error
    if not 0 <= stages <= len(parts):
        raise EvalError(
            f"finetune.freeze={stages}, but the {type(net).__name__} encoder has {len(parts)} stages "
            f"(0 fine-tunes all of them)"
        )
    fixed_table = net.pos_embed if getattr(net, "fixed_pos_embed", False) else None
    for p in net.parameters():
        if p is not fixed_table:
            p.requires_grad_(True)
    frozen: list[nn.Module] = []
    for item in (item for stage in parts[:stages] for item in stage):
        if isinstance(item, nn.Parameter):
            item.requires_grad_(False)
        else:
            item.requires_grad_(False)
            frozen.append(item)
    if reinit:  # fresh weights from the caller's (seeded) stream
        for item in (item for stage in parts[stages:] for item in stage):
            if isinstance(item, nn.Module):
                for m in item.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
    return frozen


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


def train_classifier(
    method,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    cfg: FinetuneConfig,
    device: torch.device | str = "cpu",
) -> tuple[Classifier, dict[str, float]]:
    """A copy of ``method``'s encoder + a new linear head, trained on labeled uint8 images (in eval mode)."""
    require_embed(method)
    device = torch.device(device)
    method = copy.deepcopy(method).to(device).float()
    with torch.no_grad():
        method.eval()
        dim = method.embed_images(train_images[:2].to(device)).flatten(1).shape[1]
    with isolated(cfg.seed):  # the head's and re-initialised stages' weights; the caller's streams untouched
        model = Classifier(method, num_classes, dim).to(device)
        frozen = freeze_stages(method, cfg.freeze, cfg.reinit)
    n = len(train_images)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = max(epochs * steps_per_epoch, cfg.min_steps)
    lr = cfg.lr * batch / 256
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for module in frozen:  # frozen stages keep their BatchNorm statistics (and no dropout or drop-path)
        module.eval()
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
    stats = {"train_samples": n, "steps": total, "final_train_loss": float(loss.detach())}
    return model.eval(), {**stats, "frozen_stages": cfg.freeze}


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
    model, stats = train_classifier(method, train_images, train_labels, num_classes, epochs, cfg, device)
    logits, labels = [], []
    with torch.no_grad():
        for batch in eval_loader:
            logits.append(model(batch["image"].to(model.head.weight.device)))
            labels.append(torch.as_tensor(batch["label"]).to(model.head.weight.device))
    acc = topk_accuracy(torch.cat(logits), torch.cat(labels))
    return {"top1": acc[1], "top5": acc[5], **stats}
