"""What the FID callback's sampling costs and how it spreads over ranks.

    python benchmarks/fid_sampling.py [--device cpu|cuda] [--n 250] [--width 32] [--steps 50] [--repeats 3]

1. Work per rank for ``num_samples`` N in calls of ``batch_size`` B on W ranks: whole calls of B
   dealt round-robin (ranks beyond ceil(N / B) idle, with no sample at all) against the balanced
   contiguous shares the callback uses (N / W each).
2. Time per image of one ``sample()`` call of n images (an untrained digits-size DDPM U-Net,
   stochastic DDIM, so noise is drawn at every step): with a plain generator, and with the noise
   seeded per chunk of 16 samples (``lightning_gen.eval.seeded_sampling``), whose cost is one
   random draw per chunk per step instead of one per step, plus a Python hook on every torch call.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from lightning_gen import distributed
from lightning_gen.eval.seeded_sampling import SEED_CHUNK, call_ranges, seeded_samples
from lightning_gen.methods.base import DataInfo


def balance_table(n: int, batch: int) -> str:
    rows = [
        f"| W | round-robin calls of {batch}: calls per rank | images max / min | "
        "balanced shares: calls per rank | images max / min |",
        "|---:|---:|---:|---:|---:|",
    ]
    for world in (1, 2, 3, 4, 5, 8, 16):
        chunks = math.ceil(n / batch)
        old = [sum(min(batch, n - c * batch) for c in range(rank, chunks, world)) for rank in range(world)]
        old_calls = max(len(range(rank, chunks, world)) for rank in range(world))
        new = [len(distributed.balanced_range(n, world, rank)) for rank in range(world)]
        new_calls = len(call_ranges(n, batch, world, 0))
        rows.append(
            f"| {world} | {old_calls} | {max(old)} / {min(old)} | {new_calls} | {max(new)} / {min(new)} |"
        )
    return "\n".join(rows)


def best_times(fns: dict, device, repeats: int) -> dict[str, float]:
    """Best wall time of each function, run in turn (so a shared machine's load hits all alike)."""
    best = {name: math.inf for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--n", type=int, default=250, help="images in the timed call (the callback's batch_size)"
    )
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=1000, help="callbacks.fid.num_samples (table 1)")
    parser.add_argument("--batch-size", type=int, default=250, help="callbacks.fid.batch_size (table 1)")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"Work per rank, num_samples {args.num_samples}, batch_size {args.batch_size}:\n")
    print(balance_table(args.num_samples, args.batch_size))

    from lightning_gen.methods.generative.diffusion import Diffusion, DiffusionConfig

    torch.manual_seed(0)
    cfg = DiffusionConfig(  # the ddpm preset: VP on the discrete chain, eps, stochastic DDIM
        process="vp",
        prediction="eps",
        timesteps=1000,
        noise_schedule="linear",
        width=args.width,
        sampler="ddim",
        sample_steps=args.steps,
        sample_eta=1.0,
    )
    model = Diffusion(cfg, DataInfo(name="digits", image_size=16, num_classes=10)).to(device).eval()
    times = best_times(
        {
            "plain": lambda: model.sample(args.n, generator=torch.Generator(device).manual_seed(0)),
            "seeded": lambda: seeded_samples(model, range(args.n), seed=0),
        },
        device,
        args.repeats,
    )
    plain, seeded = times["plain"], times["seeded"]
    print(
        f"\nOne sample() call of {args.n} images, DDPM width {args.width} at 16 px, DDIM-{args.steps} (eta 1), "
        f"{device.type}, {torch.get_num_threads()} thread(s), best of {args.repeats}:\n"
    )
    print("| noise | ms / image | overhead |\n|---|---:|---:|")
    print(f"| one generator for the call | {1000 * plain / args.n:.2f} | |")
    print(
        f"| seeded per chunk of {SEED_CHUNK} samples | {1000 * seeded / args.n:.2f} | "
        f"{100 * (seeded / plain - 1):+.1f} % |"
    )


if __name__ == "__main__":
    main()
