"""Shared machinery of the evaluation callbacks: when to run, frozen features (cached), logging.

Every evaluation callback runs at the end of a training epoch (after that epoch's validation),
every ``every_n_epochs`` epochs and at the last epoch. Features of a split are extracted once per
global step and shared by all evaluation callbacks through a cache on the trainer, so a probe, a
kNN and a clustering at the same epoch cost one pass over the data. Feature extraction is a
collective under DDP (each rank embeds its shard, then all gather), so every rank runs it; every
rank then holds identical features and computes identical metrics, which are logged with
``sync_dist`` (a no-op average of equal values) so Lightning's epoch-level logging stays consistent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.eval.features import Features, require_embed, split_features
from lightning_gen.randomness import isolated


@dataclass
class FeatureEvalConfig(CallbackConfig):
    train_split: str = "train"  # the labeled split the probe / kNN bank is fitted on
    eval_split: str = "val"  # the split the metrics are computed on


def sub_config(cfg, cls: type):
    """The fields of dataclass ``cls`` taken from a callback config that inherits them."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


class FeatureEvalCallback(L.Callback):
    """Base of LinearProbe, KNN, Clustering and EmbeddingPlot callbacks (not registered itself)."""

    metric_prefix = "eval"

    def __init__(self, cfg: FeatureEvalConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.last_results: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        require_embed(module)  # fail before training, not after the first epoch

    def should_run(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = epoch == trainer.max_epochs or (0 < trainer.max_steps <= trainer.global_step)
        return epoch % max(self.cfg.every_n_epochs, 1) == 0 or last

    def features(self, trainer: L.Trainer, module: L.LightningModule, split: str) -> Features:
        cache = getattr(trainer, "lgen_feature_cache", None)
        if cache is None or cache.get("step") != trainer.global_step:
            cache = {"step": trainer.global_step}
            trainer.lgen_feature_cache = cache
        if split not in cache:
            cache[split] = split_features(module, trainer.datamodule, split)
        return cache[split]

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.lgen_feature_cache = None  # free last evaluation's features (device memory) while training

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.should_run(trainer):
            return
        with isolated():  # evaluation draws nothing from (and resets nothing of) the training streams
            results = self.evaluate(trainer, module)
        self.last_results = results
        for name, value in results.items():
            module.log(
                f"{self.metric_prefix}/{name}", float(value), on_step=False, on_epoch=True, sync_dist=True
            )

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError
