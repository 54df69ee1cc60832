"""lightning_gen: deep generative models and self-supervised learning as Lightning modules."""

__version__ = "0.1.0"
