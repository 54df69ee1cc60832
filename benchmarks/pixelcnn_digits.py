"""Test-set bits/dim and sample grids of PixelCNN checkpoints on digits: classic vs gated, (un)conditional.

For every checkpoint: the exact negative log-likelihood of the held-out digits test split (359 images,
never trained on) in bits/dim, with the raw and the EMA weights (the EMA weights are the ones that
sample). A class-conditional model gives -log2 p(x | y) with the true labels, and also the bits/dim of
its marginal p(x) = Σ_y p(y) p(x | y) under a uniform class prior (one pass per class), which is
comparable with the unconditional models. Then ``--samples`` images from the EMA weights with a fixed
seed, saved as a grid (`--zoom` x nearest-neighbour; conditional models: classes 0..9 in the columns).
Prints a markdown table.

    python benchmarks/pixelcnn_digits.py runs/pixelcnn_digits/readme/checkpoints/last.ckpt \
        runs/gated_pixelcnn_digits/readme/checkpoints/last.ckpt --grids docs/images
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gen.eval.cli import EvalConfig, build_data  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402
from lightning_gen.methods.generative.generator import evaluating  # noqa: E402


@torch.no_grad()
def test_bits_per_dim(method, net, loader, marginal: bool = False) -> float:
    """Mean bits/dim over the test split; ``marginal``: of Σ_y p(y) p(x|y) with p(y) uniform."""
    total, count = 0.0, 0
    with evaluating(net):
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            if marginal:
                classes = method.data_info.num_classes
                per_class = torch.stack(
                    [method.nll(net, images, torch.full_like(labels, y)) for y in range(classes)]
                )
                nll = -(torch.logsumexp(-per_class, dim=0) - math.log(classes))
            else:
                nll = method.nll(net, images, labels if method.conditional else None)
            total += float(nll.sum()) / (images[0].numel() * math.log(2))
            count += len(images)
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument(
        "--grids", type=Path, default=None, help="folder for generative_<experiment>_<run>.png"
    )
    parser.add_argument("--zoom", type=int, default=3, help="grid pixels per image pixel (nearest neighbour)")
    args = parser.parse_args()
    print(
        "| experiment | net | conditional | parameters | steps | test bits/dim (raw) | test bits/dim (EMA) "
        "| EMA, marginal p(x) | sampling s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        method = load_method(path)
        steps = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
        loader = build_data(EvalConfig(ckpt=path), method, None, []).eval_dataloader("test")
        raw = test_bits_per_dim(method, method.net, loader)
        ema = test_bits_per_dim(method, method.sampling_net(), loader)
        marginal = (
            test_bits_per_dim(method, method.sampling_net(), loader, True) if method.conditional else ema
        )
        start = time.perf_counter()
        samples = method.sample(args.samples, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        run = Path(path).parents[1]
        if args.grids is not None:
            args.grids.mkdir(parents=True, exist_ok=True)
            zoomed = torch.nn.functional.interpolate(samples, scale_factor=args.zoom, mode="nearest")
            name = f"generative_{run.parent.name}_{run.name}.png"
            save_image(zoomed, args.grids / name, nrow=10, padding=2, pad_value=1.0)
        params = sum(p.numel() for p in method.net.parameters())
        print(
            f"| {run.parent.name} | {method.cfg.net} | {method.conditional} | {params:,} | {steps} "
            f"| {raw:.3f} | {ema:.3f} | {marginal:.3f} | {seconds:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
