"""Fashion-MNIST at 28 px: pixel-space U-Net vs latent U-Net vs latent DiT at equal CPU time.

    python benchmarks/ldm_fashion_mnist.py --commit          # about 2 h 30 min of one CPU core
    python benchmarks/ldm_fashion_mnist.py --only ldm_dit_fashion_mnist --budget-min 30

1. Stage 1, the autoencoder (experiment latent_autoencoder_fashion_mnist), trained as the latent
   experiments' stage1 section trains it (runs/latent_autoencoder_fashion_mnist/stage1-seed0/, which they
   then reuse): its CPU time, and `lgen eval recon`'s MSE, PSNR and FID of the reconstructions of the
   10,000 test images.
2. Each diffusion model (diffusion_fashion_mnist_28, ldm_unet_fashion_mnist, ldm_dit_fashion_mnist; one
   process, OMP_NUM_THREADS=1) trains for the same CPU budget, ``--budget-min`` minutes of one core: the CPU
   seconds of one step are measured first (a run of 40 steps minus one of 10), and trainer.max_steps is set so
   that the steps take 90 % of the budget (validation and checkpoints take the rest); the LR schedule is
   planned for those steps, so it ends where training stops. The stage-1 time is reported on its own row.
3. Each model: FID and KID of ``--n`` samples (the experiment's own sampler and guidance) against the 10,000
   test images with the Fashion-MNIST extractor at 28 px (``lgen fid-extractor data=fashion_mnist
   data.image_size=28``), next to the real-vs-real floor (``--n`` training images); the fraction of samples
   the extractor classifies as the requested class; test bits/dim where it is defined (pixel space: the
   variational bound); ms per sample; parameters; CPU minutes; a grid of one row per class for each guidance
   weight of ``--guidance`` (docs/images/fashion_mnist_<experiment>_w<w>.png).
4. The sampler table: FID against NFE per sampler (benchmarks/sampler_nfe.py, ``--nfe-n`` samples per point).

Each finished row goes at once to benchmarks/results/ldm_fashion_mnist.json and to the tables of
docs/results-fashion-mnist.md (between their markers), and with ``--commit`` into a commit, so an interrupted
run keeps what it finished; a rerun skips the rows it has. ``--tiny`` shrinks every network, dataset and
count to check the script in seconds (tests/test_latent_diffusion.py), writing under ``--results`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fashion_mnist_generators import (  # noqa: E402
    CLASSES,
    draw,
    features,
    fid_kid,
    real_images,
    save_grid,
    test_bits_per_dim,
)
from result_rows import ResultRows  # noqa: E402
from sampler_nfe import nfe_points  # noqa: E402

from lightning_gen import registry  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.diffusion.samplers import SAMPLERS  # noqa: E402
from lightning_gen.eval.fid_extractor import default_path, ensure_extractor, load_extractor  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402
from lightning_gen.run import train  # noqa: E402
from lightning_gen.stages import plan  # noqa: E402

AUTOENCODER = "latent_autoencoder_fashion_mnist"
MODELS = ("diffusion_fashion_mnist_28", "ldm_unet_fashion_mnist", "ldm_dit_fashion_mnist")
QUIET = ["logger.wandb.enabled=false", "trainer.enable_progress_bar=false"]
# --tiny: every network, dataset and count shrunk (the script's plumbing in seconds, numbers meaningless)
TINY_AE = [
    "method.channels=[8,16,16]",
    "method.norm_groups=4",
    "method.latent_channels=2",
    "method.disc_width=8",
    "method.scale_images=32",
    "data.max_train_samples=64",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
]
TINY = {
    "diffusion_fashion_mnist_28": ["method.width=8", "method.mults=[1,2]", "method.attention_resolutions=[]"],
    "ldm_unet_fashion_mnist": ["method.width=8", "method.attention_resolutions=[]"],
    "ldm_dit_fashion_mnist": ["method.dit.width=16", "method.dit.depth=1", "method.dit.heads=2"],
}
TINY_RUN = [
    "data.max_train_samples=64",
    "data.batch_size=16",
    "trainer.limit_val_batches=1",
    "method.sample_steps=2",
]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (stage 1 trains in a child), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def trained(overrides: list[str]) -> tuple[Path, float]:
    """Train the composed run (as `lgen train` would, in this process): its last checkpoint and CPU seconds."""
    started = cpu_seconds()
    run = train(compose([*overrides, *QUIET]))
    if run.exit_code:
        raise SystemExit(f"training {overrides[0]} stopped (exit code {run.exit_code})")
    return run.run_dir / "checkpoints" / "last.ckpt", cpu_seconds() - started


def steps_for_budget(experiment: str, extra: list[str], budget_s: float) -> tuple[int, float]:
    """Training steps that fit 90 % of ``budget_s`` CPU seconds, from the cost of 30 steps (40 minus 10)."""
    costs = []
    for steps in (10, 40):
        _, seconds = trained(
            [
                f"experiment={experiment}",
                *extra,
                f"trainer.max_steps={steps}",
                "trainer.max_epochs=-1",
                "trainer.limit_val_batches=0",
                "callbacks.images.enabled=false",
                f"run_id=calibrate{steps}",
                "resume=never",  # a rerun measures again, never continues a finished calibration
            ]
        )
        costs.append(seconds)
    per_step = max((costs[1] - costs[0]) / 30, 1e-3)
    return max(1, int(0.9 * budget_s / per_step)), per_step


def model_table(rows: dict) -> str:
    floor = rows.get("floor")
    lines = [
        "| model | network | steps | CPU min | FID | KID x 1000 | requested class | test bits/dim | ms / sample |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        if name not in rows:
            continue
        r = rows[name]
        bpd = f"{r['test_bits_per_dim']:.3f}" if r.get("test_bits_per_dim") is not None else "-"
        lines.append(
            f"| `{name}` | {r['network']}, {r['parameters'] / 1e6:.1f} M | {r['steps']} | {r['cpu_minutes']:.1f} "
            f"| {r['fid']:.2f} | {1000 * r['kid']:.2f} ± {1000 * r['kid_std']:.2f} | {r['requested_class']:.3f} "
            f"| {bpd} | {r['ms_per_image']:.1f} |"
        )
    if floor:
        lines.append(
            f"| real-vs-real floor ({floor['n']} training images) | | | | {floor['fid']:.2f} "
            f"| {1000 * floor['kid']:.2f} ± {1000 * floor['kid_std']:.2f} | | | |"
        )
    ae = rows.get(AUTOENCODER)
    if ae:
        lines += [
            "",
            f"Stage 1 (`{AUTOENCODER}`, shared by both latent models): {ae['cpu_minutes']:.1f} CPU min; "
            f"test reconstructions: PSNR {ae['psnr']:.2f} dB, MSE {ae['mse']:.5f}, FID {ae['fid']:.2f}.",
        ]
    return "\n".join(lines)


def grid_table(rows: dict) -> str:
    """One line per model: its grids at each guidance weight (files under docs/images)."""
    models = [name for name in MODELS if rows.get(name, {}).get("grids")]
    if not models:
        return "Not measured yet."
    weights = [g["w"] for g in rows[models[0]]["grids"]]
    lines = ["| model | " + " | ".join(f"w = {w:g}" for w in weights) + " |", "|---|" + "---|" * len(weights)]
    for name in models:
        cells = [f"![{name}, w = {g['w']:g}](images/{g['file']})" for g in rows[name]["grids"]]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sampler_table(rows: dict) -> str:
    if not any(f"samplers {name}" in rows for name in MODELS):
        return "Not measured yet."
    lines = ["| model | sampler | steps | NFE | FID |", "|---|---|---:|---:|---:|"]
    for name in MODELS:
        for r in rows.get(f"samplers {name}", {}).get("points", []):
            fid = f"refused: {r['refused']}" if "refused" in r else f"{r['fid']:.2f}"
            lines.append(f"| `{name}` | {r['sampler']} | {r['steps']} | {r.get('nfe', '-')} | {fid} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes of training per model")
    parser.add_argument("--n", type=int, default=5000, help="samples per FID")
    parser.add_argument("--nfe-n", type=int, default=2000, help="samples per point of the sampler table")
    parser.add_argument("--nfe-steps", type=int, nargs="+", default=[5, 10, 18, 35])
    parser.add_argument("--guidance", type=float, nargs="*", default=[0.0, 1.0, 3.0], help="grid sweep")
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--page", default=str(ROOT / "docs" / "results-fashion-mnist.md"))
    parser.add_argument("--grids", default=str(ROOT / "docs" / "images"))
    parser.add_argument(
        "--extractor", help="feature extractor file (default: the cached 28 px one, built once)"
    )
    parser.add_argument("--commit", action="store_true", help="git commit each row as it finishes")
    parser.add_argument("--tiny", action="store_true", help="shrink everything: check the script runs")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # stage 1 trains in a child `python -m lightning_gen`: it imports this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    torch.set_num_threads(1)
    results = Path(args.results)
    page = None if args.tiny else Path(args.page)
    grids = results / "grids" if args.tiny else Path(args.grids)
    tables = {
        "ldm_fashion_mnist_models": model_table,
        "ldm_fashion_mnist_grids": grid_table,
        "ldm_fashion_mnist_samplers": sampler_table,
    }
    rows = ResultRows(results / "ldm_fashion_mnist.json", tables, page, commit=args.commit)
    runs = ["runs_dir=" + str(results / "runs")] if args.tiny else []

    extractor_path = Path(args.extractor) if args.extractor else default_path("fashion_mnist", 28)
    if not args.extractor:
        ensure_extractor("fashion_mnist", 28, extractor_path)
    extractor, _ = load_extractor(extractor_path)
    data_args = [
        "data=fashion_mnist",
        "data.image_size=28",
        *(["data.max_train_samples=256"] if args.tiny else []),
    ]
    datamodule = registry.build("data", section_object(compose(data_args).data))
    datamodule.setup()
    test_x, test_y = real_images(datamodule, "test")
    test = features(extractor, test_x)
    if "floor" not in rows:
        train_x, _ = real_images(datamodule, "train")
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.n]
        rows.add("floor", {"n": len(pick), **fid_kid(test, features(extractor, train_x[pick]))})

    stage1_args = [f"stage1.{a}" for a in TINY_AE] if args.tiny else []
    if AUTOENCODER not in rows:
        # stage 1 as the latent experiments train it (their stage1 section), so that they reuse it
        stage1 = plan(compose([f"experiment={MODELS[1]}", *runs, *stage1_args, *QUIET]))
        started = cpu_seconds()
        if not stage1.finished:
            stage1.run()
        seconds, ckpt = cpu_seconds() - started, stage1.checkpoint
        from lightning_gen.cli import main as lgen

        out = results / "recon"
        max_images = ["max_images=64"] if args.tiny else []
        command = ["eval", "recon", f"ckpt={ckpt}", f"domain_extractor_path={extractor_path}", f"out={out}"]
        if lgen([*command, *max_images]) != 0:
            raise SystemExit("lgen eval recon failed")
        recon = json.loads((out / "recon.json").read_text())["results"]
        rows.add(AUTOENCODER, {"cpu_minutes": seconds / 60, **{k: recon[k] for k in ("psnr", "mse", "fid")}})

    for name in args.only:
        latent = name != MODELS[0]
        extra = [*runs, *(stage1_args if latent else []), *(TINY[name] + TINY_RUN if args.tiny else [])]
        if name not in rows:
            if args.tiny:
                steps, per_step = 2, 0.0
            else:
                steps, per_step = steps_for_budget(name, extra, 60 * args.budget_min)
            ckpt, seconds = trained(
                [
                    f"experiment={name}",
                    *extra,
                    f"trainer.max_steps={steps}",
                    "trainer.max_epochs=-1",
                    "run_id=bench",
                ]
            )
            method = load_method(str(ckpt))
            images, labels, seconds_per_image = draw(method, args.n, 250)
            predicted = torch.cat([extractor.classify(x) for x in images.split(500)]).argmax(1)
            row = {
                "network": method.cfg.net,
                "parameters": sum(p.numel() for p in method.net.parameters()),
                "steps": steps,
                "cpu_seconds_per_step": per_step,
                "cpu_minutes": seconds / 60,
                **fid_kid(test, features(extractor, images)),
                "requested_class": float((predicted == labels).float().mean()),
                "test_bits_per_dim": test_bits_per_dim(method, datamodule, 16 if args.tiny else 0),
                "ms_per_image": 1000 * seconds_per_image,
                "checkpoint": str(ckpt),
                "guidance": method.cfg.guidance,
                "sampler": f"{method.last_sample['sampler']} {method.last_sample['steps']} steps, NFE {method.last_sample['nfe']}",
            }
            files = []
            for w in args.guidance:  # one row of samples per class
                classes = torch.arange(len(CLASSES)).repeat_interleave(10)
                grid = method.sample(
                    len(classes), cond=classes, generator=torch.Generator().manual_seed(0), guidance=w
                )
                files.append(grids / f"fashion_mnist_{name}_w{w:g}.png")
                save_grid(grid, files[-1], nrow=10)
            row["grids"] = [{"w": w, "file": f.name} for w, f in zip(args.guidance, files)]
            rows.add(name, row, tuple(files))
        if f"samplers {name}" not in rows:
            method = load_method(rows.rows[name]["checkpoint"])
            points = nfe_points(method, extractor, test, args.nfe_n, 250, SAMPLERS, args.nfe_steps)
            rows.add(f"samplers {name}", {"n": args.nfe_n, "points": points})
    print(model_table(rows.rows) + "\n\n" + sampler_table(rows.rows))
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"[ldm_fashion_mnist] {time.time() - started:.0f} s")
    raise SystemExit(code)
