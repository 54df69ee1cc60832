"""Images/s of SimCLR and MoCo v2 training through lightning_gen vs a bare PyTorch loop doing the same maths.

ResNet-18 (CIFAR stem), 32x32 RGB input, batch 256 by default. Both paths include the data
pipeline: a DataLoader over in-memory uint8 CIFAR-shaped images (random pixels: throughput does not
depend on content), the host-to-device copy, the batched on-device views, forward, loss, backward,
optimizer step, and for MoCo the momentum update and the enqueue. The framework path is a real
Lightning ``Trainer.fit`` of the registered method (online probe, logging, LR schedule included);
the bare loop runs the same method's own code (``setup``, ``configure_optimizers``, ``training_step``:
views, backbone, loss, probe, MoCo's split-BN shuffle, SimCLR's concatenated views) and its momentum
update in a plain loop, without the Trainer's loop, hooks, logging, LR schedule and callbacks (the
callbacks the framework path ran are listed under the table).
Images/s = batch / median wall time of the ``--steps`` steps after ``--warmup`` (a step is timed from
one batch end to the next, data loading included). Overhead = 1 - framework / bare. ``--repeats R``
runs each path R times in alternating order and compares medians: on a noisy shared 2-core CPU VM
whole runs of one path once differed by up to 75 % (docs/benchmarks.md), far more than the overhead itself.

    python benchmarks/ssl_throughput.py --steps 20 --warmup 5            # GPU
    python benchmarks/ssl_throughput.py --device cpu --steps 4 --warmup 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gen import registry  # noqa: E402
from lightning_gen.data.base import ImageTensorDataset  # noqa: E402
from lightning_gen.data.views import ViewsConfig  # noqa: E402
from lightning_gen.methods.base import DataInfo, ema_update  # noqa: E402
from lightning_gen.nets.backbones import BackboneConfig  # noqa: E402
from lightning_gen.schedules import Progress  # noqa: E402


def build(method: str, batch: int):
    info = DataInfo(
        name="cifar10",
        channels=3,
        image_size=32,
        num_classes=10,
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        batch_size=batch,
    )
    entry = registry.get("method", "simclr" if method == "simclr" else "moco")
    common = dict(name=entry.name, backbone=BackboneConfig(name="resnet18"), warmup_epochs=0.0)
    if method == "simclr":
        cfg = entry.config(**common, views=ViewsConfig(recipe="simclr_cifar"), temperature=0.5)
    else:
        cfg = entry.config(**common, version="v2", views=ViewsConfig(recipe="moco_v2"), queue_size=4096)
    return entry.cls(cfg, info)


def dataset(n: int) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(0)
    return ImageTensorDataset(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


CALLBACKS: set[str] = set()  # the callbacks the framework path's Trainer ran, printed under the table


class Clock(L.Callback):
    """Wall time of every training step, measured between consecutive batch ends (so data loading,
    the host-to-device copy and every Lightning hook are inside), after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.last, self.steps = warmup, None, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.steps.append(now - self.last)
        self.last = now


class Data(L.LightningDataModule):
    def __init__(self, ds, batch):
        super().__init__()
        self.ds, self.batch = ds, batch

    def train_dataloader(self):
        return DataLoader(
            self.ds,
            batch_size=self.batch,
            shuffle=True,
            drop_last=True,
            num_workers=2,
            pin_memory=True,
            persistent_workers=True,
        )


def framework(
    method: str,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    channels_last: bool,
    device: str,
    compile: bool = False,
):
    model = build(method, batch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:  # what trainer.compile=true does
        model.compile_networks()
    clock = Clock(warmup)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.lgen_channels_last = channels_last
    trainer.fit(model, datamodule=Data(dataset(batch * (warmup + steps)), batch))
    CALLBACKS.update(type(c).__name__ for c in trainer.callbacks)
    return batch / statistics.median(clock.steps)


def bare(
    method: str,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    channels_last: bool,
    device: str,
    compile: bool = False,
):
    """The same method's own code in a plain loop: ``setup``, ``configure_optimizers``, ``training_step``
    (views, backbone, loss, probe: MoCo's split-BN shuffle and SimCLR's concatenated views included),
    backward, the optimizer step and the momentum update; no Trainer, loop hooks, logging or LR schedule."""
    model = build(method, batch)
    model.setup("fit")  # what Lightning calls first: MoCo v2 on one device converts to split-BN here
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile_networks()
    model._use_channels_last = lambda: channels_last  # the flag a Trainer carries (trainer.channels_last)
    model.train()
    opt = model.configure_optimizers()
    loader = DataLoader(
        dataset(batch * (warmup + steps)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=2,
        pin_memory=True,
    )
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    last, step_times = time.perf_counter(), []
    for step, b in enumerate(loader):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with autocast:  # Lightning runs training_step under its autocast too
            loss = model.training_step(b, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tau = model.momentum_at(Progress(step, warmup + steps, warmup + steps))
        for online, target in model.momentum_pairs():  # what SSLMethod.optimizer_step adds
            ema_update(target, online, tau)
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step >= warmup:
            step_times.append(now - last)
        last = now
    return batch / statistics.median(step_times)


def spread(values: list[float]) -> str:
    middle = f"{statistics.median(values):.1f}"
    return middle if len(values) == 1 else f"{middle} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "moco_v2"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", nargs="+", default=["false", "true"])
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["false"],
        help="torch.compile the backbones (trainer.compile): false true",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each path, in alternating order; the table shows the median (and the range)",
    )
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"# {name}, ResNet-18 32x32, batch {args.batch_size}, median of {args.steps} steps after {args.warmup}"
        f" warm-up, {args.repeats} run(s) per path"
    )
    print(
        "| method | precision | channels_last | compile | lightning_gen img/s | bare PyTorch img/s | overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    cases = [
        (m, p, cl == "true", c == "true")
        for m in args.methods
        for p in args.precisions
        for cl in args.channels_last
        for c in args.compile
    ]
    for method, precision, cl, compiled in cases:
        runs = {"framework": [], "bare": []}
        for repeat in range(args.repeats):  # alternate the order: drifts of a shared machine even out
            order = ("framework", "bare") if repeat % 2 == 0 else ("bare", "framework")
            for path in order:
                torch.manual_seed(0)
                run = framework if path == "framework" else bare
                runs[path].append(
                    run(
                        method,
                        args.batch_size,
                        args.steps,
                        args.warmup,
                        precision,
                        cl,
                        args.device,
                        compiled,
                    )
                )
        fw, ref = statistics.median(runs["framework"]), statistics.median(runs["bare"])
        print(
            f"| {method} | {precision} | {cl} | {compiled} | {spread(runs['framework'])} | {spread(runs['bare'])} "
            f"| {100 * (1 - fw / ref):+.1f}% |",
            flush=True,
        )
    print(f"\n# framework path's callbacks: {', '.join(sorted(CALLBACKS))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
