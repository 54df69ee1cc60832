"""Every Fashion-MNIST generator in one table, beside real images: FID, KID, IS, precision, recall,
density, coverage, memorisation (the domain extractor's features), per-class FID and CAS for
class-conditional models, and test bits/dim where the model has a likelihood; nearest-neighbour grids
of the best and the worst model by FID.

    python benchmarks/fashion_mnist_gen_metrics.py \
        runs/{vae,gan,ddpm_cfg,flow,pixelcnn}_fashion_mnist/final/checkpoints/last.ckpt \
        --n 2000 --bpd-n 2000 --grids docs/images --out benchmarks/results/fashion_mnist_gen_metrics.json

Every number comes from a command this script runs (in this process) and prints:

- a generator's row: ``lgen eval gen ckpt=<checkpoint> n=<n> seed=<seed> out=<work>/<experiment>``: n
  samples (a class-conditional model asked for the classes in turn, with its own guidance weight)
  against the checkpoint's training split at its resolution (55,000 images), the test split giving
  memorisation's threshold; ``lgen eval bpd ckpt=<checkpoint> n=<bpd-n>`` for PixelCNN, the VAE and
  diffusion models (the first ``--bpd-n`` test images; 0: all 10,000);
- the real rows: ``lgen eval gen fake=<npz> real=fashion_mnist:train``, the npz holding n test images
  (what a model that samples the data distribution would score: memorisation about 0.05 by the
  choice of its threshold) or n training images (a model that copies its training set: memorisation
  1), with their labels, so that per-class FID and CAS read as the classifier sees real images;
- grids (``--grids DIR``): ``lgen sample ckpt=<best or worst> n=8 nearest=8`` writes the samples beside
  their nearest training images in pixel and feature space, as ``DIR/<experiment>_samples_nearest.png``
  (with the samples alone in ``DIR/<experiment>_samples.png``); the grids' features are ``lgen sample``'s
  extractor (``auto``, ``domain`` or ``inception``, from its usual places).

``--extractor`` / ``--domain-extractor-path`` choose the features (default: the Fashion-MNIST domain
extractor at the checkpoints' resolution, built on first use). The checkpoints must share one dataset
and resolution; any dataset works (the tiny test of this script runs on digits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gen import registry  # noqa: E402
from lightning_gen.cli import main as lgen  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402

COLUMNS = [  # (header, result key stem, format)
    ("FID", "fid", "{:.2f}"),
    ("KID x 1000", "kid", None),
    ("IS", "is", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("density", "density", "{:.3f}"),
    ("coverage", "coverage", "{:.3f}"),
    ("memorisation", "memorization", "{:.3f}"),
    ("class FID", "class_fid", "{:.2f}"),
    ("CAS", "cas", "{:.3f}"),
]


def run(*args: str) -> None:
    """One `lgen` command, printed as a user would type it; stops the script if it fails."""
    print("$ lgen " + " ".join(args), flush=True)
    code = lgen(list(args))
    if code:
        raise SystemExit(f"lgen {' '.join(args)} exited {code}")


def real_images_npz(datamodule, split: str, n: int, seed: int, path: Path) -> Path:
    """n images of ``split`` (a seeded draw) with their labels, as an ADM-style .npz (N, H, W, C)."""
    dataset = datamodule.eval_dataloader(split).dataset
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [dataset[i] for i in pick]
    images = torch.stack([item["image"] for item in items]).permute(0, 2, 3, 1).numpy()
    labels = np.array([int(item["label"]) for item in items])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images, arr_1=labels)
    return path


def cell(results: dict, stem: str, name: str, fmt: str | None) -> str:
    key = f"{stem}_{name}"
    if key not in results:
        return "-"
    if stem == "kid":
        return f"{1000 * results[key]:.2f} ± {1000 * results[key + '_std']:.2f}"
    if stem == "is":
        return f"{results[key]:.2f} ± {results[key + '_std']:.2f}"
    return fmt.format(results[key])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n", type=int, default=10000, help="generated (and real-row) images per row")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed and the real rows' draw")
    parser.add_argument("--bpd-n", type=int, default=0, help="test images scored for bits/dim (0: all)")
    parser.add_argument("--extractor", default="auto")
    parser.add_argument("--domain-extractor-path", default=None)
    parser.add_argument(
        "--work", default="runs/fashion_mnist_gen_metrics", help="folder of the commands' outputs"
    )
    parser.add_argument("--grids", help="folder for the nearest-neighbour grids of the best and worst model")
    parser.add_argument("--out", help="write every row (results and provenance) to this JSON file")
    args = parser.parse_args()
    work = Path(args.work)
    features = [f"extractor={args.extractor}"]
    if args.domain_extractor_path:
        features.append(f"domain_extractor_path={args.domain_extractor_path}")

    info = load_method(args.checkpoints[0]).data_info
    rows: dict[str, dict] = {}
    for path in args.checkpoints:
        method = load_method(path)
        if (method.data_info.name, method.data_info.image_size) != (info.name, info.image_size):
            raise SystemExit(
                f"{path}: {method.data_info.name} at {method.data_info.image_size} px, not {info.name} at {info.image_size}"
            )
        experiment = Path(path).resolve().parents[2].name
        out = work / experiment
        run("eval", "gen", f"ckpt={path}", f"n={args.n}", f"seed={args.seed}", f"out={out}", *features)
        rows[experiment] = json.loads((out / "gen.json").read_text())
        if hasattr(method, "bits_per_dim") or method.registry_name in ("pixelcnn", "vae"):
            try:
                from lightning_gen.eval.likelihood import check_likelihood

                check_likelihood(method)
            except ValueError as error:  # e.g. a VAE with a Bernoulli decoder
                print(f"[bpd] {experiment}: {error}")
            else:
                run("eval", "bpd", f"ckpt={path}", "split=test", f"n={args.bpd_n}", f"out={out}")
                rows[experiment]["bits_per_dim"] = json.loads((out / "bpd.json").read_text())["results"][
                    "bits_per_dim"
                ]

    datamodule = registry.build(
        "data", section_object(compose([f"data={info.name}", f"data.image_size={info.image_size}"]).data)
    )
    datamodule.setup()
    real_rows = {"real: test images": "test", "real: training images (copies)": "train"}
    for label, split in real_rows.items():
        out = work / f"real_{split}"
        npz = real_images_npz(datamodule, split, args.n, args.seed, out / "images.npz")
        run(
            "eval",
            "gen",
            f"fake={npz}",
            f"real={info.name}:train",
            f"data.image_size={info.image_size}",
            f"out={out}",
            *features,
        )
        rows[label] = json.loads((out / "gen.json").read_text())

    name = rows[next(iter(rows))]["provenance"]["name"]
    provenance = rows[next(iter(rows))]["provenance"]
    print(
        f"\n{args.n} images per row against the {provenance['num_real']} images of {provenance['reference']}, "
        f"{name} features ({provenance['arch']}, SHA-256 {provenance['weights_sha256'][:12]}..., resize "
        f"{provenance['resize']}); memorisation's threshold from {provenance['held_out']}\n"
    )
    print("| model | " + " | ".join(h for h, _, _ in COLUMNS) + " | test bits/dim |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for label, row in rows.items():
        cells = [cell(row["results"], stem, name, fmt) for _, stem, fmt in COLUMNS]
        bpd = f"{row['bits_per_dim']:.3f}" if "bits_per_dim" in row else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {bpd} |")

    models = [label for label in rows if not label.startswith("real:")]
    if args.grids and models:
        from importlib.util import find_spec

        ranked = sorted(models, key=lambda m: rows[m]["results"][f"fid_{name}"])
        if find_spec("lightning_gen.eval.nearest") is None:
            print(
                "\n[grids] lgen sample nearest= is not in this version of lightning_gen: no nearest-neighbour grids"
            )
        else:
            Path(args.grids).mkdir(parents=True, exist_ok=True)
            for experiment in dict.fromkeys([ranked[0], ranked[-1]]):
                ckpt = next(p for p in args.checkpoints if Path(p).resolve().parents[2].name == experiment)
                grid = Path(args.grids) / f"{experiment}_samples.png"  # and <...>_samples_nearest.png
                run(
                    "sample",
                    f"ckpt={ckpt}",
                    "n=8",
                    "nearest=8",
                    f"extractor={args.extractor}",
                    f"seed={args.seed}",
                    f"out={grid}",
                )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
