"""Time per image and FID of samplers on trained digits models: DDPM-1000 vs DDIM-N vs rectified-flow-N.

    python benchmarks/sampling.py --ddpm runs/ddpm_digits/<run>/checkpoints/last.ckpt \
        --flow runs/flow_digits/<run>/checkpoints/last.ckpt --n 1000

FID uses the digits domain extractor (lgen fid-extractor data=digits data.image_size=16) against the
train split, the same statistics as `val/fid_digits` during training. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gen.callbacks.fid import fid_from_features
from lightning_gen.eval.fid_extractor import default_path, load_extractor
from lightning_gen.methods.base import load_method


def features(extractor, images: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([extractor(x.to(device).float()).double().cpu() for x in images.split(500)])


def real_features(method, extractor, device) -> torch.Tensor:
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object

    info = method.data_info
    cfg = compose([f"data={info.name}", f"data.image_size={info.image_size}"])
    dm = registry.build("data", section_object(cfg.data))
    dm.setup("fit")
    images = torch.cat([b["image"] for b in dm.eval_dataloader("train")]).float() / 255
    return features(extractor, images, device)


def run(method, n: int, batch: int, device, **options) -> tuple[torch.Tensor, float]:
    out, started = [], None
    for c, start in enumerate(range(0, n, batch)):
        generator = torch.Generator(device).manual_seed(c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if started is None:
            started = time.perf_counter()
        out.append(method.sample(min(batch, n - start), generator=generator, **options))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ddpm", required=True)
    parser.add_argument("--flow")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--ddim-steps", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--flow-steps", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--skip-ddpm", action="store_true", help="leave out the 1000-step ancestral sampler")
    parser.add_argument("--extractor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    ddpm = load_method(args.ddpm).to(device)
    info = ddpm.data_info
    extractor, _ = load_extractor(args.extractor or default_path(info.name, info.image_size))
    extractor.to(device)
    real = real_features(ddpm, extractor, device)
    rows = []
    if not args.skip_ddpm:
        rows.append(("ddpm", f"DDPM ancestral, {ddpm.schedule.T} steps", dict(sampler="ddpm")))
    rows += [("ddpm", f"DDIM, {s} steps", dict(sampler="ddim", steps=s)) for s in args.ddim_steps]
    models = {"ddpm": ddpm}
    if args.flow:
        models["flow"] = load_method(args.flow).to(device)
        rows += [("flow", f"rectified flow Euler, {s} steps", dict(steps=s)) for s in args.flow_steps]
    print(f"device {device}, {args.n} samples per row, FID (digits extractor) vs {len(real)} train images\n")
    print("| model | sampler | ms / image | FID digits |")
    print("|---|---|---:|---:|")
    for model, name, options in rows:
        with torch.autocast(device.type, enabled=False):
            images, per_image = run(models[model], args.n, args.batch, device, **options)
        fid = fid_from_features(real, features(extractor, images, device))
        print(f"| {model} | {name} | {per_image * 1000:.2f} | {fid:.2f} |", flush=True)


if __name__ == "__main__":
    main()
