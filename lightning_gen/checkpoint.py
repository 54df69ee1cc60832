"""Checkpoints that survive a kill mid-write, and clear errors when one is damaged anyway.

Every checkpoint is written to ``<name>.tmp`` and renamed over the target in one ``os.replace``,
so the file under the real name is always either the old complete one or the new complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temporary file, fsyncs it and renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)


class LastCheckpoint(ModelCheckpoint):
    """``<dir>/last.ckpt`` = the newest state: written at the end of every training epoch (after that
    epoch's validation, if any), and at the training step where the run is told to stop mid-epoch.

    Not Lightning's ``save_last``: since 2.5 it refreshes last.ckpt only together with a new top-k
    checkpoint, i.e. when the monitored metric improves and only on validation epochs, so a resume
    could go back in time, and a run validating every 5 epochs had no checkpoint after epoch 1.

    A stop requested mid-epoch (``trainer.should_stop`` set at a step boundary: ``callbacks.stop_after``,
    a signal) is saved right there, with the loop and data-loader state of that step, so a resume
    continues the same epoch at the next batch. Lightning then ends the epoch early and calls the
    epoch-end hooks; a checkpoint written there would claim the epoch complete and a resume would skip
    its remaining batches, so none is written.
    """

    def __init__(self, dirpath: str | Path):
        super().__init__(
            dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:  # distinct from an unmonitored top-k ModelCheckpoint's key
        return "LastCheckpoint"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not trainer.should_stop or epoch_complete(trainer) or self._should_skip_saving_checkpoint(trainer):
            return
        if getattr(trainer, "lgen_stop_checkpoint_step", None) == trainer.global_step:
            return  # the stop already wrote its own checkpoint at this step (SLURM requeue: hpc_ckpt)
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if epoch_complete(trainer) or 0 < trainer.max_steps <= trainer.global_step:
            super().on_train_epoch_end(trainer, pl_module)


def epoch_complete(trainer) -> bool:
    """Whether every batch of the current training epoch has been trained on."""
    if trainer.num_training_batches == float("inf"):  # a loader without a length: only a stop cuts it short
        return not trainer.should_stop
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches


def load_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    """torch.load with an error that names the file and what to do when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        others = [p for p in older_checkpoints(path.parent) if p != path]
        hint = (
            f" An intact older checkpoint is {others[0]}: resume from it with resume={others[0]}"
            if others
            else " There is no other checkpoint in that folder; start over with resume=never."
        )
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error}).{hint}"
        ) from error


def older_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder`` other than last.ckpt, newest first, that load cleanly."""
    found = []
    for p in sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if p.name == "last.ckpt":
            continue
        try:
            torch.load(p, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            continue
        found.append(p)
    return found


def resume_path(run_dir: Path, resume: str) -> str | None:
    """The checkpoint to resume from for ``resume`` = auto | never | <path>, checked before training.

    With ``auto`` it also removes the preemption checkpoints the chosen one supersedes."""
    if resume in ("never", "none", "null", "false", "", None):
        return None
    if resume != "auto":
        load_checkpoint(resume)  # fail early, with a clear message, before any process starts
        return str(resume)
    # last.ckpt, or a newer hpc_ckpt_<n>.ckpt that Lightning saved on SLURM's SIGUSR1 before a requeue
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    found = [p for p in candidates if p.exists()]
    if not found:
        return None
    progress = {p: _progress(p) for p in found}
    newest = max(found, key=progress.get)
    load_checkpoint(newest)
    _prune_preemption_checkpoints(run_dir, newest, progress)
    return str(newest)


def _prune_preemption_checkpoints(run_dir: Path, newest: Path, progress: dict) -> None:
    """Delete the ``hpc_ckpt_<n>.ckpt`` files that a checkpoint further along supersedes.

    Every SLURM preemption adds one full checkpoint (Lightning numbers them and never deletes any), so a
    job requeued ten times would otherwise hold ten copies of the model and optimizer. The one resumed
    from, ``last.ckpt`` and the ``checkpoints/`` folder are never touched; only global rank 0 deletes.
    """
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    for path in run_dir.glob("hpc_ckpt_*.ckpt"):
        if path != newest and progress.get(path, (-1, 0.0))[0] < progress[newest][0]:
            path.unlink(missing_ok=True)
            print(f"[lgen] removed {path} (superseded by {newest.name} at a later step)", flush=True)


def _progress(path: Path) -> tuple[int, bool, float]:
    """(global step, is a requeue checkpoint, mtime) of a checkpoint: which one is furthest along.

    At the same step the requeue's hpc_ckpt wins over a last.ckpt that a periodic checkpoint
    (``trainer.checkpoint_every_n_steps``) happened to write at that step too: they hold the same state,
    and resuming from the one the requeue wrote does not depend on which file was written last."""
    try:
        step = int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))
        mtime = path.stat().st_mtime
    except Exception:
        return (
            -1,
            False,
            0.0,
        )  # unreadable (load_checkpoint reports it if it is the one chosen) or just removed
    return step, path.name.startswith("hpc_ckpt_"), mtime
