"""Random streams: one per DDP rank for training, isolated ones for evaluation, exact resume.

Everything random in training (augmentation views, diffusion t and ε, flow t and z, GAN z, MAE
masks, label dropout) is drawn from the global torch RNG inside the LightningModule. So:

- **Per rank.** After the process group is up, rank r seeds torch (CPU and every CUDA device),
  NumPy and Python with ``stream_seed(seed, r)``: every rank draws its own views and noise, and a
  run is still reproducible from ``seed`` and the world size. (Model initialisation happens
  earlier, from ``seed`` alone, so all ranks start from the same weights.)
- **Evaluation never touches it.** Validation runs on a stream of its own, re-seeded the same way
  at every validation (so ``val/loss`` of a noisy objective is measured with the same noise every
  epoch) and the training state is put back afterwards; evaluation callbacks (probe, kNN, FID,
  image grids, plots) run inside ``isolated()``. Evaluation loaders carry their own generator:
  a DataLoader without one draws its workers' base seed from the global RNG at ``iter()``, which
  Lightning calls before ``on_validation_start`` (sanity check included), so validation would
  otherwise shift the training stream.
- **Exact resume.** Every rank's RNG state (CPU and its own CUDA device) is gathered into each
  checkpoint and restored just before the first training batch after a resume, so an interrupted
  run (SLURM requeue included) continues the uninterrupted run's stream. On another world size the
  streams are re-derived from (seed, new rank, step). The data order is a function of (seed, epoch): see
  ``lightning_gen.data.sampler``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# stream purposes: training draws, validation draws, training-loader workers, evaluation-loader workers
TRAINING, VALIDATION, TRAIN_LOADER, EVAL_LOADER = 0, 1, 2, 3


def stream_seed(seed: int, rank: int, purpose: int = TRAINING, *more: int) -> int:
    """A 63-bit seed for (run seed, global rank, purpose, ...), well separated for every combination.

    NumPy's SeedSequence hashes the whole tuple, so neighbouring runs (seed 0 rank 1 vs seed 1
    rank 0) do not share streams, as they would with ``seed + rank``.
    """
    words = np.random.SeedSequence([seed, rank, purpose, *more]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


def seed_all(seed: int) -> None:
    """Seed torch (CPU and all CUDA devices), NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def collect_state() -> dict[str, Any]:
    """The RNG states of this process: CPU, NumPy, Python, and its own CUDA device's (where CUDA has
    been initialised). One device, not every visible one: a process trains on its current device, and a
    resume that sees fewer devices per process (another allocation) must still be able to restore it."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, list | tuple):  # every visible device's state (checkpoints of earlier versions)
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def isolated(seed: int | None = None) -> Iterator[None]:
    """Run a block without consuming or changing the caller's random streams (optionally seeded inside)."""
    saved = collect_state()
    try:
        if seed is not None:
            seed_all(seed)
        yield
    finally:
        restore_state(saved)


class RandomStreams(L.Callback):
    """Owns the training randomness of a run: per-rank seeding, isolated validation, RNG state in checkpoints.

    ``run.build_callbacks`` adds it to every run; it is not configurable (it is what makes the
    ``seed`` setting mean the same thing on 1 and N processes).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._outside: dict[str, Any] | None = None  # training state while validation runs isolated
        self._pending: dict[str, Any] | None = (
            None  # state loaded from a checkpoint, applied at the next batch
        )

    # ------------------------------------------------------------------ per-rank streams
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Called after the process group exists and after Lightning's own (identical on every rank) reseed.
        if stage == "fit":
            seed_all(stream_seed(self.seed, trainer.global_rank))
            rank_zero_info(
                f"[lgen] random streams: seed {self.seed}, one per rank for {trainer.world_size} process(es)"
            )

    def training_state(self) -> dict[str, Any]:
        """The training stream's state, also while validation runs on its own stream."""
        return self._pending or self._outside or collect_state()

    # ------------------------------------------------------------------ validation on its own stream
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outside = collect_state()
        seed_all(stream_seed(self.seed, trainer.global_rank, VALIDATION))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside is not None:
            restore_state(self._outside)
            self._outside = None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Checkpoints are assembled on every rank (only rank 0 writes), so every rank's state can be gathered.
        states = [self.training_state()]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, self.training_state())
        checkpoint["random_streams"] = {"seed": self.seed, "world_size": trainer.world_size, "states": states}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get("random_streams")
        if saved is None:
            rank_zero_warn(
                "[lgen] the checkpoint holds no random-stream states (written by an older version): training "
                "continues on fresh streams derived from the seed and the step, not the interrupted run's"
            )
            self._reseed_for_step(trainer, checkpoint)
        elif saved["world_size"] != trainer.world_size:
            rank_zero_warn(
                f"[lgen] the checkpoint was written by {saved['world_size']} process(es), this run has "
                f"{trainer.world_size}: random streams are re-derived from the seed and the step, so the run "
                "continues correctly but not bitwise as an uninterrupted one would"
            )
            self._reseed_for_step(trainer, checkpoint)
        else:
            self._pending = saved["states"][trainer.global_rank]

    def _reseed_for_step(self, trainer: L.Trainer, checkpoint: dict) -> None:
        # Never replay epoch 0's stream after a resume: derive a new one from the step reached.
        with isolated(stream_seed(self.seed, trainer.global_rank, TRAINING, int(checkpoint["global_step"]))):
            self._pending = collect_state()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        # Applied here, not at load time: whatever runs between the restore and the first batch (sanity
        # validation, dataloader and callback set-up) must not shift the resumed stream.
        if self._pending is not None:
            restore_state(self._pending)
            self._pending = None
