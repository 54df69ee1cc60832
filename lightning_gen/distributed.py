"""Cross-process helpers that are correct on 1 process and on N (rank-safe, differentiable where needed)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own slice.

    The loss on every rank depends on every rank's features, so the gradient w.r.t. the local
    slice is the sum over ranks of d(loss_r)/d(slice): an all-reduce of the gathered gradient.
    With DDP averaging gradients over ranks, this reproduces the single-process gradient of the
    mean loss on the concatenated batch exactly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


class _GatherWithOwnGrad(torch.autograd.Function):
    """all_gather whose backward keeps only this rank's own loss gradient of its own slice.

    Every rank computes the same loss L on the gathered batch; the gradient that reaches this
    rank's slice is dL/d(slice) from this rank's copy of L alone, with no all-reduce. DDP's average
    over ranks then gives dL/dθ / world_size: the convention of code that all-reduces a batch
    statistic *without* gradient (Barlow Twins' official cross-correlation), reproduced exactly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        return grads[dist.get_rank()].contiguous()


def gather_with_grad(x: torch.Tensor, own_grad_only: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, keeping gradients.

    By default the backward sums every rank's gradient of its slice (``_GatherWithGrad``: with DDP's
    average, the exact gradient of the loss on the global batch). ``own_grad_only`` keeps only this
    rank's own (``_GatherWithOwnGrad``: 1 / world_size of it, when every rank computes the same loss).
    """
    if not is_distributed():
        return x
    gather = _GatherWithOwnGrad if own_grad_only else _GatherWithGrad
    return torch.cat(gather.apply(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, without gradients."""
    if not is_distributed():
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def balanced_range(n: int, world: int | None = None, rank_: int | None = None) -> range:
    """This rank's contiguous share of ``n`` items: ranks hold ``n // W`` or ``n // W + 1`` items, in
    rank order, so concatenating the shares over ranks gives ``range(n)`` (a rank may hold none
    when ``n < W``)."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    return range(n * rank_ // world, n * (rank_ + 1) // world)


@torch.no_grad()
def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (padded, then trimmed)."""
    if not is_distributed():
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather_no_grad(size).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    chunks = gather_no_grad(padded).split(max(sizes))
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` itself on 1 process). No gradient."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``x`` over ranks. No gradient."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(x, src)
    return x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN: gather the batch of every rank, permute it (one permutation, from rank 0)
    and hand each rank its slice, so BatchNorm statistics of a key batch mix samples of all ranks
    and cannot leak which key belongs to which query. Returns (local shuffled slice, permutation)."""
    if not is_distributed():
        return x, torch.arange(len(x), device=x.device)
    everything = gather_no_grad(x)
    perm = broadcast(torch.randperm(len(everything), device=x.device))
    return everything[perm].chunk(world_size())[rank()], perm


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo ``batch_shuffle`` on outputs: this rank gets back the rows of its own original samples."""
    if not is_distributed():
        return y
    everything = gather_no_grad(y)
    return everything[torch.argsort(perm)].chunk(world_size())[rank()]
