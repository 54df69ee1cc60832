"""The training sampler and loader: data order a function of (seed, epoch), resumable mid-epoch.

Epoch e visits the training set in the order of ``randperm(n)`` drawn from a generator seeded with
``seed + e``, the same on every rank; rank r of W takes positions r, r + W, r + 2W, ... (the tail
that does not fill all ranks is dropped, as DistributedSampler's ``drop_last`` does). The order
therefore depends on nothing but the seed, the epoch and the world size: not on the global RNG
(evaluation cannot shift it), not on when the loader was created.

The loader counts the samples it has handed to training. That count is the loader's state in a
checkpoint (Lightning saves and restores the state of a train dataloader that has
``state_dict``/``load_state_dict``); a run resumed mid-epoch skips exactly the samples already
trained on, over all ranks, and so continues the uninterrupted run's order. On another world
size it still continues the same epoch without repeating or skipping a sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_gen.randomness import TRAIN_LOADER, stream_seed


class EpochSampler(DistributedSampler):
    """Seeded per-epoch permutation, strided over ranks, starting after ``skip`` samples (global count).

    A DistributedSampler subclass, so Lightning keeps it instead of injecting its own under DDP;
    Lightning calls ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume: dict[str, int] | None = None  # {"epoch", "samples"} from a checkpoint, not yet used
        self.skip = 0  # samples of this epoch (all ranks) to pass over

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        resume, self._resume = self._resume, None
        self.skip = resume["samples"] if resume and resume["epoch"] == epoch else 0

    def resume_from(self, epoch: int, samples: int) -> None:
        """Continue ``epoch`` after ``samples`` (all ranks together) once it is set."""
        self._resume = {"epoch": epoch, "samples": samples}

    def order(self) -> torch.Tensor:
        """The whole epoch's order of dataset indices, trimmed to a multiple of the world size."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator)[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        remaining = self.order()[self.skip :]
        return iter(remaining[self.rank :: self.num_replicas].tolist())

    # __len__ stays the full epoch's length per rank: Lightning counts the batches already done itself.


class ResumableLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` that knows how far training got in the current epoch.

    The iterator is created lazily (on the first batch), after Lightning has called ``set_epoch``,
    so worker processes never prefetch indices of the wrong epoch. Worker processes are seeded
    from (seed, rank, epoch) through the loader's own generator, never from the global RNG.
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, generator=torch.Generator(), **kwargs)
        self.samples_done = 0  # this epoch, this rank, handed to training

    def __iter__(self):
        sampler: EpochSampler = self.sampler
        self.generator.manual_seed(stream_seed(sampler.seed, sampler.rank, TRAIN_LOADER, sampler.epoch))
        if hasattr(self.dataset, "set_epoch"):  # datasets that augment per item seed by (seed, epoch, index)
            self.dataset.set_epoch(sampler.epoch)
        self.samples_done = 0
        for batch in super().__iter__():
            self.samples_done += len(batch["index"]) if isinstance(batch, dict) else len(batch[0])
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: EpochSampler = self.sampler
        return {
            "epoch": sampler.epoch,
            "samples": sampler.skip + self.samples_done * sampler.num_replicas,
            "seed": sampler.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochSampler = self.sampler
        if state.get("seed", sampler.seed) != sampler.seed:
            # another seed gives another order: skipping a count of it would not skip what was trained on
            return
        sampler.resume_from(int(state["epoch"]), int(state["samples"]))
