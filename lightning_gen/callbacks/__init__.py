"""Callbacks that evaluate while training, each configurable under ``callbacks.<name>`` in the config."""

from dataclasses import dataclass

from lightning_gen.config import bounded


@dataclass
class CallbackConfig:
    enabled: bool = True
    every_n_epochs: int = bounded(1, 1)
