"""Stop a run cleanly after a number of epochs or optimizer steps, as a preemption would: a way to test resuming.

``callbacks.stop_after.epochs=1`` ends training at the end of epoch 1 with its checkpoint saved;
``callbacks.stop_after.steps=5`` ends it after optimizer step 5, mid-epoch, with last.ckpt holding
that step (loop, data-loader and random-stream state included). The planned length
(``trainer.max_epochs``) and so every stateless schedule stays that of the full run;
``resume=auto`` then continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.registry import register_callback


@dataclass
class StopAfterConfig(CallbackConfig):
    epochs: int = 0  # stop at the end of this epoch (0: never)
    steps: int = 0  # stop after this optimizer step, mid-epoch if it falls there (0: never)


@register_callback("stop_after", StopAfterConfig)
class StopAfter(L.Callback):
    """Ends training after ``epochs`` epochs or ``steps`` optimizer steps (schedules keep the full run's length)."""

    def __init__(self, cfg: StopAfterConfig, run_dir: Path):
        self.cfg = cfg

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.cfg.epochs and trainer.current_epoch + 1 >= self.cfg.epochs:
            trainer.should_stop = True

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.cfg.steps and trainer.global_step >= self.cfg.steps:
            trainer.should_stop = True
