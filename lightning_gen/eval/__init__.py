"""Evaluation of learned representations: frozen features, linear probe, kNN, fine-tuning, clustering.

The algorithms here are pure functions on tensors, shared by the training callbacks
(``lightning_gen.callbacks``) and the offline ``lgen eval`` commands (``lightning_gen.eval.cli``).
"""


class EvalError(ValueError):
    """Bad input to an evaluation (no labels, no ``embed``, k larger than the bank...). Says how to fix it."""
