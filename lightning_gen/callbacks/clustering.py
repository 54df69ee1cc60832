"""k-means on frozen features while training: logs eval/cluster_nmi and eval/cluster_ari."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.callbacks.feature_eval import FeatureEvalCallback, FeatureEvalConfig, sub_config
from lightning_gen.eval.clustering import KMeansConfig, cluster_features
from lightning_gen.registry import register_callback


@dataclass
class ClusteringConfig(FeatureEvalConfig, KMeansConfig):
    pass


@register_callback("clustering", ClusteringConfig)
class Clustering(FeatureEvalCallback):
    """k-means (k = number of classes) on eval-split features; NMI and ARI against the labels."""

    def evaluate(self, trainer, module):
        features = self.features(trainer, module, self.cfg.eval_split).labeled("clustering metrics")
        result = cluster_features(
            features.features,
            features.labels,
            module.data_info.num_classes,
            sub_config(self.cfg, KMeansConfig),
        )
        return {"cluster_nmi": result["nmi"], "cluster_ari": result["ari"]}
