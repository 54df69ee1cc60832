"""Training-step throughput by precision and memory format, to back `trainer.precision=auto`.

    python benchmarks/precision.py [--steps 5] [--batch 64]

For each model (the digits autoencoder of the default experiment and a CIFAR ResNet-18) it times
forward + backward + optimizer step in fp32 and bf16 autocast, NCHW and channels_last, and prints
images/s, peak memory (CUDA) or RSS growth (CPU), and the achieved fraction of a measured matmul
peak. `auto` picks bf16-mixed only where the hardware runs bf16 natively (AVX-512-BF16/AMX CPUs,
Ampere+ GPUs); this table shows what that choice is worth on the machine at hand.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torchvision
from torch import nn

from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.generative.autoencoder import Autoencoder, AutoencoderConfig
from lightning_gen.precision import resolve_precision


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype (a practical stand-in for the hardware peak)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs counted by torch's FlopCounterMode, x3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x)
    return 3.0 * counter.get_total_flops()


def time_steps(model: nn.Module, x: torch.Tensor, bf16: bool, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    device_type = x.device.type
    for i in range(steps + 2):
        if i == 2:
            sync(x.device)
            start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(x.device)
    return (time.perf_counter() - start) / steps


def models(batch: int):
    ae = Autoencoder(AutoencoderConfig(), DataInfo(channels=1, image_size=32))
    yield "autoencoder (digits, 1x32x32)", nn.Sequential(ae.encoder, ae.decoder), torch.rand(batch, 1, 32, 32)
    resnet = torchvision.models.resnet18(num_classes=10)
    resnet.conv1, resnet.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    yield "resnet18 (CIFAR stem, 3x32x32)", resnet, torch.rand(batch, 3, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peaks = {
        False: measured_matmul_peak(device, torch.float32),
        True: measured_matmul_peak(device, torch.bfloat16),
    }
    print(
        f"device: {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()} | precision=auto -> "
        f"{resolve_precision('auto', 'auto')}"
    )
    print(
        f"measured matmul peak: fp32 {peaks[False] / 1e9:.1f} GFLOP/s, bf16 {peaks[True] / 1e9:.1f} GFLOP/s\n"
    )
    header = f"{'model':32s} {'precision':10s} {'layout':14s} {'img/s':>9s} {'ms/step':>9s} {'GFLOP/s':>9s} {'% peak':>7s} {'mem MiB':>8s}"
    print(header)
    print("-" * len(header))
    for name, model, x in models(args.batch):
        model, x = model.to(device), x.to(device)
        flops = step_flops(model, x)
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model, x = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            for bf16 in (False, True):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                seconds = time_steps(model, x, bf16, args.steps)
                memory = (
                    torch.cuda.max_memory_allocated() / 2**20
                    if device.type == "cuda"
                    else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
                )
                achieved = flops / seconds
                print(
                    f"{name:32s} {'bf16-mixed' if bf16 else 'fp32':10s} "
                    f"{'channels_last' if channels_last else 'NCHW':14s} {x.shape[0] / seconds:9.1f} "
                    f"{seconds * 1e3:9.1f} {achieved / 1e9:9.1f} {100 * achieved / peaks[bf16]:6.1f}% {memory:8.0f}"
                )


if __name__ == "__main__":
    main()
