"""The 3 x 3 grid of processes (vp, ve, flow) and predictions (eps, x, v) of generalised diffusion on digits.

    python benchmarks/diffusion_grid_digits.py --commit          # 9 runs of a few minutes on one CPU core
    python benchmarks/diffusion_grid_digits.py --cells vp:eps flow:v

Each cell trains ``experiment=diffusion_digits method.process=P method.prediction=Q`` (16 px, U-Net width 32,
20 epochs, one thread; run id grid-P-Q) and measures: FID and KID of ``--n`` samples (Heun, 18 steps, 35
network evaluations) against the 359 test images with the digits extractor at 16 px, next to the
real-vs-real floor (``--n`` training images against the same test images); test bits/dim, the variational
bound with 4 draws of t per image (``lgen eval bpd``); its CPU minutes; a grid of 64 samples
(docs/images/diffusion_grid_digits_<P>_<Q>.png).

Each finished cell goes at once to benchmarks/results/diffusion_grid_digits.json and to the two 3 x 3 tables
of docs/results-digits.md (between their markers), and with ``--commit`` into a commit; a rerun skips the
cells it has. ``--tiny`` shrinks everything to check the script, writing under ``--results`` only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fashion_mnist_generators import draw, features, fid_kid, real_images, save_grid, test_bits_per_dim  # noqa: E402
from ldm_fashion_mnist import trained  # noqa: E402
from result_rows import ResultRows  # noqa: E402

from lightning_gen import registry  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.eval.fid_extractor import default_path, ensure_extractor, load_extractor  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402

PROCESSES, PREDICTIONS = ("vp", "ve", "flow"), ("eps", "x", "v")
TINY = [
    "method.width=8",
    "method.mults=[1,2]",
    "method.attention_resolutions=[]",
    "method.sample_steps=2",
    "data.max_train_samples=64",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
]


def grid_table(value: str, digits: int) -> callable:
    def render(rows: dict) -> str:
        lines = ["| process \\ prediction | eps | x | v |", "|---|---:|---:|---:|"]
        for process in PROCESSES:
            cells = [rows.get(f"{process}:{q}", {}).get(value) for q in PREDICTIONS]
            lines.append(
                f"| {process} | " + " | ".join("-" if c is None else f"{c:.{digits}f}" for c in cells) + " |"
            )
        if value == "fid" and "floor" in rows:
            lines += [
                "",
                f"Real-vs-real floor ({rows['floor']['n']} training images vs the test split): "
                f"FID {rows['floor']['fid']:.2f}.",
            ]
        return "\n".join(lines)

    return render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cells = [f"{p}:{q}" for p in PROCESSES for q in PREDICTIONS]
    parser.add_argument("--cells", nargs="+", choices=cells, default=cells)
    parser.add_argument("--n", type=int, default=500, help="samples per FID")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--page", default=str(ROOT / "docs" / "results-digits.md"))
    parser.add_argument("--grids", default=str(ROOT / "docs" / "images"))
    parser.add_argument(
        "--extractor", help="feature extractor file (default: the cached 16 px one, built once)"
    )
    parser.add_argument("--commit", action="store_true", help="git commit each cell as it finishes")
    parser.add_argument("--tiny", action="store_true", help="shrink everything: check the script runs")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    results = Path(args.results)
    page = None if args.tiny else Path(args.page)
    grids = results / "grids" if args.tiny else Path(args.grids)
    tables = {
        "diffusion_grid_digits_fid": grid_table("fid", 2),
        "diffusion_grid_digits_bpd": grid_table("test_bits_per_dim", 3),
    }
    rows = ResultRows(results / "diffusion_grid_digits.json", tables, page, commit=args.commit)
    extra = [f"runs_dir={results / 'runs'}", *TINY] if args.tiny else []

    extractor_path = Path(args.extractor) if args.extractor else default_path("digits", 16)
    if not args.extractor:
        ensure_extractor("digits", 16, extractor_path)
    extractor, _ = load_extractor(extractor_path)
    datamodule = registry.build("data", section_object(compose(["data=digits", "data.image_size=16"]).data))
    datamodule.setup()
    test = features(extractor, real_images(datamodule, "test")[0])
    if "floor" not in rows:
        train_x, _ = real_images(datamodule, "train")
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.n]
        rows.add("floor", {"n": len(pick), **fid_kid(test, features(extractor, train_x[pick]))})

    for cell in args.cells:
        if cell in rows:
            continue
        process, prediction = cell.split(":")
        ckpt, seconds = trained(
            [
                "experiment=diffusion_digits",
                f"method.process={process}",
                f"method.prediction={prediction}",
                *extra,
                f"run_id=grid-{process}-{prediction}",
            ]
        )
        method = load_method(str(ckpt))
        images, _, seconds_per_image = draw(method, args.n, 250)
        grid = grids / f"diffusion_grid_digits_{process}_{prediction}.png"
        save_grid(images[:64], grid, nrow=8)
        row = {
            "cpu_minutes": seconds / 60,
            **fid_kid(test, features(extractor, images)),
            "test_bits_per_dim": test_bits_per_dim(method, datamodule, 16 if args.tiny else 0),
            "ms_per_image": 1000 * seconds_per_image,
            "sampler": f"{method.last_sample['sampler']} {method.last_sample['steps']} steps, NFE {method.last_sample['nfe']}",
        }
        rows.add(cell, row, (grid,))
    for render in tables.values():
        print(render(rows.rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
