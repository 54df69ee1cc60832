"""Stop at the first non-finite loss, before anything overwrites the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class NonFiniteLossError(FloatingPointError):
    pass


class NonFiniteLossGuard(L.Callback):
    """Raises with advice when the loss about to be backpropagated is NaN/inf on any process (all ranks stop together)."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_before_backward(self, trainer, module, loss) -> None:
        # Checked before backward, so the bad update is never applied and no later checkpoint holds it.
        bad = not torch.isfinite(loss.detach()).all()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bool(bad), all=False)
        if not bad:
            return
        saved = sorted(self.checkpoint_dir.glob("*.ckpt"))
        kept = (
            f"checkpoints already saved are untouched: {', '.join(p.name for p in saved)} in {self.checkpoint_dir}"
            if saved
            else "no checkpoint had been saved yet"
        )
        raise NonFiniteLossError(
            f"training loss became non-finite ({loss.item()}) at global step {trainer.global_step}, "
            f"epoch {trainer.current_epoch}; training stopped before applying that update and {kept}. Try a lower method.lr, gradient clipping (trainer.gradient_clip_val=1.0), "
            f"or full precision (trainer.precision=32-true)."
        )
