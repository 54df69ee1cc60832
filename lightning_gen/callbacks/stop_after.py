"""Stop a run cleanly after a number of epochs, as a preemption would: a way to test resuming.

``callbacks.stop_after.epochs=1`` ends training at the end of epoch 1 with its checkpoint saved,
while the planned length (``trainer.max_epochs``) and so every stateless schedule stays that of the
full run; ``resume=auto`` then continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.registry import register_callback


@dataclass
class StopAfterConfig(CallbackConfig):
    epochs: int = 0  # 0: never stop early


@register_callback("stop_after", StopAfterConfig)
class StopAfter(L.Callback):
    """Ends training after ``epochs`` epochs (the schedules keep the full run's length)."""

    def __init__(self, cfg: StopAfterConfig, run_dir: Path):
        self.cfg = cfg

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.cfg.epochs and trainer.current_epoch + 1 >= self.cfg.epochs:
            trainer.should_stop = True
