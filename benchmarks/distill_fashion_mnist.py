"""Fashion-MNIST at 28 px: distilled students at 1, 2 and 4 steps vs their teacher at 1, 2, 4 and 50 steps.

    python benchmarks/distill_fashion_mnist.py --commit          # about 1 h 30 min of one CPU core

1. The teacher (experiment diffusion_fashion_mnist_28: a class-conditional rectified-flow U-Net with
   classifier-free guidance), trained as distill_fashion_mnist's stage1 section trains it
   (runs/diffusion_fashion_mnist_28/stage1-seed0/, which the students then reuse): its CPU time.
2. The students of distill_fashion_mnist (one process each, OMP_NUM_THREADS=1): progressive distillation
   (rounds 8 -> 4 -> 2 -> 1 steps) and, with method.algorithm=consistency, consistency distillation; both with
   the guidance weight as an input. Their CPU times.
3. FID and KID of ``--n`` samples against the 10,000 test images (the Fashion-MNIST extractor at 28 px), next
   to the real-vs-real floor; the fraction classified as the requested class (classes in turn); ms per
   sample; network evaluations (NFE). The teacher samples with DDIM (eta 0; on rectified flow the Euler
   step) at 1, 2, 4 and 50 steps, the students at 1, 2 and 4, all at the teacher's guidance weight
   (``--guidance``, default the experiment's). A grid of one row per class for each.

Each finished row goes at once to benchmarks/results/distill_fashion_mnist.json and to the tables of
docs/results-fashion-mnist.md (between their markers), and with ``--commit`` into a commit; a rerun skips
the rows it has. ``--tiny`` shrinks every network, dataset and count to check the script in seconds
(tests/test_distill.py), writing under ``--results`` only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fashion_mnist_generators import CLASSES, draw, features, fid_kid, real_images, save_grid  # noqa: E402
from ldm_fashion_mnist import cpu_seconds, trained  # noqa: E402
from result_rows import ResultRows  # noqa: E402

from lightning_gen import registry  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.eval.fid_extractor import default_path, ensure_extractor, load_extractor  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402
from lightning_gen.stages import plan  # noqa: E402

EXPERIMENT = "distill_fashion_mnist"
TEACHER = "teacher (diffusion_fashion_mnist_28)"
STUDENTS = {"progressive": ["method.algorithm=progressive"], "consistency": ["method.algorithm=consistency"]}
TEACHER_STEPS, STUDENT_STEPS = (1, 2, 4, 50), (1, 2, 4)
# --tiny: every network, dataset and count shrunk (the script's plumbing in seconds, numbers meaningless)
TINY_TEACHER = [
    "method.width=8",
    "method.mults=[1,2]",
    "method.attention_resolutions=[]",
    "data.max_train_samples=64",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=0",
]
TINY_RUN = [
    "data.max_train_samples=64",
    "data.batch_size=16",
    "trainer.limit_train_batches=3",
    "method.start_steps=4",
    "method.grid_points=6",
]


def steps_text(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def table(rows: dict) -> str:
    lines = [
        "| model | sampling | NFE | FID | KID x 1000 | requested class | ms / sample | CPU min |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, steps_list in ((TEACHER, TEACHER_STEPS), *((s, STUDENT_STEPS) for s in STUDENTS)):
        if model not in rows:
            continue
        for steps in steps_list:
            r = rows.get(f"{model}, {steps} steps")
            if r is None:
                continue
            lines.append(
                f"| {model} | {r['sampler']}, {steps_text(steps)} | {r['nfe']} | {r['fid']:.2f} "
                f"| {1000 * r['kid']:.2f} ± {1000 * r['kid_std']:.2f} | {r['requested_class']:.3f} "
                f"| {r['ms_per_image']:.1f} | {rows[model]['cpu_minutes']:.1f} |"
            )
    floor = rows.get("floor")
    if floor:
        lines.append(
            f"| real-vs-real floor ({floor['n']} training images) | | | {floor['fid']:.2f} "
            f"| {1000 * floor['kid']:.2f} ± {1000 * floor['kid_std']:.2f} | | | |"
        )
    return "\n".join(lines)


def grid_table(rows: dict) -> str:
    lines = []
    for model in (TEACHER, *STUDENTS):
        cells = [  # one column per teacher step count; a student's empty where it was not distilled for it
            f"![{model}, {steps_text(s)}](images/{rows[f'{model}, {s} steps']['grid']})"
            if f"{model}, {s} steps" in rows
            else ""
            for s in TEACHER_STEPS
        ]
        if any(cells):
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if not lines:
        return "Not measured yet."
    head = "| model | " + " | ".join(steps_text(s) for s in TEACHER_STEPS) + " |"
    return "\n".join([head, "|---|" + "---|" * len(TEACHER_STEPS), *lines])


def measure(rows, model: str, method, steps: int, options: dict, ctx) -> None:
    """FID row and class-row grid of ``method`` sampling with ``steps`` steps."""
    key = f"{model}, {steps} steps"
    if key in rows:
        return
    images, labels, seconds_per_image = draw(method, ctx["n"], 250, steps=steps, **options)
    sampler = method.last_sample["sampler"]
    predicted = torch.cat([ctx["extractor"].classify(x) for x in images.split(500)]).argmax(1)
    classes = torch.arange(len(CLASSES)).repeat_interleave(10)
    grid = method.sample(
        len(classes), cond=classes, generator=torch.Generator().manual_seed(0), steps=steps, **options
    )
    name = model.split(" ")[0]
    path = ctx["grids"] / f"fashion_mnist_distill_{name}_{steps}.png"
    save_grid(grid, path, nrow=10)
    row = {
        **fid_kid(ctx["test"], features(ctx["extractor"], images)),
        "requested_class": float((predicted == labels).float().mean()),
        "ms_per_image": 1000 * seconds_per_image,
        "nfe": method.last_sample["nfe"],
        "sampler": sampler,
        "grid": path.name,
    }
    rows.add(key, row, (path,))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="samples per FID")
    parser.add_argument(
        "--guidance", type=float, help="w of teacher and students (default: the experiment's)"
    )
    parser.add_argument("--teacher-steps", type=int, nargs="+", default=list(TEACHER_STEPS))
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
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
    torch.set_grad_enabled(False)
    results = Path(args.results)
    page = None if args.tiny else Path(args.page)
    tables = {"distill_fashion_mnist": table, "distill_fashion_mnist_grids": grid_table}
    rows = ResultRows(results / "distill_fashion_mnist.json", tables, page, commit=args.commit)
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
    ctx = {
        "n": args.n,
        "extractor": extractor,
        "test": features(extractor, test_x),
        "grids": results / "grids" if args.tiny else Path(args.grids),
        "per_class": 1 if args.tiny else 10,  # samples per class row of a grid
    }
    if "floor" not in rows:
        train_x, _ = real_images(datamodule, "train")
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.n]
        rows.add("floor", {"n": len(pick), **fid_kid(ctx["test"], features(extractor, train_x[pick]))})

    stage1_args = [f"stage1.{a}" for a in TINY_TEACHER] if args.tiny else []
    base = [f"experiment={EXPERIMENT}", *runs, *stage1_args, *(TINY_RUN if args.tiny else [])]
    stage1 = plan(compose(base))  # the teacher as the students' stage1 section trains it; they reuse it
    if TEACHER not in rows:
        started = cpu_seconds()
        if not stage1.finished:
            stage1.run()
        rows.add(
            TEACHER, {"cpu_minutes": (cpu_seconds() - started) / 60, "checkpoint": str(stage1.checkpoint)}
        )
    teacher = load_method(rows.rows[TEACHER]["checkpoint"])
    w = teacher.cfg.guidance if args.guidance is None else args.guidance
    for steps in args.teacher_steps:  # DDIM with eta 0, the sampler progressive distillation distils
        measure(rows, TEACHER, teacher, steps, {"sampler": "ddim", "guidance": w}, ctx)

    for student in args.students:
        if student not in rows:
            torch.set_grad_enabled(True)
            ckpt, seconds = trained([*base, *STUDENTS[student], f"run_id=bench_{student}"])
            torch.set_grad_enabled(False)
            model = load_method(str(ckpt))
            rows.add(
                student,
                {
                    "cpu_minutes": seconds / 60,
                    "checkpoint": str(ckpt),
                    "parameters": sum(p.numel() for p in model.net.parameters()),
                },
            )
        model = load_method(rows.rows[student]["checkpoint"])
        for steps in STUDENT_STEPS:
            measure(rows, student, model, steps, {"guidance": w}, ctx)
    print(table(rows.rows))
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"[distill_fashion_mnist] {time.time() - started:.0f} s")
    raise SystemExit(code)
