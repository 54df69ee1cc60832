"""Stateless schedules: pure functions of training progress.

Every schedule of a method (learning rate, EMA momentum τ, DINO's teacher temperature and weight
decay, SwAV's prototype freeze, ...) reads ``training_progress(trainer)``: the one definition of how
far training is. It counts epochs, not optimizer steps, so it survives a change of allocation:

    progress = (completed epochs + fraction of the current epoch trained) / planned epochs

expressed in optimizer steps of the *current* allocation (world size, per-device batch, gradient
accumulation): ``step = epoch * steps_per_epoch + steps done in this epoch``, ``total = max_epochs *
steps_per_epoch``. On the allocation a run started with, ``step`` is ``global_step`` and ``total`` is
Lightning's ``estimated_stepping_batches``; after a resume on 16 instead of 8 GPUs at epoch 50 of 100
it is still half-way (``global_step`` would count the old, larger steps against the new total and
land at the end). Where ``trainer.max_steps`` ends training before ``max_epochs`` does, progress is
``global_step / max_steps``: Lightning's own stopping rule. Nothing here keeps state: the counters are
in every checkpoint, so a resumed run computes exactly the values an uninterrupted run computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """Where training stands, counted in optimizer steps of the current allocation."""

    step: int  # optimizer steps done before the current one
    total: float  # optimizer steps planned (inf: no bound)
    steps_per_epoch: int

    def steps(self, epochs: float) -> int:
        """An option given in epochs (warm-up, freeze windows) in optimizer steps."""
        return int(round(epochs * self.steps_per_epoch))


def training_progress(trainer: Any) -> Progress:
    """The progress of ``trainer``'s fit, at the optimizer step that the current batch belongs to.

    Read during a training batch (on_train_batch_start, training_step, optimizer_step); the batch index
    within the epoch is Lightning's, which ``data.sampler.ElasticEpochResume`` re-counts in the new
    allocation's batches when an epoch interrupted on another allocation is resumed."""
    accumulate = trainer.accumulate_grad_batches
    batches = trainer.num_training_batches  # per epoch and process, on this allocation
    if batches == float("inf"):  # a loader without a length: only max_steps can plan the run
        return Progress(trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else math.inf, 1)
    per_epoch = max(math.ceil(batches / accumulate), 1)
    in_epoch = max(trainer.fit_loop.epoch_loop.batch_idx, 0) // accumulate
    by_epochs = trainer.current_epoch * per_epoch + in_epoch
    planned = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    if 0 < trainer.max_steps < planned:
        return Progress(trainer.global_step, trainer.max_steps, per_epoch)
    return Progress(by_epochs, planned, per_epoch)


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total`` (held at ``end`` afterwards)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), 1.0, min_ratio)


def warmup_constant(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return 1.0


def warmup_step_decay(step: int, total: float, warmup: int, milestones, factor: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then ``factor`` once more at every milestone passed.

    ``milestones`` are fractions of the planned training (MoCo v1's epochs 120 and 160 of 200 are
    0.6 and 0.8), so a shorter or longer run keeps the shape of the recipe."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return factor ** sum(step >= m * total for m in milestones)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup`` steps (e.g. DINO's teacher temperature)."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


LR_SCHEDULES = {"cosine": warmup_cosine, "constant": warmup_constant}
