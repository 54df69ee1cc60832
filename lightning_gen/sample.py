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

Tools for looking at a generator (``data.KEY=VALUE`` overrides where they read the dataset, e.g. data.root=):

    lgen sample ckpt=... n=16 nearest=8             + <out>_nearest.png: each sample beside its 8 nearest
                                                      training images in pixels and in features (extractor=)
    lgen sample ckpt=<vae> traverse=0,3,7           latent traversal grid (traverse=all: every dimension)
    lgen sample ckpt=... interpolate=8 n=6          6 interpolations of 8 images between pairs of samples

nearest: ``lightning_gen/eval/nearest.py``; traverse and interpolate (options base, image, range,
points; path): ``lightning_gen/eval/latent_space.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

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
# the tools, each with the options that belong to it (lightning_gen/eval/nearest.py, latent_space.py)
TOOLS = {
    "nearest": {"nearest": int, "extractor": str},
    "traverse": {"traverse": str, "base": str, "image": int, "range": float, "points": int},
    "interpolate": {"interpolate": int, "path": str},
}
TOOL_OPTIONS = {key: kind for options in TOOLS.values() for key, kind in options.items()}
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
    "nearest": (1, False, None),
    "interpolate": (2, False, None),  # both ends of the path at least
    "points": (2, False, None),
    "range": (0, True, None),
    "image": (0, False, None),
}


def check_range(key: str, value: float) -> None:
    low, low_open, high = RANGES[key]
    if value < low or (low_open and value == low) or (high is not None and value > high):
        allowed = f"greater than {low}" if low_open else f"at least {low}"
        allowed += f" and at most {high}" if high is not None else ""
        raise ConfigError(f"lgen sample: {key}={value}: {key} must be {allowed}")


def parse(items: list[str]) -> dict:
    values: dict = {"data": []}  # data.KEY=VALUE overrides of the checkpoint's dataset
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key.startswith("data."):
            values["data"].append(item)
            continue
        kind = COMMON.get(key) or METHOD_OPTIONS.get(key) or TOOL_OPTIONS.get(key)
        if not sep or kind is None:
            raise ConfigError(
                f"lgen sample: cannot read {item!r}; use key=value with keys "
                f"{', '.join([*COMMON, *METHOD_OPTIONS, *TOOL_OPTIONS])} or data.KEY"
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
    tools = [tool for tool in TOOLS if tool in values]
    if len(tools) > 1:
        raise ConfigError(
            f"lgen sample: {' and '.join(f'{t}=' for t in tools)} are separate commands: give one"
        )
    for key in TOOL_OPTIONS:
        owner = next(tool for tool, options in TOOLS.items() if key in options)
        if key in values and owner not in values:
            raise ConfigError(f"lgen sample: {key}= goes with {owner}=, which is not given")
    return values


def add_arguments(parser) -> None:
    parser.add_argument(
        "options", nargs="*", help="key=value: ckpt= n= out= class= sampler= steps= guidance= ..."
    )


def load_generator(opts: dict, also: tuple[str, ...] = ()):
    """(the checkpoint's method on its device, its sampling options from ``opts``), refusing a checkpoint
    that is no generator (except methods named in ``also``) or options its method does not take."""
    from lightning_gen import registry
    from lightning_gen.checkpoint import load_checkpoint
    from lightning_gen.methods.base import load_method

    hparams = load_checkpoint(opts["ckpt"]).get("hyper_parameters", {})
    name = hparams.get("method")
    if name is None:
        raise ConfigError(f"{opts['ckpt']} was not written by lgen train: it names no method")
    entry, _ = registry.checkpoint_method(name, hparams.get("cfg", {}))
    if not getattr(entry.cls, "is_generative", False) and entry.name not in also:  # refuse before building it
        raise ConfigError(
            f"{opts['ckpt']} is a {name} checkpoint, which is not a generator: "
            "lgen sample needs a vae, gan, diffusion (ddpm, flow), pixelcnn, token_ar or distill checkpoint"
        )
    method = load_method(opts["ckpt"])
    extra = {k: v for k, v in opts.items() if k in METHOD_OPTIONS}
    unsupported = sorted(set(extra) - set(getattr(method, "sample_options", ())))
    if unsupported:
        raise ConfigError(
            f"{method.registry_name} does not take sampling option(s) {', '.join(unsupported)}; "
            f"it takes: {', '.join(getattr(method, 'sample_options', ())) or 'none besides n, seed, out'}"
        )
    device = opts.get("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    method.to(device)
    cond = opts.get("class")
    if getattr(method, "is_generative", False):
        try:
            method.check_sample_options(None if cond is None else torch.tensor([cond]), {})
        except ValueError as error:
            raise ConfigError(str(error)) from error
    return method, extra


def main(args) -> int:
    opts = parse(args.options)
    if "traverse" in opts or "interpolate" in opts:
        from lightning_gen.eval import latent_space

        return latent_space.main(opts)
    method, extra = load_generator(opts)
    device = method.device
    nearest = None
    if "nearest" in opts:  # data, extractor and k checked before anything is drawn or written
        from lightning_gen.eval.nearest import TrainingImages

        nearest = TrainingImages(
            opts["ckpt"], method, opts["nearest"], opts.get("extractor", "auto"), opts["data"], device
        )
    cond = opts.get("class")
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
    if nearest is not None:
        started = time.time()
        found = nearest.search(images)
        grid = nearest.write(images, found, Path(out), opts["ckpt"], method.registry_name)
        closest = found["pixels"][0][:, 0]
        print(
            f"[sample] nearest {nearest.k} of {len(nearest.dataset)} training images, in pixels and in "
            f"{nearest.extractor_name} features, in {time.time() - started:.1f}s: pixel L2 to the nearest "
            f"median {closest.median().item():.3f}, min {closest.min().item():.3f} -> {grid} (+ .json)"
        )
    return 0
