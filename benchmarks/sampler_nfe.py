"""FID against the number of network evaluations (NFE) for every sampler of diffusion checkpoints.

    python benchmarks/sampler_nfe.py runs/ddpm_cfg_fashion_mnist/final/checkpoints/last.ckpt \
        runs/flow_fashion_mnist/final/checkpoints/last.ckpt --n 2000 --out sampler_nfe.json

For each checkpoint, sampler (``--samplers``, default ddpm ddim euler heun dpm++2m) and number of solver
steps (``--steps``): ``--n`` samples, drawn in chunks of ``--batch`` with chunk c seeded by c; FID and
KID (torchmetrics) of their features against the test split of the checkpoint's dataset, with the
project's domain extractor of that dataset at the model's resolution (``lgen fid-extractor``; another
file with ``--extractor``); the NFE of one sampling call (Heun: 2 steps - 1; a guided evaluation of the
conditional and unconditional halves as one batch counts once); and milliseconds per image. A
class-conditional model samples the classes in turn with its own guidance weight (``--guidance`` to
override). Combinations a sampler cannot run (an eps-model of a process that is pure noise at t = 1
under ddpm/ddim/euler, more steps than DDPM's T on its own steps) are listed as refused, with the reason.
Prints a markdown table per checkpoint, and the real-vs-real floor (``--n`` training images vs the test
split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist_generators import draw, features, fid_kid, real_images  # noqa: E402

from lightning_gen import registry  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.diffusion import samplers  # noqa: E402
from lightning_gen.eval.fid_extractor import default_path, load_extractor  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402


def nfe_points(method, extractor, test, n, batch, sampler_names, step_counts, **options) -> list[dict]:
    """FID, KID, NFE and ms/image of ``n`` samples per sampler and number of steps (or why it is refused)."""
    rows = []
    for sampler in sampler_names:
        for steps in step_counts:
            try:
                samplers.check(sampler, steps, method.process, method.cfg.prediction)
            except samplers.SamplerError as refused:
                rows.append({"sampler": sampler, "steps": steps, "refused": str(refused)})
                continue
            images, _, seconds = draw(method, n, batch, sampler=sampler, steps=steps, **options)
            row = {"sampler": sampler, "steps": steps, "nfe": method.last_sample["nfe"]}
            row.update(fid_kid(test, features(extractor, images)), ms_per_image=1000 * seconds)
            rows.append(row)
            print(f"[sampler_nfe] {json.dumps(row)}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n", type=int, default=2000, help="samples per point")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--samplers", nargs="+", default=list(samplers.SAMPLERS), choices=samplers.SAMPLERS)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 18, 35, 50, 100])
    parser.add_argument(
        "--guidance", type=float, help="CFG weight of conditional models (default: their own)"
    )
    parser.add_argument(
        "--extractor", help="feature extractor file (default: the dataset's domain extractor)"
    )
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    first = load_method(args.checkpoints[0])
    info = first.data_info
    datamodule = registry.build(
        "data", section_object(compose([f"data={info.name}", f"data.image_size={info.image_size}"]).data)
    )
    datamodule.setup()
    extractor, _ = load_extractor(args.extractor or default_path(info.name, info.image_size))
    test = features(extractor, real_images(datamodule, "test")[0])
    train = features(extractor, real_images(datamodule, "train")[0])
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.n]
    floor = fid_kid(test, train[pick])
    print(f"[sampler_nfe] floor: {args.n} train images vs the test split: {json.dumps(floor)}", flush=True)
    results = {"floor": floor, "models": {}}

    for path in args.checkpoints:
        method = load_method(path)
        if method.data_info.name != info.name or method.data_info.image_size != info.image_size:
            raise SystemExit(
                f"{path}: all checkpoints must share one dataset and resolution ({info.name}, {info.image_size})"
            )
        if not hasattr(method, "last_sample"):
            raise SystemExit(f"{path}: a {method.registry_name} checkpoint, not a diffusion model")
        where = Path(path).resolve()  # runs/<experiment>/<run>/checkpoints/<name>.ckpt, or any file
        experiment = where.parents[2].name if where.parent.name == "checkpoints" else where.stem
        options = {} if args.guidance is None or not method.conditional else {"guidance": args.guidance}
        print(f"[sampler_nfe] {experiment}", flush=True)
        rows = nfe_points(method, extractor, test, args.n, args.batch, args.samplers, args.steps, **options)
        results["models"][experiment] = rows
        print(f"\n{experiment}: {args.n} samples vs the {len(test)} test images\n")
        print("| sampler | steps | NFE | FID | KID x 1000 | ms / image |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            if "refused" in row:
                print(f"| {row['sampler']} | {row['steps']} | - | refused: {row['refused']} | | |")
            else:
                kid = f"{1000 * row['kid']:.2f} ± {1000 * row['kid_std']:.2f}"
                print(
                    f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {row['fid']:.2f} | {kid} "
                    f"| {row['ms_per_image']:.1f} |"
                )
        print(f"\nfloor ({args.n} training images): FID {floor['fid']:.2f}\n")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
