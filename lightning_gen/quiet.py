"""The messages every run used to print that say nothing about the run, each removed where it comes from.

- Lightning's ``log_every_n_steps`` warning: small datasets (the embedded digits: 9 batches per
  epoch) have fewer batches than the logging interval. ``LogEveryEpoch`` caps the interval at one
  epoch's batches, so training metrics are logged at least once per epoch and the warning's
  condition never holds.
- "wandb: WARNING The anonymous setting has no effect": Lightning's ``WandbLogger`` passes
  ``anonymous=None`` to ``wandb.init``, and wandb warns for any value of that deprecated argument.
  ``lightning_gen.loggers.WandbLogger`` leaves it out.
- Four messages whose cause is inside a library, filtered by their exact text (``silence_library_notices``):
  Lightning's tip to install its LitLogger (printed whenever no LitLogger is among the loggers),
  torch's deprecation of ``isinstance(x, LeafSpec)`` (called inside Lightning's ``_pytree``),
  Lightning's model summary saying it cannot size bf16-mixed models (it then counts 32 bits, which
  is what the summary shows anyway), and, outside a SLURM job only, Lightning's hint to prepend
  ``srun``: it prints it on any machine where SLURM's client is installed, a laptop run included.
  Inside an allocation (``SLURM_JOB_ID`` set) the hint stays, because there a multi-process run
  started without ``srun`` is the mistake it warns of. Every other warning still shows.
- Lightning's warning that modules are in eval mode at the start of training, for a method whose
  frozen modules are in eval mode on purpose (latent diffusion's autoencoder): that method calls
  ``allow_frozen_modules_in_eval`` when training starts.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import lightning as L

# Exact starts of the library messages removed by `silence_library_notices` (see the module docstring).
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking"
LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
SUMMARY_PRECISION = r"Precision \S+ is not supported by the model summary"
SRUN_HINT = r"The `srun` command is available on your system but is not used"
FROZEN_IN_EVAL = r"Found \d+ module\(s\) in eval mode at the start of training"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_library_notices() -> None:
    """Filter the library messages listed in the module docstring, and only those (idempotent)."""
    from lightning.pytorch.utilities import rank_zero

    logger = rank_zero.rank_zero_module.log  # the logger Lightning's rank_zero_info writes to
    if not any(isinstance(f, _DropMessage) and f.prefix == LITLOGGER_TIP for f in logger.filters):
        logger.addFilter(_DropMessage(LITLOGGER_TIP))
    warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATION)
    warnings.filterwarnings("ignore", message=SUMMARY_PRECISION)
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings("ignore", message=SRUN_HINT)


class LogEveryEpoch(L.Callback):
    """Caps ``trainer.log_every_n_steps`` at the number of training batches of one epoch.

    Runs in ``setup``, after the DataModule is set up and before Lightning sizes the training loop
    (where it would warn that an epoch is shorter than the logging interval).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.datamodule is None:
            return
        try:
            batches = len(trainer.datamodule.train_dataloader())
        except TypeError:  # a loader without a length (streams): nothing to cap against
            return
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and not math.isinf(batches):
            batches = int(batches * limit)
        if 0 < batches < trainer.log_every_n_steps:
            trainer.log_every_n_steps = batches


def allow_frozen_modules_in_eval() -> None:
    """For a method that keeps frozen modules in eval mode on purpose (see the module docstring)."""
    warnings.filterwarnings("ignore", message=FROZEN_IN_EVAL)
