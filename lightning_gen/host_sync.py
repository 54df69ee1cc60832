"""Find the operations that would make the host wait for the GPU, on any machine (a CPU is enough).

A CUDA step runs asynchronously: Python queues kernels and moves on, and the GPU stays busy as
long as the queue is never drained. An operation that needs a *value* computed on the device, or
that copies host memory to the device without pinning, blocks the host until everything queued
before it has finished (``cudaStreamSynchronize``), and the GPU idles while Python catches up.
``torch.cuda.set_sync_debug_mode("error")`` finds them on a GPU; ``HostSyncCounter`` finds the same
operations on a CPU run, so a test can hold every method to zero without a GPU:

- ``aten._local_scalar_dense`` on a device tensor: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``,
  ``if t.any():``;
- outputs whose *shape* depends on device data: ``nonzero``, ``masked_select``, ``unique``, boolean
  mask indexing ``x[mask]`` and ``x[mask] = v`` (``index`` / ``index_put_`` with a bool index),
  ``repeat_interleave`` without ``output_size``, ``equal``, ``is_nonzero``;
- copies between host and device: a tensor built from Python values with a device
  (``torch.tensor(values, device=...)``, ``new_tensor``), a host tensor moved with ``.to(device)``
  or copied into a device tensor, and device values read back (``.cpu()``, ``.tolist()``, ``.numpy()``).

On a CPU every tensor lives in host memory, so the counter simulates where each would live on a GPU
run ("residency"): the module's parameters, buffers and gradients, the optimizer's state (except the
step counters that ``torch.optim`` keeps on the host unless ``capturable`` or ``fused``) and the
batch are on the device; a factory call (``zeros``, ``randn``, ``arange``, ``full``...) is on the device
when it names a ``device``, on the host when it does not (PyTorch's default); every other tensor lives
where its inputs live; tensors that existed before counting began and are none of the above
(``NoiseSchedule`` tensors kept as plain attributes, constants) are host tensors. The argument of
``.to(...)`` counts as the accelerator when it is a ``torch.device`` (on a CPU run the accelerator is the
CPU); ``.cpu()`` or the string ``"cpu"`` means the host. A value on the host costs nothing to read:
``.item()`` of a host tensor (Adam's step counter) is not a synchronisation on a GPU either.

``raw=True`` ignores residency and counts every such operation (what a naive counter reports,
including reads of host tensors): useful to show that the detector detects.

Usage::

    with HostSyncCounter(device_tensors=[*model.parameters(), *model.buffers(), *batch.values()]) as sync:
        loss = model.training_step(batch, 0); loss.backward(); optimizer.step()
    assert not sync.events, sync.report()

or, around one step of a real ``Trainer.fit`` (``tests/test_sync_free.py`` checks every method so)::

    counting = CountStepSyncs(step=1); counting.install(trainer); trainer.fit(...); counting.counter.events

On a GPU, ``CountStepSyncs(cuda_sync_errors=True)`` also runs the window under
``torch.cuda.set_sync_debug_mode("error")``: CUDA itself then raises at any synchronising call.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# Read a device value on the host (the host waits for the queue to drain).
SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
# Output shape depends on device data: the allocation needs the count on the host first.
DATA_DEPENDENT_SHAPE = {
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.bincount.default,
}
BOOLEAN_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}

# Python-level factories: whether the caller named a device decides where the result lives.
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.empty_strided,
    torch.scalar_tensor,
    torch.tril_indices,
    torch.triu_indices,
}
FROM_PYTHON_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
READS_BACK = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}


@dataclass(frozen=True)
class SyncEvent:
    kind: str  # "scalar read", "data-dependent shape", "boolean mask", "host to device", "device to host"
    op: str
    where: str  # the innermost frame of lightning_gen (else of the caller) that asked for it

    def __str__(self) -> str:
        return f"{self.kind:<20} {self.op:<34} {self.where}"


def _caller() -> str:
    """The innermost frame in lightning_gen (outside this file), else the innermost outside torch."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        name = frame.f_code.co_filename
        if "lightning_gen" in name and not name.endswith("host_sync.py"):
            return f"{name.split('lightning_gen/')[-1]}:{frame.f_lineno} ({frame.f_code.co_name})"
        if fallback is None and "/torch/" not in name and not name.endswith("host_sync.py"):
            fallback = f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return fallback or "?"


def _tensors(tree):
    """The tensors in nested lists, tuples and dicts (a lean ``tree_flatten`` for op arguments)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, list | tuple):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class HostSyncCounter:
    """Context manager recording the operations that would block the host on a GPU run (module docstring)."""

    def __init__(
        self, device_tensors: Iterable[torch.Tensor] = (), raw: bool = False, keep_stacks: bool = False
    ):
        self.raw, self.keep_stacks = raw, keep_stacks
        self.recording = True  # False: only learn where tensors live (a warm-up step)
        self.events: list[SyncEvent] = []
        self.stacks: list[str] = []  # the full Python stack of each event, with keep_stacks
        self._residency: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> True on the device
        self.mark_device(device_tensors)
        self._function_mode = _Placement(self)
        self._dispatch_mode = _Detector(self)

    # ------------------------------------------------------------------ residency
    def mark_device(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._residency[t] = True

    def mark_host(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._residency[t] = False

    def on_device(self, t: torch.Tensor) -> bool:
        return self.raw or bool(self._residency.get(t, False))

    def _place(self, outputs, on_device: bool, keep_known: bool = True) -> None:
        for t in _tensors(outputs):
            if not (keep_known and t in self._residency):
                self._residency[t] = on_device

    # ------------------------------------------------------------------ recording
    def record(self, kind: str, op) -> None:
        if not self.recording:
            return
        self.events.append(SyncEvent(kind, str(op), _caller()))
        if self.keep_stacks:
            self.stacks.append("".join(traceback.format_stack()[:-2]))

    def counts(self) -> Counter:
        return Counter(e.kind for e in self.events)

    def report(self) -> str:
        lines = [f"{len(self.events)} host synchronisation(s):"]
        for event, n in Counter(self.events).most_common():
            lines.append(f"  {n:>4} x {event}")
        return "\n".join(lines)

    def __enter__(self) -> HostSyncCounter:
        if not self.raw:  # raw: every op counts wherever it runs, placement is not tracked
            self._function_mode.__enter__()
        self._dispatch_mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._dispatch_mode.__exit__(*exc)
        if not self.raw:
            self._function_mode.__exit__(*exc)


def _names_accelerator(device) -> bool:
    """Whether a ``device=`` argument means the accelerator: a ``torch.device`` (on a CPU run the
    module's device is the CPU) or a string other than "cpu"; ``None`` and "cpu" mean the host."""
    if isinstance(device, str):
        return not device.startswith("cpu")
    return isinstance(device, torch.device)


def _target_is_device(args, kwargs) -> bool | None:
    """Where ``Tensor.to(*args, **kwargs)`` sends the tensor: True device, False host, None unchanged."""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, str | torch.device):
            return _names_accelerator(a)
    return None


class _Placement(TorchFunctionMode):
    """Python-level half: where factories put their result, host/device copies and read-backs."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if func in FROM_PYTHON_DATA:
            out = func(*args, **kwargs)
            source = args[0] if args else kwargs.get("data")
            to_device = _names_accelerator(kwargs.get("device"))
            if isinstance(source, torch.Tensor):
                moved = to_device and not c.on_device(source)
                c._place(out, c.on_device(source) or moved, keep_known=False)
                if moved:
                    c.record("host to device", f"{func.__name__}(host tensor, device=...)")
            elif to_device:
                c._place(out, True, keep_known=False)
                c.record("host to device", f"{func.__name__}(python values, device=...)")
            else:
                c._place(out, False, keep_known=False)
            return out
        if func in FACTORIES:
            out = func(*args, **kwargs)
            c._place(out, _names_accelerator(kwargs.get("device")), keep_known=False)
            return out
        if func is torch.Tensor.new_tensor:
            out = func(*args, **kwargs)
            c._place(out, c.on_device(args[0]), keep_known=False)
            if c.on_device(args[0]):
                c.record("host to device", "Tensor.new_tensor(python values)")
            return out
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            source = args[0]
            target = False if func is torch.Tensor.cpu else True if func is torch.Tensor.cuda else None
            if func is torch.Tensor.to:
                other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), kwargs.get("other"))
                target = (
                    c.on_device(other) if isinstance(other, torch.Tensor) else _target_is_device(args, kwargs)
                )
            out = func(*args, **kwargs)
            was = c.on_device(source)
            if target is None or (target == was and not c.raw):
                return out
            if target and not was:
                c.record("host to device", f"Tensor.{func.__name__}(device)")
            elif was and not target:
                c.record("device to host", f"Tensor.{func.__name__}()")
            if out is source:  # a no-op on this CPU run; a copy to another memory on a GPU run
                with torch._C.DisableTorchFunction():
                    out = source.clone()
            c._place(out, bool(target), keep_known=False)
            return out
        if func in READS_BACK and isinstance(args[0], torch.Tensor) and c.on_device(args[0]):
            c.record("device to host", f"Tensor.{func.__name__}")
        return func(*args, **kwargs)


class _Detector(TorchDispatchMode):
    """aten-level half: propagates residency through every op and records the synchronising ones."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        device = any(c.on_device(t) for t in _tensors((args, kwargs)))
        if c.raw and func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
            c.record("host to device", func)  # raw: every tensor built from Python values
        elif device:
            if func in SCALAR_READS:
                c.record("scalar read", func)
            elif func in DATA_DEPENDENT_SHAPE or (
                func in REPEAT_INTERLEAVE and kwargs.get("output_size") is None
            ):
                c.record("data-dependent shape", func)
            elif func in BOOLEAN_INDEXING and _has_bool_index(args):
                c.record("boolean mask", func)
            elif func in (aten.copy_.default, aten._copy_from.default):
                dst, src = args[0], args[1]
                if c.on_device(dst) and not c.on_device(src) and not c.raw:
                    c.record("host to device", func)
        out = func(*args, **kwargs)
        c._place(out, device)
        return out


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, their gradients and the buffers of ``module``: what Lightning keeps on the device."""
    tensors = [*module.parameters(), *module.buffers()]
    return tensors + [p.grad for p in module.parameters() if p.grad is not None]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(device, host) tensors of an optimizer's state: ``torch.optim`` keeps its ``step`` counters on the
    host unless the group is ``capturable`` or ``fused``; everything else lives with the parameter."""
    device, host = [], []
    for group in optimizer.param_groups:
        on_host_step = not (group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    (host if key == "step" and on_host_step and value.ndim == 0 else device).append(value)
    return device, host


class CountStepSyncs(L.Callback):
    """Counts the host synchronisations of training batch ``step`` (0-based) of a ``Trainer.fit``.

    ``install(trainer)`` puts the window in place: it opens before every other callback's
    ``on_train_batch_start`` and closes after every callback's ``on_train_batch_end`` but the
    checkpointing ones (Lightning writes checkpoints at their own interval): the method's hooks,
    forward, backward, optimizer step, EMA/momentum updates and the callbacks of the step. The
    batches before ``step`` run under the same counter without recording, so that it learns where
    the tensors they create live (optimizer state, Lightning's logged-metric states). ``stop`` ends
    training after the counted batch; ``cuda_sync_errors`` also turns on
    ``torch.cuda.set_sync_debug_mode("error")`` for the counted batch when training on a CUDA device.
    """

    def __init__(self, step: int = 1, raw: bool = False, stop: bool = True, cuda_sync_errors: bool = False):
        self.step, self.raw, self.stop, self.cuda_sync_errors = step, raw, stop, cuda_sync_errors
        self.counter: HostSyncCounter | None = None
        self.counted = False
        self._debug_mode_before: int | None = None

    def install(self, trainer: L.Trainer) -> None:
        callbacks = [c for c in trainer.callbacks if c is not self and not isinstance(c, _OpenWindow)]
        checkpoints = [i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)]
        callbacks.insert(checkpoints[0] if checkpoints else len(callbacks), self)
        trainer.callbacks[:] = [_OpenWindow(self), *callbacks]

    def open(self, pl_module, batch, batch_idx) -> None:
        if batch_idx > self.step:
            return
        if self.counter is None:
            self.counter = HostSyncCounter(module_tensors(pl_module), raw=self.raw)
        self.counter.mark_device(_tensors(batch))  # Lightning moved the batch to the device before this hook
        self.counter.recording = batch_idx == self.step
        if self.counter.recording and self.cuda_sync_errors and pl_module.device.type == "cuda":
            self._debug_mode_before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.counter is not None and batch_idx <= self.step:
            self.counter.__exit__(None, None, None)
        if self._debug_mode_before is not None:
            torch.cuda.set_sync_debug_mode(self._debug_mode_before)
            self._debug_mode_before = None
        if batch_idx == self.step:
            self.counted = True
            trainer.should_stop = self.stop or trainer.should_stop  # nothing more to count


class _OpenWindow(L.Callback):
    """The first callback: opens ``CountStepSyncs``'s window before every other ``on_train_batch_start``."""

    def __init__(self, counting: CountStepSyncs):
        self.counting = counting

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counting.open(pl_module, batch, batch_idx)
