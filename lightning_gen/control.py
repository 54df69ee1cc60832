"""Decisions every rank must take at the same step, agreed in one small collective every N batches.

A stop signal (SIGTERM, SIGINT), SLURM's requeue signal and a non-finite loss each reach one rank,
yet all ranks must act on them at the same step, or the next gradient all-reduce hangs. Agreeing
takes an all-reduce, and reading its result into Python makes the host wait for the GPU to finish
everything queued so far. Done at every step by each of the three, that was two or three
collectives and as many stalls per step; here the three share one agreement, run

- every ``trainer.log_every_n_steps`` training batches (the steps on which Lightning reads the
  logged values back to the host anyway) and at the end of every training epoch,
- and before any checkpoint is written (so a checkpoint never holds a state after a non-finite loss).

What that guarantees: a signal is acted on at most N batches after it arrives (or at the epoch end,
if that comes first); a non-finite loss stops training at most N batches after the batch that
produced it, and every checkpoint on disk holds a state from before it. Per training step the cost
on a GPU is nothing: no collective and no host synchronisation; every N batches it is one
all-reduce of a few integers and one read of its result.

A participant is a callback with ``control_votes()``: a fixed-length list of non-negative votes
(Python ints, or 0-d integer tensors on the device, so that voting never reads the device), and
``control_act(trainer, pl_module, agreed)``, which gets the maximum of its votes over all ranks.
Participants with a lower ``control_priority`` act first (the non-finite guard raises before a
requeue could save a checkpoint).
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_gen.distributed import all_reduce_max


def participants(trainer: L.Trainer, max_priority: int = 1) -> list[L.Callback]:
    found = [c for c in trainer.callbacks if hasattr(c, "control_votes")]
    found = [c for c in found if getattr(c, "control_priority", 1) <= max_priority]
    return sorted(found, key=lambda c: getattr(c, "control_priority", 1))


def agree(trainer: L.Trainer, pl_module: L.LightningModule, occasion: tuple, max_priority: int = 1) -> None:
    """Run the agreement once per ``occasion`` (several participants may ask at the same point)."""
    if getattr(trainer, "_lgen_control_occasion", None) == occasion or getattr(
        trainer, "_lgen_control_busy", False
    ):
        return  # already agreed here, or asked again from inside an action (a requeue's checkpoint)
    trainer._lgen_control_occasion = occasion
    voters = participants(trainer, max_priority)
    votes = [list(c.control_votes()) for c in voters]
    flat = [v for vs in votes for v in vs]
    if not flat:
        return
    packed = torch.zeros(len(flat), dtype=torch.long, device=pl_module.device)
    for slot, vote in zip(packed, flat):
        if isinstance(vote, torch.Tensor):
            slot.copy_(vote)  # device to device
        else:
            slot.fill_(int(vote))  # a kernel argument, not a host-to-device copy
    agreed = all_reduce_max(packed).tolist()  # the one host synchronisation
    trainer._lgen_control_busy = True
    try:
        start = 0
        for voter, own in zip(voters, votes):
            voter.control_act(trainer, pl_module, agreed[start : start + len(own)])
            start += len(own)
    finally:
        trainer._lgen_control_busy = False


def at_batch_end(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Agree if this batch ends an interval of ``trainer.log_every_n_steps`` batches."""
    batch = trainer.fit_loop.total_batch_idx  # counts batches (not optimizer steps), the same on all ranks
    if (batch + 1) % max(int(trainer.log_every_n_steps), 1) == 0:
        agree(trainer, pl_module, ("batch", batch))


def at_epoch_end(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    agree(trainer, pl_module, ("epoch", trainer.current_epoch))


def before_checkpoint(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Agree on the priority-0 decisions only (the non-finite loss): a signal waits for its own point."""
    occasion = ("checkpoint", trainer.fit_loop.total_batch_idx, trainer.global_step)
    agree(trainer, pl_module, occasion, max_priority=0)
