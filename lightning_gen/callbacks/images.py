"""Image grids of what a method produces (reconstructions, samples, colorizations...), to disk and W&B."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.randomness import isolated
from lightning_gen.registry import register_callback
from lightning_gen.sharding import is_sharded


@dataclass
class ImageGridConfig(CallbackConfig):
    n: int = 32  # images per row block
    nrow: int = 16


def grid(named: dict[str, torch.Tensor], nrow: int) -> torch.Tensor:
    """Stack each named batch as its own block of rows, in the order given."""
    blocks = [
        make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
        for images in named.values()
    ]
    width = max(b.shape[-1] for b in blocks)
    blocks = [torch.nn.functional.pad(b, (0, width - b.shape[-1])) for b in blocks]
    return torch.cat(blocks, dim=1)


@register_callback("images", ImageGridConfig)
class ImageGrid(L.Callback):
    """Saves samples/<epoch>.png from the method's images_for_logging() on a fixed validation batch."""

    def __init__(self, cfg: ImageGridConfig, run_dir: Path):
        self.cfg, self.folder = cfg, Path(run_dir) / "samples"
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.cfg.every_n_epochs:
            return
        # A sharded method's forward is a collective (trainer.strategy=fsdp): every rank draws the same
        # grid and rank 0 saves it. Otherwise rank 0 alone draws it.
        if not (trainer.is_global_zero or is_sharded(module)):
            return
        batch = next(iter(trainer.datamodule.eval_dataloader("val")))
        batch = {
            k: (v[: self.cfg.n].to(module.device) if torch.is_tensor(v) else v) for k, v in batch.items()
        }
        was_training = module.training
        module.eval()
        # isolated: the views / samples shown draw nothing from the training streams
        with torch.no_grad(), torch.autocast(module.device.type, enabled=False), isolated():
            named = module.images_for_logging(batch)
        module.train(was_training)
        if not named or not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        image = grid({k: v[: self.cfg.n] for k, v in named.items()}, self.cfg.nrow)
        path = (
            self.folder
            / f"{'_'.join(named)}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
        )
        save_image(image, path)
        self.last_path = path
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="samples/" + "_".join(named),
                    images=[image],
                    step=trainer.global_step,
                    caption=[f"rows: {', '.join(named)}"],
                )
