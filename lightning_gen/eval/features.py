"""Frozen features of a whole split, extracted on every rank's shard and gathered exactly once each.

DistributedSampler pads the index list so that every rank gets the same number of samples: with
N samples and W ranks, ``W * ceil(N / W) - N`` samples are seen twice. Gathering naively would
count them twice (a kNN bank with duplicates, a probe weighted towards the first samples). Each
batch carries the sample's ``index`` in its split, so after gathering we keep one row per index,
sorted by index: the result is the same on every rank and equal to a single-process pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_gen import distributed
from lightning_gen.eval import EvalError


@dataclass
class Features:
    """Features (N, D), labels (N,) int64 (-1 = unlabeled) and split indices (N,), sorted by index."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    def labeled(self, what: str = "this evaluation") -> Features:
        """Only the labeled samples; an error naming the split when there are none."""
        keep = self.labels >= 0
        if not bool(keep.any()):
            raise EvalError(
                f"{what} needs labels, but none of the {len(self)} samples of this split is labeled "
                f"(label -1). Evaluate on a labeled dataset or split (e.g. data=cifar10, or the labeled "
                f"train split of stl10), or use an evaluation that needs no labels (the embedding plot)."
            )
        if bool(keep.all()):
            return self
        return Features(self.features[keep], self.labels[keep], self.indices[keep])

    def to(self, device: torch.device | str) -> Features:
        return Features(self.features.to(device), self.labels.to(device), self.indices.to(device))


def has_embed(module) -> bool:
    """True when the method overrides ``Method.embed`` (it learns a representation)."""
    from lightning_gen.methods.base import Method

    return type(module).embed is not Method.embed


def require_embed(module) -> None:
    if not has_embed(module):
        name = getattr(module, "registry_name", type(module).__name__)
        raise EvalError(
            f"method {name!r} does not expose embed(x), so it has no representation to evaluate: "
            f"probe, kNN, fine-tuning and clustering need a representation method (one that defines "
            f"embed, e.g. autoencoder, vae, simclr, moco, dino). Generators are evaluated with FID instead."
        )


def sharded_loader(loader: DataLoader) -> DataLoader:
    """The same loader over this rank's shard (no shuffling, nothing dropped; padded by the sampler)."""
    if not distributed.is_distributed():
        return loader
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=distributed.world_size(),
        rank=distributed.rank(),
        shuffle=False,
        drop_last=False,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
    )


def dedupe_by_index(features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> Features:
    """One row per sample index, sorted by index (drops DistributedSampler's padding duplicates)."""
    order = torch.argsort(indices, stable=True)
    indices, features, labels = indices[order], features[order], labels[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return Features(features[first], labels[first], indices[first])


@torch.no_grad()
def sharded_features(embed: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device) -> Features:
    """``embed(images on device)`` -> (B, D) for every sample of ``loader``'s dataset, sorted by index.

    Under torch.distributed every rank embeds its DistributedSampler shard (``ceil(N / W)`` samples,
    at least one: balanced, and no rank skips the gather) and receives the full, deduplicated result.
    """
    feats, labels, indices = [], [], []
    for batch in sharded_loader(loader):
        images = batch["image"].to(device, non_blocking=True)
        feats.append(embed(images).flatten(1))
        labels.append(torch.as_tensor(batch["label"]).to(device).long())
        indices.append(torch.as_tensor(batch["index"]).to(device).long())
    if not feats:  # DistributedSampler gives every rank >= 1 sample, so only an empty split gets here
        raise EvalError(f"the split to evaluate is empty (dataset of {len(loader.dataset)} samples)")
    local = torch.cat(feats), torch.cat(labels), torch.cat(indices)
    gathered = [distributed.gather_variable(t) for t in local]
    return dedupe_by_index(*gathered)


@torch.no_grad()
def extract_features(module, loader: DataLoader, device: torch.device | str | None = None) -> Features:
    """Features of every sample of ``loader``'s dataset with ``module.embed_images`` in eval mode.

    Under torch.distributed every rank embeds its shard and receives the full, deduplicated result.
    The module's train/eval mode is restored afterwards.
    """
    require_embed(module)
    device = torch.device(device) if device is not None else next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    # Weights stored in half precision (bf16-true) need autocast; float32 weights run in float32.
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16)
        else contextlib.nullcontext()
    )
    was_training = module.training
    module.eval()
    try:
        with autocast:
            return sharded_features(lambda images: module.embed_images(images).float(), loader, device)
    finally:
        module.train(was_training)


def split_features(module, datamodule, split: str, device=None) -> Features:
    """Frozen features of ``split`` of a DataModule's plain labeled evaluation view."""
    return extract_features(module, datamodule.eval_dataloader(split), device)
