"""Fashion-MNIST at 28 px: an autoregressive Transformer over VQ tokens vs PixelCNN and gated PixelCNN on pixels.

    python benchmarks/token_ar_fashion_mnist.py --commit          # about 2 h of one CPU core
    python benchmarks/token_ar_fashion_mnist.py --only token_ar_fashion_mnist --budget-min 30

1. Stage 1, the tokenizer (experiment vq_fashion_mnist), trained as token_ar_fashion_mnist's stage1 section
   trains it (runs/vq_fashion_mnist/stage1-seed0/, which that experiment then reuses): its CPU time;
   `lgen eval recon`'s MSE, PSNR and FID of the reconstructions of the 10,000 test images; the codebook's
   usage (fraction of the codes used) and perplexity on the test split.
2. Each autoregressive model (token_ar_fashion_mnist; PixelCNN, pixelcnn_fashion_mnist at 28 px; gated
   PixelCNN, gated_pixelcnn_fashion_mnist; one process, OMP_NUM_THREADS=1) trains for the same CPU budget,
   ``--budget-min`` minutes of one core, as benchmarks/ldm_fashion_mnist.py plans it (the cost of a step
   measured first; max_steps set to use 90 % of the budget). The tokenizer's time is on its own row.
3. Each model: FID and KID of ``--n`` samples against the 10,000 test images (Fashion-MNIST extractor at
   28 px), next to the real-vs-real floor; the fraction of samples classified as the requested class
   (class-conditional token model, classes in turn, at each weight of ``--guidance``); bits/dim on the test
   split: PixelCNN's exact NLL, and for the token model the bound through the tokenizer (token NLL +
   the decoder's discretised NLL given the tokens, null class) with its two parts and the bits per token;
   ms per sample (the token model: 49 KV-cached Transformer steps and one decoder pass; PixelCNN: 784
   network passes); parameters; CPU minutes; grids.

Each finished row goes at once to benchmarks/results/token_ar_fashion_mnist.json and to the tables of
docs/results-fashion-mnist.md (between their markers), and with ``--commit`` into a commit; a rerun skips
the rows it has. ``--tiny`` shrinks every network, dataset and count to check the script in seconds
(tests/test_token_ar.py), writing under ``--results`` only.
"""

from __future__ import annotations

import argparse
import json
import os
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
from ldm_fashion_mnist import cpu_seconds, steps_for_budget, trained  # noqa: E402
from result_rows import ResultRows  # noqa: E402

from lightning_gen import registry  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.eval.fid_extractor import default_path, ensure_extractor, load_extractor  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402
from lightning_gen.nets.quantizers import code_counts, code_statistics  # noqa: E402
from lightning_gen.stages import plan  # noqa: E402

TOKENIZER = "vq_fashion_mnist"
MODELS = {  # row name -> the run's overrides
    "token_ar_fashion_mnist": ["experiment=token_ar_fashion_mnist", "run_id=bench"],
    "pixelcnn_fashion_mnist_28": [
        "experiment=pixelcnn_fashion_mnist",
        "data.image_size=28",
        "run_id=bench28",
    ],
    "gated_pixelcnn_fashion_mnist": ["experiment=gated_pixelcnn_fashion_mnist", "run_id=bench"],
}
# --tiny: every network, dataset and count shrunk (the script's plumbing in seconds, numbers meaningless)
TINY_TOKENIZER = [
    "method.channels=[8,8,8]",
    "method.norm_groups=4",
    "method.latent_channels=8",
    "method.code_dim=4",
    "method.codebook_size=16",
    "method.attention=false",
    "method.disc_width=8",
    "method.scale_images=32",
    "data.max_train_samples=64",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
]
TINY = {
    "token_ar_fashion_mnist": ["method.width=16", "method.depth=1", "method.heads=2"],
    "pixelcnn_fashion_mnist_28": ["method.width=4", "method.blocks=1"],
    "gated_pixelcnn_fashion_mnist": ["method.width=4", "method.blocks=1"],
}
TINY_RUN = ["data.max_train_samples=64", "data.batch_size=16", "trainer.limit_val_batches=1"]


def sample_rows(rows: dict, name: str) -> list[tuple[str, dict]]:
    """The FID rows of a model: one per guidance weight (a conditional model), or the model's own row."""
    weighted = sorted((k for k in rows if k.startswith(f"{name}, w=")), key=lambda k: float(k.split("=")[-1]))
    return [(k, rows[k]) for k in weighted] or [(name, rows[name])]


def model_table(rows: dict) -> str:
    lines = [
        "| model | parameters | steps | CPU min | FID | KID x 1000 | requested class | test bits/dim "
        "| tokens: bits/dim | decoder: bits/dim | bits / token | ms / sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict, field: str, digits: int = 3) -> str:
        value = row.get(field)
        return "-" if value is None else f"{value:.{digits}f}"

    for name in MODELS:
        if name not in rows:
            continue
        m = rows[name]
        bound = " (bound)" if m.get("token_bits_per_dim") is not None else ""
        for key, r in sample_rows(rows, name):
            lines.append(
                f"| `{key}` | {m['parameters'] / 1e6:.2f} M | {m['steps']} | {m['cpu_minutes']:.1f} "
                f"| {r['fid']:.2f} | {1000 * r['kid']:.2f} ± {1000 * r['kid_std']:.2f} "
                f"| {cell(r, 'requested_class')} | {cell(m, 'test_bits_per_dim')}{bound} "
                f"| {cell(m, 'token_bits_per_dim')} | {cell(m, 'decoder_bits_per_dim')} | {cell(m, 'bits_per_token')} "
                f"| {r['ms_per_image']:.1f} |"
            )
    floor = rows.get("floor")
    if floor:
        lines.append(
            f"| real-vs-real floor ({floor['n']} training images) | | | | {floor['fid']:.2f} "
            f"| {1000 * floor['kid']:.2f} ± {1000 * floor['kid_std']:.2f} | | | | | | |"
        )
    t = rows.get(TOKENIZER)
    if t:
        lines += [
            "",
            f"Stage 1 (`{TOKENIZER}`): {t['cpu_minutes']:.1f} CPU min; test reconstructions through the codes: "
            f"PSNR {t['psnr']:.2f} dB, MSE {t['mse']:.5f}, FID {t['fid']:.2f}; codebook usage on the test split "
            f"{100 * t['usage']:.1f} % of {t['codebook_size']} codes, perplexity {t['perplexity']:.1f}.",
        ]
    return "\n".join(lines)


def grid_table(rows: dict) -> str:
    cells = [f"![{name}](images/{rows[name]['grid']})" for name in MODELS if rows.get(name, {}).get("grid")]
    if not cells:
        return "Not measured yet."
    names = [f"`{name}`" for name in MODELS if rows.get(name, {}).get("grid")]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n| " + " | ".join(cells) + " |"


@torch.no_grad()
def tokenizer_row(ckpt: Path, test_images: torch.Tensor, extractor_path: Path, out: Path, tiny: bool) -> dict:
    """`lgen eval recon` on the test split, and the codebook's usage and perplexity on it."""
    from lightning_gen.cli import main as lgen

    command = ["eval", "recon", f"ckpt={ckpt}", f"domain_extractor_path={extractor_path}", f"out={out}"]
    if lgen([*command, *(["max_images=64"] if tiny else [])]) != 0:
        raise SystemExit("lgen eval recon failed")
    recon = json.loads((out / "recon.json").read_text())["results"]
    tokenizer = load_method(str(ckpt))
    indices = torch.cat([tokenizer.encode(x) for x in test_images.split(500)])
    perplexity, usage = code_statistics(code_counts(indices, tokenizer.codebook_size))
    return {
        **{k: recon[k] for k in ("psnr", "mse", "fid")},
        "usage": float(usage),
        "perplexity": float(perplexity),
        "codebook_size": tokenizer.codebook_size,
    }


@torch.no_grad()
def token_bound(method, datamodule, n: int) -> dict:
    """Mean bits/dim bound on the test split (first ``n`` images; 0: all), its parts and bits per token."""
    images = datamodule.datasets["test"].images
    images = images[:n] if n else images
    parts = [method.bits_per_dim_bound(x) for x in images.split(500)]
    return {k: float(torch.cat([p[k] for p in parts]).mean()) for k in parts[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes of training per model")
    parser.add_argument("--n", type=int, default=5000, help="samples per FID")
    parser.add_argument("--guidance", type=float, nargs="*", default=[0.0, 1.0, 3.0], help="token model's w")
    parser.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS))
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
    tables = {"token_ar_fashion_mnist_models": model_table, "token_ar_fashion_mnist_grids": grid_table}
    rows = ResultRows(results / "token_ar_fashion_mnist.json", tables, page, commit=args.commit)
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
    test_x, _ = real_images(datamodule, "test")
    test = features(extractor, test_x)
    if "floor" not in rows:
        train_x, _ = real_images(datamodule, "train")
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.n]
        rows.add("floor", {"n": len(pick), **fid_kid(test, features(extractor, train_x[pick]))})

    stage1_args = [f"stage1.{a}" for a in TINY_TOKENIZER] if args.tiny else []
    if TOKENIZER not in rows:
        # stage 1 as token_ar_fashion_mnist's stage1 section trains it, so that the experiment reuses it
        stage1 = plan(compose([*MODELS["token_ar_fashion_mnist"], *runs, *stage1_args]))
        started = cpu_seconds()
        if not stage1.finished:
            stage1.run()
        seconds = cpu_seconds() - started
        row = tokenizer_row(
            stage1.checkpoint,
            datamodule.datasets["test"].images,
            extractor_path,
            results / "recon",
            args.tiny,
        )
        rows.add(TOKENIZER, {"cpu_minutes": seconds / 60, **row})

    bpd_images = 16 if args.tiny else 0
    for name in args.only:
        if name in rows:
            continue
        token_model = name == "token_ar_fashion_mnist"
        extra = [*runs, *(stage1_args if token_model else []), *(TINY[name] + TINY_RUN if args.tiny else [])]
        overrides = [*MODELS[name], *extra]
        if args.tiny:
            steps, per_step = 2, 0.0
        else:
            steps, per_step = steps_for_budget(
                overrides[0].split("=", 1)[1], overrides[1:], 60 * args.budget_min
            )
        ckpt, seconds = trained([*overrides, f"trainer.max_steps={steps}", "trainer.max_epochs=-1"])
        method = load_method(str(ckpt))
        model = {
            "parameters": sum(p.numel() for p in method.net.parameters()),
            "steps": steps,
            "cpu_seconds_per_step": per_step,
            "cpu_minutes": seconds / 60,
            "checkpoint": str(ckpt),
        }
        if token_model:
            bound = token_bound(method, datamodule, bpd_images)
            model.update({("test_" + k if k == "bits_per_dim" else k): v for k, v in bound.items()})
        else:
            model["test_bits_per_dim"] = test_bits_per_dim(method, datamodule, bpd_images)
        files: list[Path] = []
        if getattr(method, "conditional", False):  # one FID row per guidance weight, a grid of class rows
            for w in args.guidance:
                images, labels, seconds_per_image = draw(method, args.n, 250, guidance=w)
                predicted = torch.cat([extractor.classify(x) for x in images.split(500)]).argmax(1)
                row = {**fid_kid(test, features(extractor, images)), "ms_per_image": 1000 * seconds_per_image}
                rows.add(
                    f"{name}, w={w:g}",
                    {**row, "requested_class": float((predicted == labels).float().mean())},
                )
            classes = torch.arange(len(CLASSES)).repeat_interleave(10)
            w = args.guidance[-1] if args.guidance else 0.0
            grid = method.sample(
                len(classes), cond=classes, generator=torch.Generator().manual_seed(0), guidance=w
            )
            files.append(grids / f"fashion_mnist_{name}_w{w:g}.png")
            save_grid(grid, files[-1], nrow=10)
        else:
            images, _, seconds_per_image = draw(method, args.n, 250)
            model.update(fid_kid(test, features(extractor, images)), ms_per_image=1000 * seconds_per_image)
            files.append(grids / f"fashion_mnist_{name}.png")
            save_grid(images[:100], files[-1], nrow=10)
        rows.add(name, {**model, "grid": files[-1].name}, tuple(files))
    print(model_table(rows.rows))
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"[token_ar_fashion_mnist] {time.time() - started:.0f} s")
    raise SystemExit(code)
