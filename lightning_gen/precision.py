"""``trainer.precision=auto``: the precision the hardware runs natively, decided without initialising CUDA.

- A CUDA GPU of compute capability 8.0 or newer (A100, H100, RTX 30xx and later) has bf16 tensor
  cores: ``bf16-mixed``. Older GPUs (V100 7.0, T4 7.5) emulate bf16 slowly but have fp16 tensor
  cores: ``16-mixed``, whose dynamic loss scaling (Lightning's ``MixedPrecision`` plugin and its
  ``GradScaler``) also covers manual optimisation (the GAN: ``manual_backward`` scales each loss,
  each optimizer's ``step()`` unscales, skips on inf and updates the scale). With several GPUs the
  oldest decides. ``torch.cuda.is_bf16_supported()`` is not the test: it says yes for emulated bf16,
  and it initialises CUDA in the launching process, after which ``ddp_fork`` / ``ddp_notebook``
  cannot start their children.
- No GPU: ``bf16-mixed`` on CPUs with native bf16 (AVX-512-BF16 or AMX), else ``32-true``.

The compute capability comes from NVML (``libnvidia-ml``, the library behind nvidia-smi, which
does not touch the CUDA runtime; no NVML means no NVIDIA driver, hence no GPU), or, where NVML is
there but cannot answer, from a short child process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import torch

CUDA_ACCELERATORS = ("auto", "gpu", "cuda")


def auto_precision(cuda_capability: tuple[int, int] | None, cpu_native_bf16: bool) -> str:
    """The decision itself: ``cuda_capability`` is the oldest visible GPU's (None: no GPU is used)."""
    if cuda_capability is not None:
        return "bf16-mixed" if tuple(cuda_capability) >= (8, 0) else "16-mixed"
    return "bf16-mixed" if cpu_native_bf16 else "32-true"


def resolve_precision(precision: str, accelerator: str) -> str:
    """``precision`` itself, or for ``auto`` what ``auto_precision`` picks on this machine."""
    if precision != "auto":
        return precision
    capability = cuda_capability() if accelerator in CUDA_ACCELERATORS else None
    return auto_precision(capability, cpu_native_bf16())


def cpu_native_bf16() -> bool:
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    cpu_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(cpu_bf16 or cpu_amx)


def cuda_capability() -> tuple[int, int] | None:
    """The smallest compute capability of the GPUs this process sees, or None without GPUs.

    CUDA stays uninitialised in this process (``torch.cuda.is_initialized()`` is still False after)."""
    if not torch.cuda._is_compiled():
        return None
    if torch.cuda.is_initialized():  # nothing left to protect
        count = torch.cuda.device_count()
        return min(torch.cuda.get_device_capability(i) for i in range(count)) if count else None
    capabilities = _nvml_capabilities()
    if capabilities is None:
        capabilities = _child_process_capabilities()
    return min(capabilities) if capabilities else None


def _nvml_capabilities() -> list[tuple[int, int]] | None:
    """Capabilities of the visible GPUs through NVML; None where NVML is there but cannot tell."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return []  # NVML comes with the NVIDIA driver: without it there is no usable GPU
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = torch.cuda.device_count()  # NVML-based (no CUDA init), honours CUDA_VISIBLE_DEVICES
        found = []
        for index in range(count):
            nvml_index = torch.cuda._get_nvml_device_index(index)  # CUDA_VISIBLE_DEVICES order and UUIDs
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(nvml_index), ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            found.append((major.value, minor.value))
        return found
    except Exception:  # a private torch helper that moved, a MIG layout NVML indexes differently
        return None
    finally:
        nvml.nvmlShutdown()


def _child_process_capabilities() -> list[tuple[int, int]]:
    """Ask a child process (CUDA initialised there, not here)."""
    code = (
        "import torch\n"
        "for i in range(torch.cuda.device_count()):\n"
        "    print(*torch.cuda.get_device_capability(i))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ)
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [tuple(int(v) for v in line.split()) for line in out.splitlines() if len(line.split()) == 2]
