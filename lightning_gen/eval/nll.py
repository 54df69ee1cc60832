"""Per-image negative log-likelihood of a likelihood model, and its most and least likely images.

    lgen eval nll ckpt=runs/vae_digits/<run>/checkpoints/last.ckpt k=64    (VAE: IWAE bound, 64 samples)
    lgen eval nll ckpt=runs/pixelcnn_digits/<run>/checkpoints/last.ckpt     (PixelCNN: exact)
    lgen eval nll ckpt=runs/ddpm_digits/<run>/checkpoints/last.ckpt draws=8 (diffusion: variational bound)
    lgen eval nll ckpt=... split=test n=500 show=8 seed=0

The numbers are those of ``lgen eval bpd`` (one implementation: ``eval/likelihood.py::bits_per_dim``,
with the same options: split, n, k, estimator, draws, steps, sigma_lo, batch_size); this command adds
what makes them an outlier score: the images ranked by their bits/dim, and a grid of the ``show`` most
likely (lowest bits/dim) and least likely ones, each with its value. A model's least likely test
images are the ones it finds atypical: mislabelled, badly cropped or unusual digits, or, fed another
dataset (``data=``), out-of-distribution inputs, with the caveat of Nalisnick et al. 2019
(arXiv:1810.09136) that likelihood models can give higher likelihood to simpler images of another
dataset than to their own.

Written to ``<run>/eval/<checkpoint>/`` (or ``out=DIR``): ``nll.json`` (per-image bits/dim in split
order, their mean and standard error, the method, estimator, k, split, n, seed, the ranking and the
grid's layout) and ``nll_extremes.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from lightning_gen.config import bounded
from lightning_gen.eval import likelihood
from lightning_gen.eval.likelihood import LikelihoodConfig


@dataclass
class NLLConfig(LikelihoodConfig):
    show: int = bounded(8, 1)  # images in each row of the grid: the most likely and the least likely


def ranking(per_image: list[float], show: int) -> tuple[list[int], list[int]]:
    """(indices of the ``show`` lowest bits/dim, lowest first; of the ``show`` highest, highest first).
    Ties keep split order."""
    values = torch.tensor(per_image, dtype=torch.float64)
    show = min(show, len(values))
    most = values.argsort(stable=True)[:show]
    least = (-values).argsort(stable=True)[:show]
    return most.tolist(), least.tolist()


def run(cfg, data_overrides: list[str]) -> dict:
    """``lgen eval nll``: score, rank, write ``nll.json`` and ``nll_extremes.png``, print a table."""
    from lightning_gen.eval.grids import image_table

    started = time.time()
    section: NLLConfig = cfg.nll
    method, datamodule, run_dir, out, result = likelihood.score(cfg, section, data_overrides)
    per_image = result["per_image"]
    most, least = ranking(per_image, section.show)
    dataset = datamodule.eval_dataloader(section.split).dataset
    images = torch.stack(
        [torch.stack([dataset[i]["image"].float() / 255 for i in row]) for row in (most, least)]
    )
    picture, layout = image_table(
        images,
        title=f"{method.registry_name} on {datamodule.registry_name} {section.split} "
        f"({len(per_image)} images): bits/dim ({result['estimator']}) under each",
        row_labels=["most likely", "least likely"],
        captions=[[f"{per_image[i]:.3g}" for i in row] for row in (most, least)],
    )
    out.mkdir(parents=True, exist_ok=True)
    picture.save(out / "nll_extremes.png")
    payload = {
        "protocol": "nll",
        "checkpoint": str(cfg.ckpt),
        "method": method.registry_name,
        "data": datamodule.registry_name,
        "split": section.split,
        "n": len(per_image),
        "seed": cfg.seed,
        "k": section.k if method.registry_name == "vae" else None,
        "estimator": result["estimator"],
        "bits_per_dim": result["bits_per_dim"],
        "stderr": result["image_stderr"],  # over the images of the split
        "mc_stderr": result["mc_stderr"],  # of the Monte Carlo estimate, for these images (diffusion vlb)
        "per_image": per_image,  # image i of the split (its first n), in order
        "most_likely": [{"index": i, "bits_per_dim": per_image[i]} for i in most],
        "least_likely": [{"index": i, "bits_per_dim": per_image[i]} for i in least],
        "grid": {
            "file": "nll_extremes.png",
            "rows": ["most_likely", "least_likely"],
            "layout": layout.to_dict(),
        },
        "seconds": round(time.time() - started, 2),
        "config": asdict(section),
    }
    (out / "nll.json").write_text(json.dumps(payload, indent=2) + "\n")
    likelihood.report(cfg, "nll", datamodule, run_dir, result, section.split)
    print(f"written: {out / 'nll.json'}, {out / 'nll_extremes.png'}\n")
    return payload
