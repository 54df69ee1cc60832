"""Constant tensors (normalisation statistics, colour matrices, noise schedules) copied to a device once.

``torch.tensor(values, device="cuda")`` or ``host_tensor.to("cuda")`` inside a training or sampling
step is a blocking host-to-device copy: the host waits until the GPU has finished everything queued
before it, and the GPU then idles while Python catches up. ``device_constant`` makes that copy the
first time a (values, device, dtype) is asked for and hands back the same device tensor afterwards,
so a step that needs the constant pays nothing (``tests/test_sync_free.py`` counts the copies).

The returned tensors are shared: never modify one in place.
"""

from __future__ import annotations

import torch

_CACHE: dict[tuple, torch.Tensor] = {}
_KEEP: dict[int, torch.Tensor] = {}  # host tensors cached by id stay alive, so their id is never reused


def device_constant(
    values: tuple | list | torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``values`` (numbers, nested or not, or a host tensor that never changes) on ``device`` as ``dtype``."""
    if isinstance(values, torch.Tensor):
        source: tuple = ("tensor", id(values))
        _KEEP.setdefault(id(values), values)
    else:
        source = ("values", _frozen(values))
    key = (source, torch.device(device), dtype)
    tensor = _CACHE.get(key)
    if tensor is None:
        if isinstance(values, torch.Tensor):
            tensor = values.detach().to(device=device, dtype=dtype)
        else:
            tensor = torch.tensor(values, dtype=dtype, device=device)
        _CACHE[key] = tensor
    return tensor


def _frozen(values) -> tuple:
    return tuple(_frozen(v) if isinstance(v, list | tuple) else float(v) for v in values)
