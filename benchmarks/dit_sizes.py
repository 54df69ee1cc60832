"""Parameters and tokens of the DiT presets for a latent shape, optionally the time of a training step.

    python benchmarks/dit_sizes.py                                  # ImageNet 256: 32x32x4 latents, 1000 classes
    python benchmarks/dit_sizes.py --latent 4 7 --classes 10 --presets T/2 --patch 1
    python benchmarks/dit_sizes.py --time --batch 32                # + forward/backward ms (bf16 autocast on a GPU)

Parameters are counted as the official DiT code counts them (its fixed position table included);
``--learn-sigma`` doubles the output channels, as the paper's models do.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gen.nets.dit import PRESETS, DiT, DiTConfig


def step_ms(
    net: DiT, batch: int, channels: int, size: int, classes: int, device: str, repeats: int = 5
) -> float:
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, max(classes, 1), (batch,), device=device) if classes else None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            net(x, t, y).float().square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - started)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, nargs=2, default=(4, 32), metavar=("CHANNELS", "SIZE"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--presets", nargs="*", default=[p for p in PRESETS if p.endswith("/2")])
    parser.add_argument("--patch", type=int, default=None, help="override every preset's patch size")
    parser.add_argument("--learn-sigma", action="store_true")
    parser.add_argument("--time", action="store_true", help="also time a forward/backward step")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    channels, size = args.latent
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"latents {channels}x{size}x{size}, {args.classes} classes, learn_sigma={args.learn_sigma}")
    header = f"{'preset':<8}{'depth':>6}{'width':>7}{'heads':>6}{'patch':>6}{'tokens':>8}{'params (M)':>12}"
    print(header + (f"{'step ms':>10}" if args.time else ""))
    for preset in args.presets:
        cfg = DiTConfig(preset=preset, patch_size=args.patch, learn_sigma=args.learn_sigma)
        sizes = cfg.sizes()
        with torch.device("meta"):
            net = DiT.from_config(cfg, channels, size, args.classes)
        params = sum(p.numel() for p in net.parameters()) + net.pos_embed.numel()
        row = (
            f"{preset:<8}{sizes['depth']:>6}{sizes['width']:>7}{sizes['heads']:>6}{sizes['patch_size']:>6}"
            f"{(size // sizes['patch_size']) ** 2:>8}{params / 1e6:>12.2f}"
        )
        if args.time:
            real = DiT.from_config(cfg, channels, size, args.classes).to(device)
            row += f"{step_ms(real, args.batch, channels, size, args.classes, device):>10.1f}"
        print(row)


if __name__ == "__main__":
    main()
