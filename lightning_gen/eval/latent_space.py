"""Latent traversals and interpolations between samples: what a generator's latent space encodes.

    lgen sample ckpt=<vae> traverse=0,3,7                rows z_0, z_3, z_7 swept over [-3, 3], the rest 0
    lgen sample ckpt=<vae> traverse=all base=posterior image=5   ... the rest at mu(x) of test image 5
    lgen sample ckpt=<vae, gan or diffusion> interpolate=8 n=6   6 pairs of samples, 8 images from one to the other
    lgen sample ckpt=<latent_autoencoder> interpolate=8  between the latents of pairs of test images

**Traversal** (``traverse=`` latent indices, or ``all``): each row is one latent dimension i, set to
``points`` values evenly spaced in [-range, range] (default 9 values in [-3, 3], i.e. +-3 prior standard
deviations) while every other dimension stays at the base: ``base=zero``, the prior's mean (the
default where there is a prior), or ``base=posterior``, the posterior mean mu(x) of test image
``image`` (the only base of the latent autoencoder, whose latents have no prior; its index runs over
the flattened C x H/f x W/f latent, scaled to unit variance as latent diffusion sees it). Models:
the VAE and the latent autoencoder (an encoder's latent).

**Interpolation** (``interpolate=K``: K images per path, both ends included; ``n`` paths, default 8):
between the latents of two samples z0, z1 at t = 0, 1/(K-1), ..., 1. For a standard normal latent
(the VAE's z, the GAN's z, a diffusion model's initial noise x_T) the path is spherical:

    slerp(z0, z1; t) = sin((1 - t) W) / sin W * z0 + sin(t W) / sin W * z1,   cos W = <z0, z1> / (|z0| |z1|)

(Shoemake 1985; for generative models White 2016, arXiv:1609.04468). Draws of N(0, I) in d dimensions
have norm close to sqrt(d); the straight line between two of them passes through points of norm about
sqrt(d / 2) at its middle, a region the prior almost never produces, while the arc keeps the norm
between |z0| and |z1|. Diffusion interpolates in noise space: x_T is the slerp and the sample is
x_0 of a deterministic sampler from it (DDIM with eta = 0, Euler, Heun or DPM-Solver++(2M); the
model's configured sampler, else DDIM). The latent autoencoder has no prior to draw from: its paths
run between the latents of pairs of test images, linearly (``path=lerp``; ``path=`` overrides either).

Written: the grid ``out`` (default ``traversal.png`` / ``interpolation.png``), ``<out stem>.json``
(what was done, the values or t of each column, the layout of the grid) and ``<out stem>.pt`` (the
latents the grid decoded and the decoded images), so any cell can be checked or redrawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_gen.config import ConfigError

TRAVERSABLE = ("vae", "latent_autoencoder")
DECODE_BATCH = 256


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each pair (z0[i], z1[i]) at the times ``t`` (T,): (N, T, *z0.shape[1:]).

    Computed in float64; nearly parallel pairs (sin W < 1e-6) fall back to the straight line, which is
    then the same path."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    t = t.double().to(a.device).unsqueeze(0)  # (1, T)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    omega = cos.clamp(-1, 1).acos().unsqueeze(1)  # (N, 1)
    sin = omega.sin()
    straight = sin.abs() < 1e-6
    safe = torch.where(straight, torch.ones_like(sin), sin)
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / safe)  # (N, T)
    wb = torch.where(straight, t.expand_as(wa), torch.sin(t * omega) / safe)
    path = wa.unsqueeze(-1) * a.unsqueeze(1) + wb.unsqueeze(-1) * b.unsqueeze(1)
    return path.view(len(a), t.shape[1], *z0.shape[1:]).to(z0.dtype)


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) z0 + t z1 for each pair at the times ``t``: (N, T, *z0.shape[1:])."""
    t = t.to(z0).view(1, -1, *[1] * (z0.ndim - 1))
    return (1 - t) * z0.unsqueeze(1) + t * z1.unsqueeze(1)


def traversal(base: torch.Tensor, dims: list[int], values: torch.Tensor) -> torch.Tensor:
    """Latents (len(dims), len(values), *base.shape): row r is ``base`` with flat index dims[r] set to each value."""
    flat = base.flatten().to(values.dtype)
    rows = flat.repeat(len(dims), len(values), 1)
    for r, dim in enumerate(dims):
        rows[r, :, dim] = values
    return rows.view(len(dims), len(values), *base.shape).to(base.dtype)


@dataclass
class LatentSpace:
    """A model's latent as the tools use it: decode latents to images, and (where it has one) encode."""

    description: str
    shape: tuple[int, ...]
    gaussian_prior: bool  # standard normal prior: slerp, base=zero, samples to interpolate between
    decode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (latents, labels) -> [0, 1] images
    encode: Callable[[torch.Tensor], torch.Tensor] | None  # uint8 images -> posterior means

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def deterministic_sampler(method, opts: dict) -> dict:
    """The sampling options of a diffusion model with which x_0 is a function of x_T."""
    from lightning_gen.diffusion.samplers import DETERMINISTIC

    sampler = opts.get("sampler", method.cfg.sampler)
    eta = opts.get("eta", method.cfg.sample_eta if sampler == "ddim" else 0.0)
    if sampler not in DETERMINISTIC or (sampler == "ddim" and eta > 0):
        if "sampler" in opts or "eta" in opts:
            raise ConfigError(
                f"interpolating in noise space needs a deterministic sampler, not sampler={sampler}"
                f"{f' eta={eta}' if sampler == 'ddim' else ''}: use sampler=ddim (eta=0), euler, heun or dpm++2m"
            )
        sampler, eta = "ddim", 0.0  # the configured one draws fresh noise along the way
    chosen = {"sampler": sampler, "steps": opts.get("steps", method.default_steps(sampler))}
    if sampler == "ddim":
        chosen["eta"] = 0.0
    if "guidance" in opts:
        chosen["guidance"] = opts["guidance"]
    return chosen


def latent_space(method, opts: dict, what: str) -> tuple[LatentSpace, dict]:
    """The latent of ``method`` for the tool ``what`` (traverse / interpolate) and the sampling options
    used to decode it; a ConfigError naming the models that have one otherwise."""
    name = method.registry_name
    if name == "latent_autoencoder":
        space = LatentSpace(
            f"the autoencoder's latent ({'x'.join(map(str, method.latent_shape))}, scaled to unit variance)",
            method.latent_shape,
            False,
            lambda z, _: ((method.decode_latents(z) + 1) / 2).clamp(0, 1),
            lambda x: method.encode_latents(method.to_float(x, "symmetric")),
        )
        return space, {}
    shape = getattr(method, "noise_shape", None)
    if (what == "traverse" and name not in TRAVERSABLE) or shape is None:
        models = (
            "vae, latent_autoencoder" if what == "traverse" else "vae, gan, diffusion, latent_autoencoder"
        )
        why = "no encoder whose latent dimensions to sweep" if what == "traverse" else "no latent noise"
        raise ConfigError(f"{what}= needs a model with a latent: a {name} model has {why}; use {models}")
    options = deterministic_sampler(method, opts) if "sampler" in method.sample_options else {}
    size = "x".join(map(str, shape))
    descriptions = {
        "vae": f"the VAE's latent z ({size}, prior N(0, I))",
        "gan": f"the GAN generator's input z ({size}, N(0, I))",
        "diffusion": f"the initial noise x_T ({size}, N(0, I)) of the deterministic "
        f"{options.get('sampler')} sampler, {options.get('steps')} steps",
    }

    def decode(z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        try:
            return method.sample(len(z), cond=labels, noise=z, **options)
        except ValueError as error:  # a sampler that cannot run on this model
            raise ConfigError(str(error)) from error

    encode = getattr(method, "posterior_mean", None)
    return LatentSpace(
        descriptions.get(name, f"the {name} model's noise ({size})"), shape, True, decode, encode
    ), options


def decode_grid(space: LatentSpace, latents: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Decode latents (R, C, *shape) in batches: images (R, C, channels, H, W)."""
    rows, cols = latents.shape[:2]
    flat = latents.reshape(rows * cols, *space.shape)
    flat_labels = None if labels is None else labels.repeat_interleave(cols)
    images = [
        space.decode(chunk, None if flat_labels is None else flat_labels[i : i + DECODE_BATCH]).float().cpu()
        for i, chunk in zip(range(0, len(flat), DECODE_BATCH), flat.split(DECODE_BATCH))
    ]
    images = torch.cat(images)
    return images.view(rows, cols, *images.shape[1:])


def row_labels_of(method, opts: dict, rows: int) -> torch.Tensor | None:
    """One class per row for a conditional model: ``class`` if given, else the classes in turn."""
    if not getattr(method, "conditional", False):
        return None
    if "class" in opts:
        return torch.full((rows,), opts["class"], dtype=torch.long, device=method.device)
    return torch.arange(rows, device=method.device) % method.data_info.num_classes


def held_out_images(ckpt: str, method, opts: dict):
    """The checkpoint's test split (the dataset as ``lgen eval`` finds it, data.* overrides applied)."""
    from lightning_gen.eval.cli import EvalConfig, build_data
    from lightning_gen.eval.wandb_run import run_dir_of_checkpoint

    datamodule = build_data(EvalConfig(ckpt=ckpt), method, run_dir_of_checkpoint(ckpt), opts["data"])
    return datamodule.eval_dataloader("test").dataset, datamodule.registry_name


def parse_dims(spec: str, size: int) -> list[int]:
    if spec == "all":
        return list(range(size))
    try:
        dims = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(
            f"traverse={spec}: give latent indices like traverse=0,3,7, or traverse=all"
        ) from error
    outside = [d for d in dims if not 0 <= d < size]
    if not dims or outside:
        raise ConfigError(
            f"traverse={spec}: latent indices run from 0 to {size - 1} (the latent has {size} dimensions)"
            + (f"; {outside} are outside" if outside else "")
        )
    return dims


def traverse(method, space: LatentSpace, opts: dict) -> dict:
    """The traversal grid's latents, images and description."""
    dims = parse_dims(opts["traverse"], space.size)
    base_kind = opts.get("base", "zero" if space.gaussian_prior else "posterior")
    points, extent = opts.get("points", 9), opts.get("range", 3.0)
    if base_kind not in ("zero", "posterior"):
        raise ConfigError(
            f"base={base_kind}: use base=zero (the prior's mean) or base=posterior (mu(x) of a test image)"
        )
    if base_kind == "zero" and not space.gaussian_prior:
        raise ConfigError(f"base=zero: {space.description} has no prior; use base=posterior image=INDEX")
    if "n" in opts:
        raise ConfigError("n= does not apply to traverse=: the grid has one row per latent index")
    if base_kind == "zero":
        base, where = torch.zeros(space.shape, device=method.device), "0 (the prior's mean)"
    else:
        dataset, data = held_out_images(opts["ckpt"], method, opts)
        index = opts.get("image", 0)
        if not 0 <= index < len(dataset):
            raise ConfigError(f"image={index}: the {data} test split has images 0 to {len(dataset) - 1}")
        base = space.encode(dataset[index]["image"].unsqueeze(0).to(method.device))[0]
        where = f"the posterior mean of {data} test image {index}"
    values = torch.linspace(-extent, extent, points, dtype=torch.float64)
    latents = traversal(base.float(), dims, values.to(base.device))
    labels = row_labels_of(method, opts, len(dims))
    return {
        "latents": latents,
        "labels": labels,
        "images": decode_grid(space, latents, labels),
        "title": f"{method.registry_name}: one latent index per row set to each value, the others at {where}",
        "row_labels": [f"z[{d}]" for d in dims],
        "column_labels": [f"{v:+.3g}" for v in values.tolist()],
        "record": {"dims": dims, "values": values.tolist(), "base": base_kind, "base_is": where},
    }


def interpolate(method, space: LatentSpace, opts: dict) -> dict:
    """The interpolation grid's latents, images and description."""
    points, pairs = opts["interpolate"], opts.get("n", 8)  # (ranges checked by lgen sample's parse)
    path = opts.get("path", "slerp" if space.gaussian_prior else "lerp")
    if path not in ("slerp", "lerp"):
        raise ConfigError(f"path={path}: use path=slerp (spherical) or path=lerp (straight line)")
    generator = torch.Generator().manual_seed(opts.get("seed", 0))
    if space.gaussian_prior:
        ends = torch.randn(2, pairs, *space.shape, generator=generator).to(method.device)
        between = "pairs of samples"
    else:
        dataset, data = held_out_images(opts["ckpt"], method, opts)
        if 2 * pairs > len(dataset):
            raise ConfigError(f"n={pairs} pairs need {2 * pairs} test images; {data} has {len(dataset)}")
        chosen = torch.randperm(len(dataset), generator=generator)[: 2 * pairs]
        images = torch.stack([dataset[int(i)]["image"] for i in chosen]).to(method.device)
        ends = space.encode(images).view(2, pairs, *space.shape)
        between = f"the latents of pairs of {data} test images {chosen.view(2, pairs).T.tolist()}"
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    latents = (slerp if path == "slerp" else lerp)(ends[0], ends[1], t)
    labels = row_labels_of(method, opts, pairs)
    return {
        "latents": latents,
        "labels": labels,
        "images": decode_grid(space, latents, labels),
        "title": f"{method.registry_name}: {'spherical' if path == 'slerp' else 'linear'} interpolation "
        f"({path}) between {between}",
        "row_labels": [f"{r}" for r in range(pairs)]
        if labels is None
        else [f"class {c}" for c in labels.tolist()],
        "column_labels": [f"t={v:.2g}" for v in t.tolist()],
        "record": {"path": path, "t": t.tolist(), "between": between, "pairs": pairs},
    }


def main(opts: dict) -> int:
    """``lgen sample ... traverse=`` / ``interpolate=``: check, decode, write the grid, JSON and latents."""
    from lightning_gen.eval.grids import image_table
    from lightning_gen.sample import load_generator

    what = "traverse" if "traverse" in opts else "interpolate"
    method, _ = load_generator(opts, also=("latent_autoencoder",))
    space, options = latent_space(method, opts, what)
    grid = (traverse if what == "traverse" else interpolate)(method, space, opts)
    out = Path(opts.get("out", "traversal.png" if what == "traverse" else "interpolation.png"))
    picture, layout = image_table(
        grid["images"],
        title=grid["title"],
        column_labels=grid["column_labels"],
        row_labels=grid["row_labels"],
    )
    picture.save(out)
    labels = grid["labels"]
    record = {
        "checkpoint": str(opts["ckpt"]),
        "method": method.registry_name,
        "tool": what,
        "latent": space.description,
        "latent_shape": list(space.shape),
        "sampling": options,
        "seed": opts.get("seed", 0),
        "labels": None if labels is None else labels.tolist(),
        **grid["record"],
        "rows": grid["row_labels"],
        "columns": grid["column_labels"],
        "layout": layout.to_dict(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    torch.save(
        {"latents": grid["latents"].cpu(), "images": grid["images"], "labels": labels}, out.with_suffix(".pt")
    )
    rows, cols = grid["images"].shape[:2]
    print(f"[sample] {what}: {rows} rows x {cols} images of {space.description}: {grid['title']} -> {out}")
    return 0
