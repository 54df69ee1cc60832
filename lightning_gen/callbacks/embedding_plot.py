"""PCA and t-SNE of a fixed subset of frozen features, coloured by class: embeddings/*.png and W&B."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gen.callbacks.feature_eval import FeatureEvalCallback, FeatureEvalConfig
from lightning_gen.eval.embedding import fixed_subset, plot_embeddings
from lightning_gen.registry import register_callback


@dataclass
class EmbeddingPlotConfig(FeatureEvalConfig):
    num_samples: int = 500  # the same subset of the eval split at every epoch
    tsne: bool = True  # t-SNE beside PCA (a few seconds for 500 points on a CPU)
    seed: int = 0


@register_callback("embedding_plot", EmbeddingPlotConfig)
class EmbeddingPlot(FeatureEvalCallback):
    """Saves embeddings/epochNNN.png (PCA | t-SNE of a fixed eval subset by class) and logs it to W&B."""

    def __init__(self, cfg: EmbeddingPlotConfig, run_dir):
        super().__init__(cfg, run_dir)
        self.last_path = None

    def evaluate(self, trainer, module):
        features = self.features(trainer, module, self.cfg.eval_split)  # every rank: a collective
        if not trainer.is_global_zero:
            return {}
        keep = fixed_subset(len(features), self.cfg.num_samples, self.cfg.seed).to(features.features.device)
        path = (
            self.run_dir
            / "embeddings"
            / f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
        )
        title = f"(epoch {trainer.current_epoch}, {len(keep)} {self.cfg.eval_split} images)"
        self.last_path = plot_embeddings(
            features.features[keep], features.labels[keep], path, title, self.cfg.seed, self.cfg.tsne
        )
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="eval/embeddings", images=[str(path)], step=trainer.global_step)
        return {}
