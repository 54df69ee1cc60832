"""Every loss here computes in float32, whatever autocast the training step runs under.

Mixed precision (``trainer.precision=bf16-mixed``, what ``precision=auto`` picks on a recent GPU)
runs the step under ``torch.autocast``, and autocast re-casts the inputs of every matmul to bf16,
``.float()`` or not: a loss written ``z.float() @ z.float().T`` still multiplies in bf16 (8 bits of
mantissa). For the losses that is too coarse. NT-Xent's logits lose their third digit (the loss is
6.656 instead of 6.671 on random embeddings, its gradient 0.3 % off), Sinkhorn-Knopp exponentiates
scores divided by ε = 0.05, and the Barlow Twins / VICReg matrices under ``16-mixed`` hold sums of
B products: entries of a few hundred squared over a batch of thousands exceed float16's largest
value, 65504, and the loss becomes inf. In float32 none of this happens.

``@full_precision`` is the one mechanism every loss function in ``lightning_gen.losses`` uses: it
turns autocast off for the device types of its arguments and casts their half-precision floating
tensors (also inside lists, tuples and dicts) to float32, so everything computed inside, matmuls
included, is float32. Gradients flow back through the cast into the bf16 network as usual.
``tests/test_loss_precision.py`` checks every loss under CPU bf16 autocast against its float32
value and gradient (within 1e-6).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _to_float32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, list | tuple):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


def _device_types(values, found: set[str]) -> set[str]:
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.device.type)
        elif isinstance(value, list | tuple):
            _device_types(value, found)
        elif isinstance(value, dict):
            _device_types(value.values(), found)
    return found


def full_precision(fn: F) -> F:
    """Decorator: run ``fn`` without autocast, its half-precision tensor arguments cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = _device_types([*args, *kwargs.values()], {"cpu"})
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*_to_float32(args), **_to_float32(kwargs))

    wrapper.full_precision = True  # what tests/test_loss_precision.py checks every loss for
    return wrapper  # type: ignore[return-value]
