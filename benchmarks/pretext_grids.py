"""Image grids of trained pretext checkpoints (colorization, inpainting, MAE) on digits validation images.

    PYTHONPATH=. python benchmarks/pretext_grids.py \
        runs/benchmarks/colorization_digits/probe/checkpoints/last.ckpt \
        --out docs/images/pretext_colorization.png

Rows are the method's ``images_for_logging`` (what the image-grid callback logs during training).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from lightning_gen import registry
from lightning_gen.callbacks.images import grid
from lightning_gen.config import from_saved
from lightning_gen.methods.base import load_method
from lightning_gen.run import build_datamodule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    registry.load_all()
    method = load_method(args.checkpoint)
    datamodule = build_datamodule(from_saved(Path(args.checkpoint).parents[1] / "config.yaml"))
    datamodule.setup()
    torch.manual_seed(0)
    batch = next(iter(datamodule.eval_dataloader("val")))
    batch = {k: v[: args.n] for k, v in batch.items()}
    with torch.no_grad():
        named = method.images_for_logging(batch)
    save_image(grid({k: v[: args.n] for k, v in named.items()}, nrow=args.n), args.out)
    print(f"wrote {args.out}: rows {', '.join(named)}")


if __name__ == "__main__":
    main()
