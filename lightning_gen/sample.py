"""Draw samples from any generator checkpoint into an image grid.

    lgen sample ckpt=runs/ddpm_digits/<run>/checkpoints/last.ckpt n=64 sampler=ddim steps=50 out=grid.png
    lgen sample ckpt=... sampler=heun steps=18          (35 network evaluations)
    lgen sample ckpt=... n=64 guidance=3 class=7        (class-conditional diffusion with CFG)
    lgen sample ckpt=runs/token_ar_digits/<run>/checkpoints/last.ckpt top_k=50 top_p=0.9 temperature=1

Arguments are key=value: ckpt (required), n (64), out (samples.png), nrow (8), seed (0),
device (auto), class (a class index for conditional models), and the method's own sampling options:
diffusion (the ddpm and flow presets included): sampler (ddpm|ddim|euler|heun|dpm++2m), steps (solver
steps), guidance, eta (ddim); pixelcnn: temperature; token_ar: temperature, top_k, top_p, guidance;
distill: steps (those the student was distilled for), guidance. The EMA weights sample where the method
keeps them.
A diffusion sampler reports its number of network evaluations (NFE); with guidance the conditional and
unconditional passes run as one batch and count as one evaluation.
"""

from __future__ import annotations

import time

import torch
from torchvision.utils import save_image

from lightning_gen.config import ConfigError

COMMON = {"ckpt": str, "n": int, "out": str, "nrow": int, "seed": int, "device": str, "class": int}
METHOD_OPTIONS = {
    "sampler": str,
    "steps": int,
    "guidance": float,
    "eta": float,
    "temperature": float,
    "top_k": int,
    "top_p": float,
}
# (lowest allowed, whether the lowest itself is excluded, highest allowed) of the numeric options
RANGES = {
    "n": (1, False, None),
    "nrow": (1, False, None),
    "steps": (1, False, None),
    "class": (0, False, None),
    "guidance": (0, False, None),
    "eta": (0, False, None),
    "temperature": (0, True, None),
    "top_k": (1, False, None),
    "top_p": (0, True, 1),
}


def check_range(key: str, value: float) -> None:
    low, low_open, high = RANGES[key]
    if value < low or (low_open and value == low) or (high is not None and value > high):
        allowed = f"greater than {low}" if low_open else f"at least {low}"
        allowed += f" and at most {high}" if high is not None else ""
        raise ConfigError(f"lgen sample: {key}={value}: {key} must be {allowed}")


def parse(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        kind = COMMON.get(key) or METHOD_OPTIONS.get(key)
        if not sep or kind is None:
            raise ConfigError(
                f"lgen sample: cannot read {item!r}; use key=value with keys "
                f"{', '.join([*COMMON, *METHOD_OPTIONS])}"
            )
        try:
            values[key] = kind(value)
        except ValueError as error:
            raise ConfigError(f"lgen sample: {key} must be {kind.__name__}, got {value!r}") from error
        if key in RANGES:
            check_range(key, values[key])
    if "ckpt" not in values:
        raise ConfigError(
            "lgen sample: say which checkpoint: ckpt=runs/<experiment>/<run>/checkpoints/last.ckpt"
        )
    return values


def add_arguments(parser) -> None:
    parser.add_argument(
        "options", nargs="*", help="key=value: ckpt= n= out= class= sampler= steps= guidance= ..."
    )


def main(args) -> int:
    from lightning_gen import registry
    from lightning_gen.checkpoint import load_checkpoint
    from lightning_gen.methods.base import load_method

    opts = parse(args.options)
    hparams = load_checkpoint(opts["ckpt"]).get("hyper_parameters", {})
    name = hparams.get("method")
    if name is None:
        raise ConfigError(f"{opts['ckpt']} was not written by lgen train: it names no method")
    entry, _ = registry.checkpoint_method(name, hparams.get("cfg", {}))
    if not getattr(entry.cls, "is_generative", False):  # refuse before building it
        raise ConfigError(
            f"{opts['ckpt']} is a {name} checkpoint, which is not a generator: "
            "lgen sample needs a vae, gan, diffusion (ddpm, flow), pixelcnn, token_ar or distill checkpoint"
        )
    method = load_method(opts["ckpt"])
    extra = {k: v for k, v in opts.items() if k in METHOD_OPTIONS}
    unsupported = sorted(set(extra) - set(method.sample_options))
    if unsupported:
        raise ConfigError(
            f"{method.registry_name} does not take sampling option(s) {', '.join(unsupported)}; "
            f"it takes: {', '.join(method.sample_options) or 'none besides n, seed, out'}"
        )
    device = opts.get("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    method.to(device)
    cond = opts.get("class")
    try:
        method.check_sample_options(None if cond is None else torch.tensor([cond]), {})
    except ValueError as error:
        raise ConfigError(str(error)) from error
    generator = torch.Generator(device).manual_seed(opts.get("seed", 0))
    started = time.time()
    try:
        images = method.sample(opts.get("n", 64), cond=cond, generator=generator, **extra)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    seconds = time.time() - started
    out = opts.get("out", "samples.png")
    save_image(images.float().cpu(), out, nrow=opts.get("nrow", 8), padding=1, pad_value=1.0)
    evaluations = getattr(method, "last_sample", None)
    how = ""
    if evaluations:
        guided = ", guided: both halves in one batch per evaluation" if evaluations["guided"] else ""
        how = f" (sampler={evaluations['sampler']}, {evaluations['steps']} steps, NFE {evaluations['nfe']}{guided})"
    print(
        f"[sample] {len(images)} {method.registry_name} samples{how} in {seconds:.1f}s "
        f"({seconds / len(images) * 1000:.1f} ms/image) -> {out}"
    )
    return 0
