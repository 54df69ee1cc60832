"""Stop on SIGTERM / SIGINT the way a finished run stops: checkpoint, summary, then a non-zero exit.

A scheduler, ``timeout``, ``docker stop`` or ``kill`` sends SIGTERM; Ctrl+C sends SIGINT. Either one
is noted by the handler and nothing else happens inside it. All ranks agree on it at the next
agreement point of ``lightning_gen.control`` (every ``trainer.log_every_n_steps`` batches and at each
epoch end; a max-reduce of the signal number, so a signal that reached one rank stops them all at the
same step), ``trainer.should_stop`` is set, last.ckpt is written at that step, and ``lgen train``
prints its summary with the command that resumes the run and exits with 128 + the signal number
(143 for SIGTERM, 130 for SIGINT), so whatever started it sees that the run did not finish. A
second Ctrl+C quits at once, as Python's default handler would.

Lightning 2.6 has SIGTERM handling of its own: its handler calls ``dist.broadcast`` from inside the
signal handler (a collective that the other ranks are not in, mid-step), and at the next loop check
raises ``SIGTERMException``, a ``SystemExit`` with no code, so the process exits 0 with no summary.
This callback replaces Lightning's SIGTERM handler while training runs and puts it back afterwards;
SLURM's SIGUSR1 (``lightning_gen.cluster.requeue``) is not touched.
"""

from __future__ import annotations

import os
import signal
import threading

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_gen import control

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(L.Callback):
    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.pending: signal.Signals | None = None  # noted by the handler, not yet agreed on
        self.stopped_by: signal.Signals | None = None  # what stopped training (agreed by all ranks)
        self.stopped_at_step: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(self.stopped_by) if self.stopped_by is not None else 0

    # ------------------------------------------------------------------ the handler
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread install signal handlers
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:  # came in while Lightning's handler was set
            connector.received_sigterm = False  # else Lightning would exit 0 at the end of the first step
            self.pending = signal.SIGTERM

    def _note(self, signum: int, frame) -> None:
        received = signal.Signals(signum)
        if received == signal.SIGINT and (self.pending or self.stopped_by) == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # a second Ctrl+C: stop now, without waiting for the step to end
        self.pending = self.pending or received
        if rank_zero_only.rank == 0:  # os.write: print() is not safe inside a signal handler
            again = " (Ctrl+C again quits at once)" if received == signal.SIGINT else ""
            os.write(2, f"\n[lgen] {received.name}: stopping soon, with a checkpoint{again}\n".encode())

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # ------------------------------------------------------------------ agreeing and stopping
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        control.at_batch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        control.at_epoch_end(trainer, pl_module)  # also catches a signal during the epoch-end validation

    def control_votes(self) -> list[int]:
        return [int(self.pending or 0) if self._previous and self.stopped_by is None else 0]

    def control_act(self, trainer: L.Trainer, pl_module: L.LightningModule, agreed: list[int]) -> None:
        if not agreed[0] or self.stopped_by is not None or not self._previous:
            return
        self.stopped_by, self.stopped_at_step = signal.Signals(agreed[0]), trainer.global_step
        trainer.should_stop = True
        # Lightning validates once more when a run stops early; an interrupted run leaves at once
        # (a scheduler gives it seconds), so that validation is skipped.
        trainer.limit_val_batches = 0
        rank_zero_info(
            f"[lgen] {self.stopped_by.name}: stopped at step {self.stopped_at_step}; "
            f"saving the checkpoint and exiting with code {self.exit_code}"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
