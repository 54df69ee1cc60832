"""Models a method uses but never trains: latent diffusion's autoencoder, a token model's tokenizer, a
distilled student's teacher.

Such a model is a child module of the method, so it is saved in every checkpoint (a copied checkpoint
samples on its own) and moves with the method to its device. ``FrozenChildren`` keeps it out of what
training touches: out of the optimizer and the EMA (``frozen_module_names``), out of DDP's gradient
and buffer synchronisation (every rank reads the same file and nothing changes it), and in eval mode
whatever the trainer switches (dropout off, normalisation statistics fixed).

Where it comes from is a config field, ``ckpt:<path>`` or ``stage1`` (the experiment's stage-1 run,
``lightning_gen/stages.py``), read by ``checkpoint_of``.
"""

from __future__ import annotations

from pathlib import Path

from lightning_gen.config import ConfigError
from lightning_gen.quiet import allow_frozen_modules_in_eval


class FrozenChildren:
    """Mixin of a Method: the children named in ``frozen_children`` (those present) are frozen."""

    frozen_children: tuple[str, ...] = ()

    def present_frozen_children(self) -> list[str]:
        return [
            name for name in self.frozen_children if name in self._modules and self._modules[name] is not None
        ]

    def frozen_module_names(self) -> set[str]:
        return {*super().frozen_module_names(), *self.present_frozen_children()}

    def buffers_identical_on_all_ranks(self) -> list[str]:
        frozen = []
        for name in self.present_frozen_children():
            child = self._modules[name]
            frozen += [f"{name}.{n}" for n, _ in [*child.named_parameters(), *child.named_buffers()]]
        return [*super().buffers_identical_on_all_ranks(), *frozen]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.present_frozen_children():
            allow_frozen_modules_in_eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.present_frozen_children():
            self._modules[name].eval()
        return self


def checkpoint_of(field: str, value: str | None, what: str, train_it: str) -> Path:
    """The checkpoint that a ``ckpt:<path>`` config value names; one-line errors for anything else.
    ``field``: the config key (method.tokenizer); ``what``: the model it names; ``train_it``: how to make one."""
    if not value:
        raise ConfigError(f"{field} is not set: give ckpt:<{what} checkpoint> ({train_it}), or stage1")
    if value == "stage1":
        raise ConfigError(
            f"{field}=stage1 names the experiment's stage-1 {what}, which `lgen train` resolves; "
            "elsewhere give ckpt:<checkpoint>"
        )
    if not value.startswith("ckpt:"):
        raise ConfigError(f"{field}={value}: give ckpt:<{what} checkpoint>, or stage1")
    path = Path(value.removeprefix("ckpt:")).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{field}={value}: no such file. Train one ({train_it}) and name its checkpoint, "
            "or run an experiment whose stage1 section trains it first"
        )
    return path
