"""Callbacks that evaluate while training, each configurable under ``callbacks.<name>`` in the config."""

from dataclasses import dataclass


@dataclass
class CallbackConfig:
    enabled: bool = True
    every_n_epochs: int = 1
