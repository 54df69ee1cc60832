"""Linear probe on frozen features while training: logs eval/probe_top1 and eval/probe_top5."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.callbacks.feature_eval import FeatureEvalCallback, FeatureEvalConfig, sub_config
from lightning_gen.config import choice
from lightning_gen.eval.probe import ProbeConfig, linear_probe
from lightning_gen.registry import register_callback


@dataclass
class LinearProbeConfig(FeatureEvalConfig, ProbeConfig):
    # Full-batch L-BFGS on the L2-regularised objective: deterministic and a fraction of a second on
    # small feature sets, which matters for a callback; `lgen eval probe` defaults to 100 SGD epochs.
    optimizer: str = choice("lbfgs", "sgd", "lbfgs")
    weight_decay: float = 1e-4


@register_callback("linear_probe", LinearProbeConfig)
class LinearProbe(FeatureEvalCallback):
    """Linear classifier on frozen, normalised train features; top-1/top-5 on the eval split."""

    def evaluate(self, trainer, module):
        train = self.features(trainer, module, self.cfg.train_split).labeled("the linear probe")
        test = self.features(trainer, module, self.cfg.eval_split).labeled("the linear probe")
        result = linear_probe(
            train.features,
            train.labels,
            test.features,
            test.labels,
            module.data_info.num_classes,
            sub_config(self.cfg, ProbeConfig),
        )
        return {"probe_top1": result["top1"], "probe_top5": result["top5"]}
