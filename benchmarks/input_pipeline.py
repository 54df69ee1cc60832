"""Input pipeline for ImageNet-style data: images/s per CPU core making two 224 px SimCLR views.

Writes its own ImageNet-like tree once, atomically (``--images`` JPEGs of mixed sizes around 500x375 in
``--classes`` classes, seeded; textured content, so the files are the size of real photos' JPEGs,
~90 KB), a subset of the first ``--small`` images with the same files, and shards of both
(``lgen shards write``). Then, each in a fresh process with ``--workers`` DataLoader workers:

- ``pil``: torchvision ``ImageFolder`` + the SimCLR ImageNet transforms in PIL, per view
  (RandomResizedCrop 224, flip, colour jitter 0.8 p 0.8, grayscale p 0.2, PIL Gaussian blur
  p 0.5, ToTensor, Normalize): what the peers' pipelines do on the CPU;
- ``pil_crops``: the same with only RandomResizedCrop + flip + PILToTensor: the like-for-like CPU
  work of the project's paths, which run flip, colour and blur batched on the GPU;
- ``folder``: ``data=folder in_memory=false``: libjpeg-turbo decode and both crops of the whole
  image in the workers;
- ``shards``: ``data=shards`` (LitData), same decode and crops;
- ``shards_gpu`` (``--gpu``): ``data=shards decode=device``: workers parse headers and draw the
  boxes; the batch is decoded by nvjpeg and cropped on the GPU.

Per path: images/s over ``--batches`` batches after 2 warm-up ones, divided by the workers
(per core; the main process only receives batches); on the small and on the full tree, the set-up
time (constructing the dataset: listing the files, or reading the shards' index) and the time
from that start to the first batch; RSS of the main process and of one worker. Each
path runs ``--repeats`` times in alternating order; cells show the median (and the range).
A last row times the on-device views (flip, jitter, grayscale, blur) on this CPU, one thread, for
scale: a GPU does them in a fraction of a millisecond per batch.

    python benchmarks/input_pipeline.py --repeats 3
    python benchmarks/input_pipeline.py --gpu --workers 8 --batch 256 --batches 20   # on a GPU machine
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATHS = ("pil", "pil_crops", "folder", "shards")
WHAT = {
    "pil": "decode, 2 x (crop, flip, jitter, gray, blur, normalize) in PIL",
    "pil_crops": "decode, 2 x (crop, flip) in PIL",
    "folder": "decode (libjpeg-turbo), 2 whole-image crops",
    "shards": "stream shards, decode, 2 whole-image crops",
    "shards_gpu": "stream shards, boxes; decode + crops on the GPU",
}


# ------------------------------------------------------------------------------ the dataset


def textured_image(rng: np.random.Generator, width: int, height: int):
    """Smooth colour regions + mid-frequency structure + grain: JPEG sizes like photos', unlike flat colour."""
    from PIL import Image

    def field(cells_w: int, cells_h: int, amplitude: float) -> np.ndarray:
        grid = (rng.random((cells_h, cells_w, 3)) * 255).astype(np.uint8)
        return (
            np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)
            * amplitude
        )

    pixels = (
        field(6, 5, 0.6) + field(48, 36, 0.3) + rng.standard_normal((height, width, 3), dtype=np.float32) * 16
    )
    return Image.fromarray(np.clip(pixels + 25, 0, 255).astype(np.uint8))


def _write_class(job: tuple[str, int, int, int, int]) -> int:
    root, label, count, seed, start = job
    rng = np.random.default_rng([seed, label])
    folder = Path(root) / f"class{label:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(count):
        width = int(np.clip(rng.normal(500, 60), 300, 800))
        height = int(width * rng.uniform(0.6, 0.9))
        if rng.random() < 0.2:  # some portraits
            width, height = height, width
        buffer = io.BytesIO()
        textured_image(rng, width, height).save(buffer, "JPEG", quality=90)
        (folder / f"{start + i:06d}.jpg").write_bytes(buffer.getvalue())
        written += len(buffer.getvalue())
    return written


def make_trees(root: Path, images: int, classes: int, small: int, seed: int, workers: int) -> None:
    """The JPEG tree, its subset and the shards of both under ``root``, written once and atomically.

    Everything is written into a sibling folder that is renamed to ``root`` only when complete, with a
    ``COMPLETE.json`` naming the settings it was made with: a run killed while writing leaves no tree
    that a later run would take for a complete one, and a tree of other settings is made again."""
    import shutil

    settings = {"images": images, "classes": classes, "small": small, "seed": seed, "version": 1}
    marker = root / "COMPLETE.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"# reusing the complete tree in {root} ({marker.name}: {settings})", flush=True)
        return
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    for leftover in [root, *root.parent.glob(f"{root.name}.partial-*")]:  # incomplete or of other settings
        shutil.rmtree(leftover, ignore_errors=True)
    full, subset = partial / "tree", partial / f"tree_{small}"
    per_class = images // classes
    print(f"# writing {per_class * classes} training JPEGs in {classes} classes to {root}", flush=True)
    jobs = [(str(full / "train"), c, per_class, seed, 0) for c in range(classes)]
    jobs += [(str(full / "val"), c, 2, seed + 1, 0) for c in range(classes)]
    with Pool(workers) as pool:
        sizes = pool.map(_write_class, jobs)
    print(f"# mean JPEG size {sum(sizes) / (per_class * classes + 2 * classes) / 1e3:.0f} KB", flush=True)
    for split, keep in (("train", small // classes), ("val", 2)):
        for folder in sorted((full / split).iterdir()):
            target = subset / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:keep]:
                os.link(path, target / path.name)  # the same files, no copy
    from lightning_gen.data.shard_writer import write_shards

    for tree in (full, subset):
        shards = partial / f"shards_{tree.name}"
        write_shards(tree, shards, workers=workers, chunk_bytes="64MB", overwrite=True, validate=False)
    (partial / marker.name).write_text(json.dumps(settings))
    os.replace(partial, root)  # the complete tree appears under its name in one step


# ------------------------------------------------------------------------------ one measured run


class PILGaussianBlur:
    """Gaussian blur with sigma ~ U(0.1, 2) in PIL, as solo-learn and lightly blur (torchvision's
    GaussianBlur on a PIL image converts it to a tensor and convolves a full 2-D kernel: ~10x slower)."""

    def __call__(self, image):
        import random

        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def pil_transform(full: bool):
    import torchvision.transforms as T

    if not full:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur()], p=0.5),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def simclr_specs():
    from lightning_gen.data.views import Views, ViewsConfig

    return Views(ViewsConfig(recipe="simclr"), (0.5,) * 3, (0.5,) * 3, 224).crop_specs()


def build_loader(path: str, tree: Path, shards: Path, workers: int, batch: int):
    from torch.utils.data import DataLoader

    if path in ("pil", "pil_crops"):
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(tree / "train"), transform=TwoViews(pil_transform(path == "pil")))
        return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers), None
    if path == "folder":
        from lightning_gen.data.folder import FolderConfig, ImageFolderDataModule

        cfg = FolderConfig(
            root=str(tree), image_size=224, in_memory=False, batch_size=batch, num_workers=workers
        )
        dm = ImageFolderDataModule(cfg, seed=0)
    else:
        from lightning_gen.data.shards import ShardDataModule, ShardsConfig

        decode = "device" if path == "shards_gpu" else "cpu"
        cfg = ShardsConfig(root=str(shards), batch_size=batch, num_workers=workers, decode=decode)
        dm = ShardDataModule(cfg, seed=0)
    dm.train_crops = simclr_specs()
    dm.setup()
    return dm.train_dataloader(), dm


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def measure(path: str, tree: Path, shards: Path, workers: int, batch: int, batches: int) -> dict:
    import importlib

    import psutil
    import torch

    # imports are not start-up work of a pipeline (lightning_gen's pull in Lightning): done before the clock
    for module in ("torchvision.datasets",) if path.startswith("pil") else ("lightning_gen.data.shards",):
        importlib.import_module(module)

    started = time.perf_counter()
    loader, dm = build_loader(path, tree, shards, workers, batch)
    setup = time.perf_counter() - started  # listing the files / reading the shard index
    # shards_gpu without a GPU (a dry run of the benchmark) decodes in the main process on the CPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if path == "shards_gpu" else None
    batches_iter = iter(loader)

    def next_batch():
        b = next(batches_iter)
        if device is not None:
            b = dm.transfer_batch_to_device(b, device, 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return b

    next_batch()
    first = time.perf_counter() - started
    next_batch()  # warm-up: all workers running
    timed = time.perf_counter()
    for _ in range(batches):
        next_batch()
    seconds = time.perf_counter() - timed
    children = psutil.Process().children(recursive=True)
    return {
        "images_per_s": batches * batch / seconds,
        "first_batch_s": first,
        "setup_s": setup,
        "rss_main_mb": rss_mb(os.getpid()),
        "rss_worker_mb": max((rss_mb(c.pid) for c in children), default=0.0),
    }


def measure_views(batch: int, repeats: int = 3) -> float:
    """Images/s on one CPU thread of the SimCLR on-device views (flip, jitter, grayscale, blur) of 2 crops."""
    import torch

    from lightning_gen.data.views import Views, ViewsConfig

    torch.set_num_threads(1)
    views = Views(ViewsConfig(recipe="simclr"), (0.5,) * 3, (0.5,) * 3, 224)
    crops = [torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8) for _ in range(2)]
    views(crops)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        views(crops)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


# ------------------------------------------------------------------------------ the table


def run_child(args, path: str, tree: Path, shards: Path, batches: int) -> dict:
    command = [sys.executable, __file__, "--child", path, "--tree", str(tree), "--shards", str(shards)]
    command += ["--workers", str(args.workers), "--batch", str(args.batch), "--batches", str(batches)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(values: list[float], digits: int = 1) -> str:
    middle = f"{statistics.median(values):.{digits}f}"
    if len(values) == 1:
        return middle
    return f"{middle} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def startup(runs: list[dict]) -> str:
    setup = statistics.median(r["setup_s"] for r in runs)
    first = statistics.median(r["first_batch_s"] for r in runs)
    return f"{setup:.2f} / {first:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/lgen_input_pipeline"))
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--small", type=int, default=2000, help="images in the subset for the start-up column"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=1, help="DataLoader workers (images/s is divided by them)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=[*PATHS, "shards_gpu"])
    parser.add_argument(
        "--gpu", action="store_true", help="add shards_gpu: nvjpeg decode and crops on the GPU"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tree, args.shards, args.workers, args.batch, args.batches)))
        return 0

    cores = len(os.sched_getaffinity(0))
    make_trees(args.root, args.images, args.classes, args.small, args.seed, cores)
    paths = list(args.paths) + (["shards_gpu"] if args.gpu and "shards_gpu" not in args.paths else [])
    sizes = {"small": args.root / f"tree_{args.small}", "full": args.root / "tree"}
    results: dict[str, dict[str, list[dict]]] = {p: {"small": [], "full": []} for p in paths}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        order = paths if repeat % 2 == 0 else paths[::-1]  # alternate: drifts of a shared machine even out
        for path in order:
            for size, tree in sizes.items():
                # the small tree is there for the start-up columns only
                batches = args.batches if size == "full" else 1
                results[path][size].append(
                    run_child(args, path, tree, args.root / f"shards_{tree.name}", batches)
                )
    load = os.getloadavg()
    print(
        f"\n# {args.images // args.classes * args.classes} JPEGs ({args.small} for the small tree), "
        f"{args.workers} worker(s), batch {args.batch}, {args.batches} timed batches, {args.repeats} run(s) per "
        f"cell; {cores} cores, load average {load_before:.1f} before, {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1 / 5 / 15 min) after"
    )
    print(
        "| path | what the CPU workers do | images/s per core | images/s | vs PIL | set-up / first batch, "
        f"{args.small} files (s) | set-up / first batch, {args.images} files (s) | RSS main / worker (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    baseline = (
        statistics.median(r["images_per_s"] for r in results["pil"]["full"]) if "pil" in results else None
    )
    if "shards_gpu" in paths and not _has_cuda():
        WHAT["shards_gpu"] = "no GPU here: the device path ran on the CPU, in the main process"
    for path in paths:
        full, small = results[path]["full"], results[path]["small"]
        per_core = [r["images_per_s"] / max(args.workers, 1) for r in full]
        ratio = f"{statistics.median(r['images_per_s'] for r in full) / baseline:.2f}x" if baseline else "-"
        rss = f"{statistics.median(r['rss_main_mb'] for r in full):.0f} / "
        rss += f"{statistics.median(r['rss_worker_mb'] for r in full):.0f}"
        print(
            f"| {path} | {WHAT[path]} | {cell(per_core)} | {cell([r['images_per_s'] for r in full])} | {ratio} | {startup(small)} | {startup(full)} | {rss} |",
            flush=True,
        )
    print(
        f"| (views) | flip, jitter, gray, blur of 2 views, batched, 1 CPU thread | {measure_views(args.batch):.1f} "
        "| | | | | |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
