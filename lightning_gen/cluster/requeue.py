"""Run Lightning's SLURM auto-requeue at a training-step boundary that all ranks agree on.

Lightning's ``SLURMEnvironment`` installs a SIGUSR1 handler that saves ``hpc_ckpt_<n>.ckpt`` and
calls ``scontrol requeue``. Python runs that handler wherever the signal lands: between
``optimizer.step()`` and the step counter's increment (the checkpoint then holds one optimizer
step more than its ``global_step``), or on one DDP rank while the other is inside a gradient
all-reduce (the checkpoint's barrier then meets the wrong collective and can hang). This callback
only notes the signal, agrees on it across ranks with the other step-boundary decisions
(``lightning_gen.control``: every ``trainer.log_every_n_steps`` batches and at each epoch end, so the
SLURM grace period, ``--signal=USR1@<seconds>``, must cover N steps and a checkpoint write), and then
calls Lightning's own handler there, on every rank at the same step. It saves and requeues nothing
itself: it changes *when* Lightning's handler runs, not what it does.
"""

from __future__ import annotations

import signal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from lightning_gen import control


class RequeueAtStepBoundary(L.Callback):
    def __init__(self, requeue_signal: signal.Signals = signal.SIGUSR1):
        self.requeue_signal = requeue_signal
        self.received = False
        self._lightning_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        handler = signal.getsignal(self.requeue_signal)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue and callable(handler)):
            return
        self._lightning_handler = handler  # what Lightning's signal connector registered
        signal.signal(self.requeue_signal, self._note)

    def _note(self, signum, frame) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        control.at_batch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        control.at_epoch_end(trainer, pl_module)

    def control_votes(self) -> list[int]:
        return [int(self.received and self._lightning_handler is not None)]

    def control_act(self, trainer: L.Trainer, pl_module: L.LightningModule, agreed: list[int]) -> None:
        if agreed[0] and self._lightning_handler is not None:  # one rank's signal is everyone's
            self.received = False
            rank_zero_info(
                f"[lgen] {self.requeue_signal.name}: checkpoint at step {trainer.global_step} and requeue"
            )
            self._lightning_handler(self.requeue_signal, None)
            trainer.lgen_stop_checkpoint_step = (
                trainer.global_step
            )  # hpc_ckpt holds this step: no last.ckpt too
            trainer.should_stop = True  # nothing more to do in this allocation; the requeued job continues

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._lightning_handler is not None:
            signal.signal(self.requeue_signal, self._lightning_handler)
            self._lightning_handler = None
