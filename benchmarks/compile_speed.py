"""Training step time with and without ``trainer.compile`` (torch.compile of the backbone / U-Net).

For each experiment, the method and data are built from its config as ``lgen train`` builds them
(``run.build_datamodule`` / ``run.build_method``, so ``trainer.compile`` compiles the same networks),
and a Lightning Trainer trains ``--warmup + --steps`` steps. Reported: the median step time after the
warm-up (compilation happens in the warm-up steps) and the time of the warm-up itself. ``--repeats``
alternates the two settings.

    python benchmarks/compile_speed.py --experiments simclr_digits ddpm_digits --steps 10 --warmup 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gen.config import compose  # noqa: E402
from lightning_gen.precision import resolve_precision  # noqa: E402
from lightning_gen.run import build_datamodule, build_method  # noqa: E402


class Clock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.last, self.steps, self.warmup_s = warmup, None, None, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.warmup_s = now - self.start
        elif trainer.global_step > self.warmup:
            self.steps.append(now - self.last)
        self.last = now


def measure(
    experiment: str, compiled: bool, steps: int, warmup: int, overrides: list[str]
) -> tuple[float, float]:
    cfg = compose([f"experiment={experiment}", f"trainer.compile={str(compiled).lower()}", *overrides])
    torch.manual_seed(0)
    datamodule = build_datamodule(cfg)
    method = build_method(cfg, datamodule)
    clock = Clock(warmup)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.lgen_channels_last = bool(cfg.trainer.channels_last)
    trainer.fit(method, datamodule=datamodule)
    return statistics.median(clock.steps), clock.warmup_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=["simclr_digits", "ddpm_digits"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for every run, e.g. data.batch_size=256"
    )
    args = parser.parse_args()
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# {device}; median of {args.steps} steps after {args.warmup} warm-up steps, {args.repeats} run(s)"
    )
    print(
        "| experiment | step, eager (ms) | step, compiled (ms) | speed-up | warm-up, eager (s) | warm-up, compiled (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for experiment in args.experiments:
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for compiled in (False, True) if repeat % 2 == 0 else (True, False):
                runs[compiled].append(measure(experiment, compiled, args.steps, args.warmup, args.overrides))
        eager = statistics.median(r[0] for r in runs[False])
        fast = statistics.median(r[0] for r in runs[True])
        print(
            f"| {experiment} | {eager * 1e3:.1f} | {fast * 1e3:.1f} | {eager / fast:.2f}x "
            f"| {statistics.median(r[1] for r in runs[False]):.1f} | {statistics.median(r[1] for r in runs[True]):.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
