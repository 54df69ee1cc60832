"""Time per image and FID of samplers on trained digits models: DDPM-1000 vs DDIM-N vs rectified-flow-N.

    python benchmarks/sampling.py --ddpm runs/ddpm_digits/<run>/checkpoints/last.ckpt \
        --flow runs/flow_digits/<run>/checkpoints/last.ckpt --n 1000

For a class-conditional checkpoint (ddpm_cfg_digits) ``--guidance 0 1 3`` repeats the DDIM rows for
each classifier-free guidance weight w; samples then ask for the classes in turn, and the table adds
the fraction the digits classifier (the same network as the FID extractor) assigns to the requested
class: the fidelity/diversity trade-off of guidance in two columns. Every row also reports the
fraction of "noise-like" samples: rougher (mean absolute vertical pixel difference) than every real
training image.

FID uses the digits domain extractor (the cached one that training uses, built here if missing) against the
train split, the same statistics as `val/fid_digits` during training. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gen.callbacks.fid import fid_from_features
from lightning_gen.eval.fid_extractor import default_path, ensure_extractor, load_extractor
from lightning_gen.methods.base import load_method


def features(extractor, images: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([extractor(x.to(device).float()).double().cpu() for x in images.split(500)])


def roughness(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically neighbouring pixels, per image: noise images score far
    above any real digit (bilinearly upsampled strokes are smooth)."""
    return (images[:, :, 1:] - images[:, :, :-1]).abs().mean((1, 2, 3))


def real_images(method) -> torch.Tensor:
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object

    info = method.data_info
    cfg = compose([f"data={info.name}", f"data.image_size={info.image_size}"])
    dm = registry.build("data", section_object(cfg.data))
    dm.setup("fit")
    return torch.cat([b["image"] for b in dm.eval_dataloader("train")]).float() / 255


def requested_labels(method, n: int, device) -> torch.Tensor | None:
    """Classes in turn (0, 1, ..., 9, 0, ...) for a conditional model; None for an unconditional one."""
    if not getattr(method, "conditional", False):
        return None
    return torch.arange(n, device=device) % method.data_info.num_classes


def run(method, n: int, batch: int, device, **options) -> tuple[torch.Tensor, float]:
    out, started = [], None
    labels = requested_labels(method, n, device)
    for c, start in enumerate(range(0, n, batch)):
        cond = None if labels is None else labels[start : start + batch]
        generator = torch.Generator(device).manual_seed(c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if started is None:
            started = time.perf_counter()
        out.append(method.sample(min(batch, n - start), cond=cond, generator=generator, **options))
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
    parser.add_argument(
        "--guidance",
        type=float,
        nargs="*",
        default=None,
        help="CFG weights for the DDIM rows of a conditional DDPM (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--eta", type=float, default=None, help="DDIM eta (default: the checkpoint's sample_eta)"
    )
    parser.add_argument("--skip-ddpm", action="store_true", help="leave out the 1000-step ancestral sampler")
    parser.add_argument("--extractor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    ddpm = load_method(args.ddpm).to(device)
    info = ddpm.data_info
    path = args.extractor or ensure_extractor(
        info.name, info.image_size, default_path(info.name, info.image_size)
    )
    extractor, _ = load_extractor(path)
    extractor.to(device)
    reals = real_images(ddpm)
    real = features(extractor, reals, device)
    rough_limit = roughness(reals).max().item()
    rows = []
    if not args.skip_ddpm:
        rows.append(("ddpm", f"DDPM ancestral, {ddpm.process.T} steps", dict(sampler="ddpm")))
    eta = {} if args.eta is None else {"eta": args.eta}  # else the checkpoint's sample_eta
    eta_name = "" if args.eta is None else f", eta={args.eta:g}"
    for w in [None] if args.guidance is None else args.guidance:  # None: the checkpoint's own guidance
        guidance = {} if w is None else {"guidance": w}
        w_name = "" if w is None else f", w={w:g}"
        rows += [
            ("ddpm", f"DDIM, {s} steps{w_name}{eta_name}", dict(sampler="ddim", steps=s, **guidance, **eta))
            for s in args.ddim_steps
        ]
    models = {"ddpm": ddpm}
    if args.flow:
        models["flow"] = load_method(args.flow).to(device)
        rows += [("flow", f"rectified flow Euler, {s} steps", dict(steps=s)) for s in args.flow_steps]
    print(f"device {device}, {args.n} samples per row, FID (digits extractor) vs {len(real)} train images\n")
    conditional = any(getattr(m, "conditional", False) for m in models.values())
    print(f"noise-like = rougher than every real image (roughness > {rough_limit:.3f})\n")
    print(
        "| model | sampler | ms / image | FID digits | noise-like |"
        + (" requested class |" if conditional else "")
    )
    print("|---|---|---:|---:|---:|" + ("---:|" if conditional else ""))
    for model, name, options in rows:
        with torch.autocast(device.type, enabled=False):
            images, per_image = run(models[model], args.n, args.batch, device, **options)
        fid = fid_from_features(real, features(extractor, images, device))
        noise_like = (roughness(images.float().cpu()) > rough_limit).float().mean().item()
        row = f"| {model} | {name} | {per_image * 1000:.2f} | {fid:.2f} | {noise_like:.2f} |"
        labels = requested_labels(models[model], args.n, device)
        if labels is not None:
            predicted = torch.cat(
                [extractor.classify(x.to(device).float()).argmax(1) for x in images.split(500)]
            )
            row += f" {(predicted == labels).float().mean().item():.3f} |"
        elif conditional:
            row += " - |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
