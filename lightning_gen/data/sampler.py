"""The training sampler and loader: data order a function of (seed, epoch), resumable mid-epoch.

Epoch e visits the training set in the order of ``randperm(n)`` drawn from a generator seeded with
``seed + e``, the same on every rank; rank r of W takes positions r, r + W, r + 2W, ... (the tail
that does not fill all ranks is dropped, as DistributedSampler's ``drop_last`` does). The order
therefore depends on nothing but the seed, the epoch and the world size: not on the global RNG
(evaluation cannot shift it), not on when the loader was created.

The loader counts the samples it has handed to training. That count is the loader's state in a
checkpoint (Lightning saves and restores the state of a train dataloader that has
``state_dict``/``load_state_dict``); a run resumed mid-epoch skips exactly the samples already
trained on, over all ranks, and so continues the uninterrupted run's order.

On another allocation (world size or per-device batch) the resumed epoch deals the permutation's
positions not yet trained on over the new ranks, each once (trimmed to a multiple of the new world
size, as a whole epoch is). Lightning counts the batches of a resumed epoch per process in the old
allocation's batches, against the new allocation's batches per epoch, so the epoch would end early
or never; ``ElasticEpochResume`` re-counts the batches done in the new allocation's units, so the
epoch ends when its last unseen batch is trained, then validates and checkpoints as usual (and
``schedules.training_progress`` continues from where it stopped).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_gen.randomness import TRAIN_LOADER, stream_seed


class EpochSampler(DistributedSampler):
    """Seeded per-epoch permutation, strided over ranks, starting after ``skip`` samples (global count).

    A DistributedSampler subclass, so Lightning keeps it instead of injecting its own under DDP;
    Lightning calls ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
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

    def remaining(self) -> torch.Tensor:
        """The positions of this epoch not yet trained on, trimmed to a multiple of the world size (a
        resume on another world size can leave a count that does not divide; every rank gets as many)."""
        remaining = self.order()[self.skip :]
        return remaining[: len(remaining) // self.num_replicas * self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.remaining()[self.rank :: self.num_replicas].tolist())

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
        self.resumed_on_new_allocation: dict[str, int] | None = None  # a loaded state of another allocation

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
            "world_size": sampler.num_replicas,  # the allocation that counted the batches done
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochSampler = self.sampler
        if state.get("seed", sampler.seed) != sampler.seed:
            # another seed gives another order: skipping a count of it would not skip what was trained on
            return
        sampler.resume_from(int(state["epoch"]), int(state["samples"]))
        same = (state.get("world_size"), state.get("batch_size")) == (sampler.num_replicas, self.batch_size)
        self.resumed_on_new_allocation = None if same or "world_size" not in state else dict(state)

    def batches_left(self, samples_done: int) -> int:
        """Batches per process this allocation trains after ``samples_done`` samples of an epoch."""
        sampler: EpochSampler = self.sampler
        per_process = max(sampler.total_size - samples_done, 0) // sampler.num_replicas
        return per_process // self.batch_size if self.drop_last else -(-per_process // self.batch_size)


class ElasticEpochResume(L.Callback):
    """Re-counts the batches done of an epoch resumed on another allocation in this allocation's batches.

    Lightning restores the batch count of the interrupted epoch as the old processes counted it and
    ends the epoch when that count reaches this allocation's batches per epoch: from 2 processes to 1
    it would stop half-way through what is left, from 1 to 2 it would wait for batches that never come
    and never close the epoch. ``on_train_start`` runs after the loop and loader states are restored
    and before the epoch loop reads them: the count is set so that exactly the batches left end it.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        resumed = getattr(loader, "resumed_on_new_allocation", None)
        if resumed is None or trainer.num_training_batches == float("inf"):
            return
        loader.resumed_on_new_allocation = None
        batch_progress = trainer.fit_loop.epoch_loop.batch_progress
        if not trainer.fit_loop.restarted_mid_epoch or batch_progress.is_last_batch:
            return  # the checkpoint closed its epoch: the next one starts from its first batch anyway
        progress = batch_progress.current
        left = loader.batches_left(int(resumed["samples"]))
        done = max(int(trainer.num_training_batches) - left, 0)
        shift = done - progress.processed
        progress.ready += shift
        progress.started += shift
        progress.processed += shift
        progress.completed += shift
        rank_zero_info(
            f"[lgen] resuming epoch {trainer.current_epoch} after {resumed['samples']} samples, written by "
            f"{resumed['world_size']} process(es) x {resumed['batch_size']}: {left} batches of "
            f"{trainer.world_size} x {loader.batch_size} left"
        )
