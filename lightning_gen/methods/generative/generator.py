"""What every generator shares: EMA weights for sampling, sample-option checking, label dropout.

A generator subclasses ``GenerativeMethod``, builds its network and calls ``setup_ema(name)``:
an exponential moving average copy ``self.ema`` of that child module is kept (updated after every
optimizer step of that module, so gradient accumulation does not multiply the updates; excluded
from the optimizer, saved in checkpoints with the rest of the state, with the count of updates
made) and ``sampling_net()`` hands it to ``sample`` and to evaluation (FID), as in Ho et al. 2020.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lightning_gen.config import bounded
from lightning_gen.methods.base import Method, MethodConfig, ema_update


@dataclass
class GenerativeConfig(MethodConfig):
    online_probe: bool = False  # generators learn no representation to probe
    ema_decay: float = bounded(0.999, 0, 1, high_open=True)  # 0 disables EMA: the raw weights sample
    ema_warmup: bool = True  # decay_t = min(ema_decay, (1 + t) / (10 + t)): early EMA follows the weights
    grid_samples: int = 32  # samples shown by the image-grid callback (fixed noise, so grids are comparable)


class GenerativeMethod(Method):
    is_generative = True
    monitor = ("train/loss", "min")
    # keyword options ``sample`` understands besides n/cond (lgen sample rejects others with a clear error)
    sample_options: tuple[str, ...] = ()
    conditional: bool = False  # whether sample(cond=labels) is meaningful

    @property
    def noise_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample's standard normal input, which ``sample(n, noise=...)`` then takes instead of
        drawing it (interpolation between samples); None: the samples come from no such noise (PixelCNN)."""
        return None

    def setup_ema(self, source: str) -> None:
        self._ema_source = source
        if self.cfg.ema_decay > 0:
            self.ema = copy.deepcopy(getattr(self, source)).requires_grad_(False)
            # updates made so far: the decay schedule's clock, in every checkpoint
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def frozen_module_names(self) -> set[str]:
        return {"ema"}

    def buffers_identical_on_all_ranks(self) -> list[str]:
        return ["ema_updates"] if self.cfg.ema_decay > 0 else []

    def ema_decay_at(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """Stateless in the number of updates made, so a resumed run continues with the same decay.
        ``step`` may be a tensor: the decay is then computed on its device."""
        if not self.cfg.ema_warmup:
            return self.cfg.ema_decay
        warm = (1 + step) / (10 + step)
        return (
            warm.clamp(max=self.cfg.ema_decay)
            if isinstance(warm, torch.Tensor)
            else min(self.cfg.ema_decay, warm)
        )

    def update_ema(self) -> None:
        """One EMA step towards the trained network; call after each of its optimizer steps."""
        if self.cfg.ema_decay > 0:
            # The decay is computed on the device from the update count (in float64, as Python would):
            # reading the count into Python would make the host wait for the GPU at every step.
            decay = self.ema_decay_at(self.ema_updates.double())
            ema_update(self.ema, getattr(self, self._ema_source), decay)
            self.ema_updates += 1

    def optimizer_step(self, *args, **kwargs):
        # Lightning calls this once per real optimizer step (not per accumulated micro-batch);
        # methods with manual optimisation (the GAN) call update_ema after their own step.
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before the update count existed: one update was made per training step.
        state = checkpoint.get("state_dict", {})
        if self.cfg.ema_decay > 0 and "ema_updates" not in state:
            state["ema_updates"] = torch.tensor(int(checkpoint.get("global_step", 0)))

    def sampling_net(self) -> nn.Module:
        """The EMA copy when there is one, else the trained network."""
        return self.ema if self.cfg.ema_decay > 0 else getattr(self, self._ema_source)

    def check_sample_options(self, cond: torch.Tensor | None, options: dict) -> None:
        unknown = sorted(set(options) - set(self.sample_options))
        if unknown:
            allowed = ", ".join(self.sample_options) or "none"
            raise ValueError(
                f"{self.registry_name} does not support sampling option(s) {unknown}; it supports: {allowed}"
            )
        if cond is not None and not self.conditional:
            raise ValueError(
                f"this {self.registry_name} model is unconditional: it cannot sample a given class "
                "(train with method.num_classes>0 / method.conditional=true)"
            )
        cond = None if cond is None else torch.as_tensor(cond)
        if cond is not None and ((cond < 0) | (cond >= self.data_info.num_classes)).any():
            raise ValueError(
                f"class labels must be in 0..{self.data_info.num_classes - 1}, got {cond.unique().tolist()}"
            )

    def sample_labels(self, n: int, cond: torch.Tensor | int | None) -> torch.Tensor | None:
        """Labels for a conditional model: the given ones, one class for all, or classes in turn."""
        if not self.conditional:
            return None
        if cond is None:
            return torch.arange(n, device=self.device) % self.data_info.num_classes
        cond = torch.as_tensor(cond, device=self.device).long()
        return cond.expand(n).clone() if cond.ndim == 0 else cond

    def drop_labels(self, labels: torch.Tensor, p: float) -> torch.Tensor:
        """Classifier-free guidance training: replace labels by the null class with probability p
        (and always where the sample is unlabeled, label -1)."""
        null = self.data_info.num_classes
        drop = (torch.rand(labels.shape, device=labels.device) < p) | (labels < 0)
        return torch.where(drop, torch.full_like(labels, null), labels)

    @torch.no_grad()
    def images_for_logging(self, batch):
        n = min(self.cfg.grid_samples, len(batch["image"]))
        generator = torch.Generator(self.device).manual_seed(0)
        return {
            "real": self.to_float(batch["image"][:n], "unit"),
            "samples": self.sample(n, generator=generator),
        }


class evaluating:
    """Context manager: ``net`` in eval mode (no dropout, BatchNorm running stats) and back."""

    def __init__(self, net: nn.Module):
        self.net, self.was_training = net, net.training

    def __enter__(self) -> nn.Module:
        self.net.eval()
        return self.net

    def __exit__(self, *exc) -> None:
        self.net.train(self.was_training)
