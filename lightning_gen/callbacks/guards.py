"""Stop at a non-finite loss, before any checkpoint holds the state it produced.

Checking ``torch.isfinite(loss)`` in Python at every backward would make the host wait for the GPU
at every step. Instead every backward records, on the device, whether the loss was finite and the
step of the first one that was not; all ranks agree on that record together with the stop signals
(``lightning_gen.control``: every ``trainer.log_every_n_steps`` batches, at every epoch end, and
before every checkpoint is written). A non-finite loss therefore ends training at most N batches
later, with the step it happened at, and no checkpoint written after it: the last one on disk holds
the last finite state.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_gen import control

NO_STEP = -(2**62)  # "no non-finite loss yet" in the max-reduced vote (-step is voted: max = earliest)


class NonFiniteLossError(FloatingPointError):
    pass


class NonFiniteLossGuard(L.Callback):
    """Raises with advice once any process has seen a NaN/inf loss (all ranks stop together)."""

    control_priority = 0  # acts before a requeue or a stop could write a checkpoint

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self._seen: torch.Tensor | None = None  # 1 once a non-finite loss was seen on this rank
        self._first_step: torch.Tensor | None = None  # -(its global step), or NO_STEP
        self._first_value: torch.Tensor | None = None  # that loss value

    def on_before_backward(self, trainer, module, loss) -> None:
        loss = loss.detach()
        if self._seen is None:  # device tensors made by kernels: no host-to-device copy
            self._seen = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first_step = torch.full((), NO_STEP, dtype=torch.long, device=loss.device)
            self._first_value = torch.zeros((), dtype=torch.float64, device=loss.device)
        bad = ~torch.isfinite(loss).all()
        first = bad & (self._seen == 0)
        self._first_step = torch.where(first, -trainer.global_step, self._first_step)
        self._first_value = torch.where(first, loss.double().sum(), self._first_value)
        self._seen = self._seen | bad.long()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        control.at_batch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        control.at_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Every rank builds the checkpoint (only rank 0 writes it), so all of them agree here, and
        # raising stops the write: no checkpoint ever holds a state after a non-finite loss.
        control.before_checkpoint(trainer, pl_module)

    def control_votes(self) -> list[int | torch.Tensor]:
        if self._seen is None:
            return [0, NO_STEP]
        return [self._seen, self._first_step]

    def control_act(self, trainer, pl_module, agreed: list[int]) -> None:
        if not agreed[0]:
            return
        step = -agreed[1]
        here = self._seen is not None and int(self._first_step) == -step
        value = f"{float(self._first_value)}" if here else "on another process"
        saved = sorted(self.checkpoint_dir.glob("*.ckpt"))
        kept = (
            f"checkpoints already saved hold states from before it: {', '.join(p.name for p in saved)} in {self.checkpoint_dir}"
            if saved
            else "no checkpoint had been saved yet"
        )
        raise NonFiniteLossError(
            f"training loss became non-finite ({value}) at global step {step}, epoch {trainer.current_epoch}; "
            f"training stopped and {kept}. Try a lower method.lr, gradient clipping (trainer.gradient_clip_val=1.0), "
            f"or full precision (trainer.precision=32-true)."
        )
