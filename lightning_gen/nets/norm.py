"""BatchNorm over a chosen group of samples: the global batch of all ranks, or sub-batches of one device.

Which samples share BatchNorm statistics is part of an SSL recipe, not a detail:

- ``GlobalBatchNorm``: statistics over the batch of *all* ranks, as SimCLR (Chen et al. 2020, "global
  BN") and MoCo v3 (Chen, Xie, He 2021, SyncBN) train; with per-device statistics a large-batch
  run on 8 GPUs would normalise over B/8 samples. Unlike ``torch.nn.SyncBatchNorm`` it also runs
  on CPU processes (gloo), where the 2-process tests check that it equals BatchNorm on the
  concatenated batch, outputs and gradients.
- ``SplitBatchNorm``: statistics over ``num_splits`` sub-batches of one device's batch, as if each
  were on its own GPU: how MoCo's official single-GPU CIFAR demo emulates the multi-GPU
  shuffle-BN (He et al. 2020, Sec. 3.3): queries and keys are normalised in differently composed
  sub-batches, so the BatchNorm statistics cannot tell a query which key is its positive.

Both keep BatchNorm's parameters, buffers and state-dict keys, so ``convert_batchnorm`` can swap
them in and out of any network (checkpoints stay interchangeable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.distributed import gather_with_grad, is_distributed


class _GroupedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of any input rank (N, C, ...) whose training statistics a subclass groups differently."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"expected an input with a channel dimension (N, C, ...), got shape {tuple(x.shape)}"
            )

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if not self.track_running_stats:
            return
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * count / max(count - 1, 1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


class GlobalBatchNorm(_GroupedBatchNorm):
    """BatchNorm whose training statistics are those of the concatenated batch of every rank.

    Mean and variance come from sums all-gathered *with gradient*, so the backward pass is that of
    BatchNorm on the global batch (DDP then averages the parameter gradients as usual). The variance
    is computed around the global mean (two passes), not as E[x²] - E[x]², for float32 accuracy.
    Ranks must hold equally many samples (the training loader drops the last partial batch).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * torch.distributed.get_world_size()
        xf = x.float()
        mean = gather_with_grad(xf.sum(dims)[None]).sum(0) / count
        var = gather_with_grad((xf - mean.view(shape)).pow(2).sum(dims)[None]).sum(0) / count
        self._update_running_stats(mean.detach(), var.detach(), count)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:  # None: a scale-only BatchNorm (SimCLR's projection output)
            y = y + self.bias.view(shape)
        return y.to(x.dtype)


class SplitBatchNorm(_GroupedBatchNorm):
    """BatchNorm whose training statistics are computed separately over ``num_splits`` sub-batches.

    Sample i belongs to sub-batch ``i % num_splits`` (a strided split: one BatchNorm call on the batch
    viewed as (N / splits, C * splits, ...)). Running statistics are the mean over sub-batches. With
    ``num_splits = 1`` it is plain BatchNorm. The output has the input's memory format.
    """

    num_splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % g:
            raise ValueError(f"SplitBatchNorm: a batch of {n} does not split into {g} equal sub-batches")
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        y = F.batch_norm(
            x.reshape(n // g, c * g, *x.shape[2:]), None, None, weight, bias, True, 0.0, self.eps
        ).reshape(x.shape)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)  # the reshapes made an NHWC input NCHW
        with torch.no_grad():  # each sub-batch's statistics, averaged, feed the running estimates
            dims = [0, *range(2, x.dim())]
            per_split = x.float().reshape(n // g, g * c, *x.shape[2:])
            mean = per_split.mean(dims).view(g, c).mean(0)
            var = per_split.var(dims, unbiased=False).view(g, c).mean(0)
        self._update_running_stats(mean, var, n // g * (x.numel() // (n * c)))
        return y


def convert_batchnorm(module: nn.Module, cls: type[_GroupedBatchNorm]) -> nn.Module:
    """Swap every BatchNorm1d/2d (or other grouped BatchNorm) in ``module`` for ``cls``, in place,
    keeping parameters and buffers (the same tensors: optimizers and checkpoints are unaffected)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            if type(child) is cls:
                continue
            twin = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            twin.weight, twin.bias = child.weight, child.bias
            twin.running_mean, twin.running_var = child.running_mean, child.running_var
            twin.num_batches_tracked = child.num_batches_tracked
            twin.train(child.training)
            setattr(module, name, twin)
        else:
            convert_batchnorm(child, cls)
    return module


def set_batchnorm_splits(module: nn.Module, splits: int) -> None:
    """Set the number of sub-batches of every SplitBatchNorm in ``module``."""
    for m in module.modules():
        if isinstance(m, SplitBatchNorm):
            m.num_splits = splits
