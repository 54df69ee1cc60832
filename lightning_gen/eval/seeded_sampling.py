"""Generated samples that are the same for any world size and batch size, dealt evenly over ranks.

Sample ``i`` of an evaluation (``0 <= i < N``) belongs to the seed chunk ``i // SEED_CHUNK``; every
random draw of chunk ``c`` comes from its own generator, seeded from ``(seed, c)``. Which rank
generates a sample and which other samples share its ``sample()`` call therefore change nothing
about it: the set of samples depends on ``seed`` alone (and sample ``i`` does not depend on ``N``).

How the per-chunk generators reach a method's ``sample(n, cond, generator)`` without changing its
signature: the method is handed a stand-in ``torch.Generator``, and while it samples,
``ChunkSeededDraws`` (a ``TorchFunctionMode``) serves every random draw made with the stand-in
row-block by row-block: rows of chunk ``c`` come from chunk ``c``'s generator, which always draws
the chunk's whole ``SEED_CHUNK`` rows (rows another call owns are drawn and dropped). This holds
for any sampler whose random draws have the samples along their first dimension and whose sequence
of draws does not depend on the values drawn (true of every sampler here: fixed step counts). A
draw it cannot split (another first dimension, ``randperm``) and a draw from the global stream
(no generator) are errors, so a sampler that breaks the guarantee is caught by the first FID.

Work is balanced: rank ``r`` of ``W`` generates the contiguous samples
``distributed.balanced_range(N, W, r)`` (``N // W`` or one more), in the same number of calls of at
most ``batch_size`` on every rank, so concatenating the ranks' outputs gives the samples in order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from lightning_gen import distributed

SEED_CHUNK = 16  # samples per seed chunk: small, so any batch holds whole chunks but for two partial ones

_SIZED = (torch.randn, torch.rand, torch.randint)  # (size) factories: the first size entry is the sample axis
_LIKE = (torch.randn_like, torch.rand_like, torch.randint_like)  # shaped like their input
# row-wise draws: rows of the input tensors map to rows of the output (in-place methods: of self)
_ROWWISE = (
    torch.multinomial,
    torch.normal,
    torch.bernoulli,
    torch.poisson,
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    torch.Tensor.bernoulli_,
    torch.Tensor.exponential_,
    torch.Tensor.random_,
    torch.Tensor.geometric_,
    torch.Tensor.log_normal_,
    torch.Tensor.cauchy_,
)
# a set: every torch call of a sampler is looked up in it
_RANDOM = frozenset((*_SIZED, *_LIKE, *_ROWWISE, torch.randperm))


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed for chunk ``chunk`` (hashed: neighbouring seeds do not share chunks)."""
    words = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))


class ChunkSeededDraws(TorchFunctionMode):
    """Serve random draws made with ``handle`` from per-chunk generators, for samples ``first .. first+count-1``."""

    def __init__(self, handle: torch.Generator, first: int, count: int, seed: int):
        super().__init__()
        self.handle, self.first, self.count = handle, first, count
        chunks = range(first // SEED_CHUNK, (first + count - 1) // SEED_CHUNK + 1) if count else range(0)
        # fresh generators for every call: a chunk split over two calls draws the same numbers in both
        self.generators = {c: torch.Generator(handle.device).manual_seed(chunk_seed(seed, c)) for c in chunks}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # every torch call of the sampler passes here: the common case (no random draw) is kept cheap
        if func in _RANDOM:
            generator = kwargs.get("generator") if kwargs else None
            if generator is self.handle:
                return self._split(func, args, kwargs)
            if generator is None:
                raise RuntimeError(
                    f"sample() drew {_name(func)} from the global random stream: evaluation samples would "
                    "differ between ranks and runs. Pass sample()'s generator to every random draw."
                )
        elif kwargs and kwargs.get("generator") is self.handle:
            raise RuntimeError(
                f"sample() drew {_name(func)} with its generator: a draw that cannot be split by sample, "
                "so evaluation noise could not be seeded per sample"
            )
        return func(*args, **(kwargs or {}))

    # ------------------------------------------------------------------ one draw, split by chunk
    def _pieces(self):
        """For each chunk this call touches: (its generator, its rows as a slice of the call, the same
        rows as a slice of the chunk)."""
        stop = self.first + self.count
        for c, generator in self.generators.items():
            lo, hi = max(self.first, c * SEED_CHUNK), min(stop, (c + 1) * SEED_CHUNK)
            yield (
                generator,
                slice(lo - self.first, hi - self.first),
                slice(lo - c * SEED_CHUNK, hi - c * SEED_CHUNK),
            )

    def _check_rows(self, func, rows: int) -> None:
        if rows != self.count:
            raise RuntimeError(
                f"sample() drew {_name(func)} with {rows} rows for {self.count} samples: evaluation "
                "noise is seeded per sample, so every random draw must have the samples along its first dimension"
            )

    def _split(self, func, args, kwargs):
        if func in _SIZED or (func is torch.normal and not any(isinstance(a, torch.Tensor) for a in args)):
            draw = self._sized(func, args, kwargs)
        elif func in _LIKE:
            draw = self._like(func, args, kwargs)
        elif func in _ROWWISE:
            draw = self._rowwise(func, args, kwargs)
        else:  # randperm: no sample axis
            raise RuntimeError(
                f"sample() drew {_name(func)} with its generator: a draw that cannot be split by sample, "
                "so evaluation noise could not be seeded per sample"
            )
        out = torch.cat([draw(generator, mine, within)[within] for generator, mine, within in self._pieces()])
        if func in _ROWWISE and _name(func).endswith("_"):  # in-place: fill the caller's tensor
            return args[0].copy_(out)
        return out

    # Each builder returns draw(generator, mine, within): chunk-sized numbers from that chunk's
    # generator; ``mine`` are the chunk's rows in this call, ``within`` the same rows in the chunk.
    def _sized(self, func, args, kwargs):
        """Draws whose shape is a size argument: ``randn(n, d)``, ``randn((n, d))``, ``randint(lo, hi, (n,))``."""
        if "size" in kwargs:
            size, rebuild = kwargs["size"], lambda s: (args, {**kwargs, "size": s})
        elif func in (torch.randint, torch.normal):  # the size comes after low/high or mean/std
            size, rebuild = args[-1], lambda s: ((*args[:-1], s), kwargs)
        elif len(args) == 1 and not isinstance(args[0], int):
            size, rebuild = args[0], lambda s: ((s,), kwargs)
        else:
            size, rebuild = args, lambda s: ((s,), kwargs)
        self._check_rows(func, int(size[0]))

        def draw(generator, mine, within):
            chunk_args, chunk_kwargs = rebuild((SEED_CHUNK, *size[1:]))
            return func(*chunk_args, **{**chunk_kwargs, "generator": generator})

        return draw

    def _like(self, func, args, kwargs):
        """``randn_like(x)``: a draw shaped like a chunk of ``x``."""
        self._check_rows(func, args[0].shape[0])

        def draw(generator, mine, within):
            like = args[0].new_empty((SEED_CHUNK, *args[0].shape[1:]))
            return func(like, *args[1:], **{**kwargs, "generator": generator})

        return draw

    def _rowwise(self, func, args, kwargs):
        """Draws shaped by their tensor inputs (probabilities, means, the tensor filled in place):
        each chunk gets its rows, completed to ``SEED_CHUNK`` rows with copies of a row of this call
        (what a draw consumes from its generator depends on the shape, not on the values)."""
        rows = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
        self._check_rows(func, rows)

        def draw(generator, mine, within):
            index = torch.full((SEED_CHUNK,), mine.start, dtype=torch.long)
            index[within] = torch.arange(mine.start, mine.stop)
            chunk_args = [
                a[index.to(a.device)] if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == rows else a
                for a in args
            ]  # indexing copies, so an in-place draw fills a copy
            return func(*chunk_args, **{**kwargs, "generator": generator})

        return draw


def calls_per_rank(n: int, batch_size: int, world: int) -> int:
    """The ``sample()`` calls the largest share of ``n`` samples over ``world`` ranks needs at ``batch_size``."""
    return max(1, math.ceil(math.ceil(n / world) / batch_size))


def call_ranges(n: int, batch_size: int, world: int | None = None, rank: int | None = None) -> list[range]:
    """This rank's samples in calls: its balanced share split into as many calls as the largest
    share needs at ``batch_size`` (``calls_per_rank``), as evenly as possible; a share smaller than
    that (fewer samples than ranks, or one sample per call) leaves out its empty calls."""
    world = distributed.world_size() if world is None else world
    share = distributed.balanced_range(n, world, rank)
    calls = calls_per_rank(n, batch_size, world)
    pieces = distributed.balanced_range
    ranges = [
        range(share.start + p.start, share.start + p.stop)
        for p in (pieces(len(share), calls, i) for i in range(calls))
    ]
    return [r for r in ranges if len(r)]


def requested_labels(indices: range, num_classes: int, device) -> torch.Tensor:
    """The class a conditional model is asked for at each sample index: classes in turn (balanced)."""
    return torch.arange(indices.start, indices.stop, device=device) % num_classes


@torch.no_grad()
def seeded_samples(module, indices: range, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (float in [0, 1]) of samples ``indices`` from ``module.sample`` with per-chunk seeded
    noise, and the classes they were asked for (None for an unconditional model). ``options``: the
    model's own sampling options (sampler, steps, guidance...)."""
    labels = None
    if getattr(module, "conditional", False):
        labels = requested_labels(indices, module.data_info.num_classes, module.device)
    handle = torch.Generator(module.device)
    with ChunkSeededDraws(handle, indices.start, len(indices), seed):
        images = module.sample(len(indices), cond=labels, generator=handle, **options)
    return images, labels
