"""Bits per dimension of a likelihood model's checkpoint on one split, per image and on average.

    lgen eval bpd ckpt=runs/pixelcnn_fashion_mnist/<run>/checkpoints/last.ckpt          (exact)
    lgen eval bpd ckpt=runs/vae_fashion_mnist/<run>/checkpoints/last.ckpt               (negative ELBO)
    lgen eval bpd ckpt=runs/ddpm_fashion_mnist/<run>/checkpoints/last.ckpt draws=4      (variational bound)
    lgen eval bpd ckpt=... estimator=ode n=1000 steps=32                                (probability-flow ODE)

All of them on the same images (``split``, default test; the first ``n``, default all), so PixelCNN,
the VAE and diffusion models share one column. What each number is:

- PixelCNN: the exact discrete -log2 p(x) / D (conditional models: p(x | y) with the true labels).
- VAE: the negative ELBO with one posterior sample per image (drawn from a generator seeded by ``seed``), as a density of the
  pixels in [0, 1] plus D log 256 (the usual dequantisation correction): an approximate bound. With
  ``k`` > 1 the importance-weighted bound of Burda et al. 2016 (arXiv:1509.00519) with k posterior
  samples per image, tighter (lower bits/dim) on average as k grows; k = 1 is the ELBO, computed as the
  VAE trains and logs it (closed-form KL).
- Diffusion, ``vlb`` (default): the variational bound with the discretised Gaussian decoder, a
  bound on the discrete -log2 P(x) / D, Monte Carlo over t with ``draws`` draws per image; its
  standard error from those draws is reported. ``ode``: the probability-flow ODE likelihood of the
  images uniformly dequantised within their 8-bit bins (Hutchinson's trace, one probe per image), also
  a bound on the discrete likelihood up to the ODE's integration error. A class-conditional diffusion
  model is evaluated unconditionally (its null class), i.e. -log p(x).
- Token models (token_ar): the exact NLL of the image's tokens plus the tokenizer decoder's discretised
  Gaussian NLL of the image given them: an upper bound on -log2 p(x) / D (null class, as diffusion).

The result goes to ``<run>/eval/<checkpoint>/bpd.json`` with the per-image values and to the run's W&B
run. ``bits_per_dim(method, images, labels)`` is the function behind it, for other evaluations;
``lgen eval nll`` (eval/nll.py) adds the ranking of the images by it and a grid of the extremes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_gen.config import bounded, choice
from lightning_gen.losses import elbo

BOUND_THROUGH_TOKENS = "bound: token NLL + decoder NLL given the tokens"


@dataclass
class LikelihoodConfig:
    split: str = "test"  # the split whose images are scored
    n: int = bounded(0, 0)  # the first n images of the split (0: all of them)
    estimator: str = choice("auto", "auto", "vlb", "ode")  # diffusion: vlb (auto) or ode; others: their own
    draws: int = bounded(4, 1)  # vlb: draws of t (and noise) per image
    k: int = bounded(1, 1)  # VAE: posterior samples per image of the importance-weighted bound (1: the ELBO)
    steps: int = bounded(32, 1)  # ode: Runge-Kutta steps in log sigma (4 network evaluations each)
    sigma_lo: float = bounded(1e-3, 0)  # diffusion: the smallest noise level (continuous-time processes)
    batch_size: int = bounded(250, 1)


def check_likelihood(method, k: int = 1) -> None:
    """Refuse, with how to fix it, a model whose bits/dim this module cannot give (or k > 1 for one
    without importance samples)."""
    from lightning_gen.eval import EvalError

    name = method.registry_name
    if name == "vae" and method.cfg.decoder == "bernoulli":
        raise EvalError(
            "this VAE has a Bernoulli decoder, which is no density of 8-bit images: train it with "
            "method.decoder=gaussian (or gaussian_learned) for bits/dim"
        )
    if getattr(method, "latent", False):
        raise EvalError(
            "this diffusion model runs on an autoencoder's latents: its bound is on the latents, not on "
            "the images, so it has no bits/dim of the pixels; lgen eval bpd takes pixel-space models"
        )
    if not (
        hasattr(method, "bits_per_dim")
        or hasattr(method, "bits_per_dim_bound")
        or name in ("pixelcnn", "vae")
    ):
        raise EvalError(
            f"a {name} checkpoint has no likelihood: lgen eval bpd / nll take pixelcnn, vae, diffusion and token_ar models"
        )
    if k != 1 and name != "vae":
        raise EvalError(
            f"k={k} is the number of importance samples of the VAE's bound; a {name} model's likelihood "
            "takes none: leave k out"
        )


def bits_per_dim(method, images: torch.Tensor, labels=None, generator=None, **options):
    """(bits/dim per image (N,), variance of each estimate over its Monte Carlo draws (N,), what it is).

    ``images``: uint8 (N, C, H, W) on the method's device. ``options``: the diffusion estimator's
    (estimator, draws, steps, sigma_lo) and the VAE's k."""
    k = options.get("k", 1)
    check_likelihood(method, k)
    name, dims = method.registry_name, images[0].numel()
    net = method.sampling_net()
    if hasattr(method, "bits_per_dim"):  # diffusion: its own bound or ODE
        estimator = options.get("estimator", "auto")
        estimator = "vlb" if estimator == "auto" else estimator
        settings = {k: options[k] for k in ("draws", "steps", "sigma_lo") if k in options}
        bpd, var = method.bits_per_dim(images, None, estimator, generator=generator, **settings)
        return bpd, var, f"diffusion {estimator}"
    if hasattr(method, "bits_per_dim_bound"):  # a token model: through its tokenizer, null class
        return (
            method.bits_per_dim_bound(images)["bits_per_dim"],
            torch.zeros(len(images)),
            BOUND_THROUGH_TOKENS,
        )
    if name == "pixelcnn":
        nll = method.nll(net, images, labels if method.conditional else None)
        return elbo.discrete_bits_per_dim(nll, dims), torch.zeros(len(images)), "exact"
    x = method.to_float(images, "unit")  # the VAE
    mu, logvar = net.encode(x)

    def posterior_sample() -> torch.Tensor:  # z ~ q(z|x), from ``generator`` when given
        if generator is None:
            return elbo.reparameterize(mu, logvar)
        eps = torch.randn(mu.shape, generator=generator, device=generator.device).to(mu)
        return mu + (0.5 * logvar).exp() * eps

    if k == 1:
        nll, _ = method.likelihood(x, net.decode(posterior_sample()).float())
        bpd = elbo.bits_per_dim(nll + elbo.kl_standard_normal(mu, logvar), dims)
        return bpd, torch.zeros(len(images)), "negative ELBO"
    log_weights = []  # log p(x|z_j) + log p(z_j) - log q(z_j|x), z_j ~ q(z|x)
    for _ in range(k):
        z = posterior_sample()
        nll, _ = method.likelihood(x, net.decode(z).float())
        log_weights.append(
            -nll.double() + elbo.log_normal(z).double() - elbo.log_normal(z, mu, logvar).double()
        )
    bound = -elbo.importance_weighted_bound(torch.stack(log_weights))
    return elbo.bits_per_dim(bound, dims), torch.zeros(len(images)), f"IWAE bound, k={k}"


@torch.no_grad()
def evaluate(method, datamodule, cfg: LikelihoodConfig, seed: int, device) -> dict:
    """Bits/dim over ``cfg.split``: the mean, its standard errors and the per-image values."""
    dataset = datamodule.eval_dataloader(cfg.split).dataset
    count = len(dataset) if cfg.n == 0 else min(cfg.n, len(dataset))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(count)), batch_size=cfg.batch_size, shuffle=False
    )
    generator = torch.Generator(device).manual_seed(seed)
    options = {key: getattr(cfg, key) for key in ("estimator", "draws", "steps", "sigma_lo", "k")}
    values, variances = [], []
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.autocast(device.type, enabled=False):
        torch.manual_seed(seed)  # any draw from the global generator (the samples come from ``generator``)
        for batch in loader:
            labels = batch["label"].to(device)
            bpd, var, what = bits_per_dim(method, batch["image"].to(device), labels, generator, **options)
            values.append(bpd.double().cpu())
            variances.append(var.double().cpu())
    values, variances = torch.cat(values), torch.cat(variances)
    n = len(values)
    return {
        "bits_per_dim": values.mean().item(),
        # the Monte Carlo error of this number for these images, and the spread over images of the split
        "mc_stderr": (variances.sum().sqrt() / n).item(),
        "image_stderr": (values.std() / math.sqrt(n)).item() if n > 1 else 0.0,
        "images": n,
        "estimator": what,
        "per_image": values.tolist(),
    }


def score(cfg, section: LikelihoodConfig, data_overrides: list[str]):
    """Load, check and score ``cfg.ckpt`` on ``section.split``: (method, datamodule, run dir, output folder,
    result of ``evaluate``). Nothing is written here."""
    from lightning_gen.eval.cli import build_data
    from lightning_gen.eval.wandb_run import run_dir_of_checkpoint
    from lightning_gen.methods.base import load_method

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    method = load_method(cfg.ckpt).to(device)
    check_likelihood(method, section.k)
    run_dir = run_dir_of_checkpoint(cfg.ckpt)
    datamodule = build_data(cfg, method, run_dir, data_overrides)
    result = evaluate(method, datamodule, section, cfg.seed, device)
    base = run_dir / "eval" if run_dir else Path(cfg.ckpt).resolve().parent / "eval"
    out = Path(cfg.out) if cfg.out else base / Path(cfg.ckpt).stem
    return method, datamodule, run_dir, out, result


def report(cfg, protocol: str, datamodule, run_dir, result: dict, split: str) -> dict:
    """Print the table of a likelihood result and add it to the run's W&B run; returns what was shown."""
    from lightning_gen.eval.cli import format_table
    from lightning_gen.eval.wandb_run import append_to_run

    shown = {k: result[k] for k in ("bits_per_dim", "mc_stderr", "image_stderr", "images")}
    title = (
        f"{protocol} ({result['estimator']}) - {Path(cfg.ckpt).name} on {datamodule.registry_name} {split}"
    )
    print(format_table(title, shown))
    if cfg.wandb and run_dir is not None:
        where = append_to_run(run_dir, {f"{protocol}/{k}": v for k, v in shown.items()}, "offline_eval")
        if where:
            print(f"results added to the run's W&B run: {where}")
    return shown


def run(cfg, data_overrides: list[str]) -> dict:
    """``lgen eval bpd``: score, write ``bpd.json``, print a table, add to the W&B run."""
    started = time.time()
    method, datamodule, run_dir, out, result = score(cfg, cfg.bpd, data_overrides)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": "bpd",
        "checkpoint": str(cfg.ckpt),
        "method": method.registry_name,
        "data": datamodule.registry_name,
        "split": cfg.bpd.split,
        "seed": cfg.seed,
        "seconds": round(time.time() - started, 2),
        "config": asdict(cfg.bpd),
        "results": result,
    }
    (out / "bpd.json").write_text(json.dumps(payload, indent=2) + "\n")
    report(cfg, "bpd", datamodule, run_dir, result, cfg.bpd.split)
    print(f"written: {out / 'bpd.json'}\n")
    return result
