"""Stateless schedules: pure functions of the optimizer step and the planned number of steps.

Because nothing here keeps state, a run resumed at global step s computes exactly the values an
uninterrupted run computes at step s (learning rate, EMA momentum, teacher temperature, ...).
"""

from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total`` (held at ``end`` afterwards)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), 1.0, min_ratio)


def warmup_constant(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return 1.0


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup`` steps (e.g. DINO's teacher temperature)."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


LR_SCHEDULES = {"cosine": warmup_cosine, "constant": warmup_constant}
