"""Weighted kNN on frozen features while training: logs eval/knn_top1_k<k> for every k."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.callbacks.feature_eval import FeatureEvalCallback, FeatureEvalConfig, sub_config
from lightning_gen.eval.knn import KNNConfig, check_k, knn_accuracy
from lightning_gen.registry import register_callback


@dataclass
class KNNCallbackConfig(FeatureEvalConfig, KNNConfig):
    pass


@register_callback("knn", KNNCallbackConfig)
class KNN(FeatureEvalCallback):
    """Cosine kNN (k = 20, 200; votes exp(s/0.07)) of eval-split features against the train-split bank."""

    def evaluate(self, trainer, module):
        bank = self.features(trainer, module, self.cfg.train_split).labeled("kNN")
        check_k(self.cfg.k, len(bank))
        queries = self.features(trainer, module, self.cfg.eval_split).labeled("kNN")
        result = knn_accuracy(
            bank.features,
            bank.labels,
            queries.features,
            queries.labels,
            module.data_info.num_classes,
            sub_config(self.cfg, KNNConfig),
        )
        return {f"knn_top1_k{k}": result[f"top1_k{k}"] for k in self.cfg.k}
