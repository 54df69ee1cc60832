"""Fashion-MNIST generators: FID and KID on N samples against the test split next to the real-vs-real
floor, sample grids (a guidance sweep of class rows for a class-conditional model), bits/dim on the test split.

    python benchmarks/fashion_mnist_generators.py \
        runs/{vae,gan,ddpm_cfg,flow,pixelcnn}_fashion_mnist/final/checkpoints/last.ckpt \
        --n 5000 --guidance 0 1 3 --grids docs/images --out fashion_mnist_generators.json

- Features: the Fashion-MNIST domain extractor at the generators' resolution, the network behind
  ``val/fid_fashion_mnist`` during training (``lgen fid-extractor data=fashion_mnist data.image_size=16``),
  whose test accuracy is printed.
- FID / KID (torchmetrics, KID: 50 subsets of 1,000) of ``--n`` samples against the 10,000 test images.
  Sample chunk c of ``--batch`` images is drawn with a generator seeded with c, so the samples are the
  same on every run. A class-conditional model is asked for the classes in turn, and the table adds the
  fraction of samples the extractor's classifier assigns to the requested class.
- Floor: the same statistics for ``--n`` real training images (a seeded draw) and for all 55,000 of
  them against the test split: a generator matching the data distribution exactly scores about that.
- Bits/dim on the 10,000 test images, as ``lgen eval bpd`` gives them (``lightning_gen/eval/likelihood.py``):
  PixelCNN's exact discrete NLL; the VAE's negative ELBO (one posterior sample per image, seed 0) with
  the dequantisation bound of ``losses.elbo.bits_per_dim``; diffusion models' variational bound with
  the discretised decoder (4 draws of t per image).
- Grids (``--grids DIR``): ``fashion_mnist_<experiment>.png``, 8 x 8 samples of chunk 0; for a
  class-conditional model ``fashion_mnist_<experiment>_w<w>.png`` per guidance weight of ``--guidance``,
  one row per class (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gen import registry  # noqa: E402
from lightning_gen.callbacks.fid import fid_kid_from_shards  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.eval.fid_extractor import default_path, load_extractor  # noqa: E402
from lightning_gen.eval.likelihood import LikelihoodConfig, evaluate  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402

CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def features(extractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(x.float()).double() for x in images.split(500)])


def real_images(datamodule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = datamodule.datasets[split]
    return data.images.float() / 255, data.labels


def fid_kid(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    out = fid_kid_from_shards(
        real, fake, "cpu", kid=True, kid_subsets=50, kid_subset_size=min(1000, len(fake), len(real))
    )
    return {"fid": out[("fid", "")], "kid": out[("kid", "")], "kid_std": out[("kid", "_std")]}


def draw(method, n: int, batch: int, **options) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """n samples (chunk c seeded with c), the requested classes (None: unconditional), seconds per image."""
    conditional = getattr(method, "conditional", False)
    labels = torch.arange(n) % method.data_info.num_classes if conditional else None
    out, started = [], time.perf_counter()
    with torch.autocast("cpu", enabled=False):
        for c, start in enumerate(range(0, n, batch)):
            cond = None if labels is None else labels[start : start + batch]
            generator = torch.Generator().manual_seed(c)
            out.append(method.sample(min(batch, n - start), cond=cond, generator=generator, **options).cpu())
    return torch.cat(out), labels, (time.perf_counter() - started) / n


def test_bits_per_dim(method, datamodule, n: int = 0) -> float | None:
    """Mean bits/dim on the test split (its first ``n`` images; 0: all) as ``lgen eval bpd`` gives it; None
    for generators without one (GANs, and latent diffusion, whose bound is on its latents)."""
    if getattr(method, "latent", False):
        return None
    if not (hasattr(method, "bits_per_dim") or method.registry_name in ("pixelcnn", "vae")):
        return None
    # the loader's own batches, so the VAE's posterior samples are drawn as they always were
    cfg = LikelihoodConfig(split="test", n=n, batch_size=datamodule.cfg.eval_batch_size)
    return evaluate(method, datamodule, cfg, seed=0, device=torch.device("cpu"))["bits_per_dim"]


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    big = torch.nn.functional.interpolate(images.float().clamp(0, 1), scale_factor=2, mode="nearest")
    save_image(big, path, nrow=nrow, padding=2, pad_value=1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n", type=int, default=5000, help="samples per FID/KID")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--guidance", type=float, nargs="*", default=[0.0, 1.0, 3.0], help="CFG grid sweep")
    parser.add_argument(
        "--fid-guidance", type=float, nargs="*", default=None, help="CFG weights scored by FID (default: own)"
    )
    parser.add_argument("--grids", help="folder for the sample grids")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    first = load_method(args.checkpoints[0])
    size = first.data_info.image_size
    datamodule = registry.build(
        "data", section_object(compose(["data=fashion_mnist", f"data.image_size={size}"]).data)
    )
    datamodule.setup()
    extractor, blob = load_extractor(default_path("fashion_mnist", size))
    test_x, test_y = real_images(datamodule, "test")
    train_x, _ = real_images(datamodule, "train")
    test = features(extractor, test_x)
    train = features(extractor, train_x)
    classifier_acc = float((extractor.classify(test_x).argmax(1) == test_y).float().mean())
    print(f"[generators] extractor {blob['data']} {size}px: test accuracy {classifier_acc:.4f}", flush=True)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.n]
    results = {
        "extractor_test_accuracy": classifier_acc,
        f"floor: {args.n} train images": fid_kid(test, train[pick]),
        f"floor: all {len(train)} train images": fid_kid(test, train),
    }
    for key in list(results)[1:]:
        print(f"[generators] {key}: {json.dumps(results[key])}", flush=True)

    for path in args.checkpoints:
        method = load_method(path)
        experiment = Path(path).resolve().parents[2].name
        conditional = getattr(method, "conditional", False)
        settings = [None]
        if conditional:
            settings = args.fid_guidance if args.fid_guidance is not None else [method.cfg.guidance]
        bpd = test_bits_per_dim(method, datamodule)
        for w in settings:
            options = {} if w is None else {"guidance": w}
            images, labels, seconds = draw(method, args.n, args.batch, **options)
            row = {**fid_kid(test, features(extractor, images)), "ms_per_image": 1000 * seconds}
            if labels is not None:
                predicted = torch.cat([extractor.classify(x) for x in images.split(500)]).argmax(1)
                row["requested_class"] = float((predicted == labels).float().mean())
            if bpd is not None:
                row["test_bits_per_dim"] = bpd
            name = experiment + ("" if w is None else f", w={w:g}")
            results[name] = row
            print(f"[generators] {name}: {json.dumps(row)}", flush=True)
            if args.grids and not conditional:
                save_grid(images[:64], Path(args.grids) / f"fashion_mnist_{experiment}.png", nrow=8)
        if args.grids and conditional:
            per_class = 10
            rows = torch.arange(method.data_info.num_classes).repeat_interleave(per_class)
            for w in args.guidance:
                grid = method.sample(
                    len(rows), cond=rows, generator=torch.Generator().manual_seed(0), guidance=w
                )
                save_grid(grid, Path(args.grids) / f"fashion_mnist_{experiment}_w{w:g}.png", nrow=per_class)

    print(
        f"\n{args.n} samples vs the {len(test)} test images, features of the Fashion-MNIST extractor ({size}px)\n"
    )
    print("| model | FID | KID x 1000 | requested class | test bits/dim | ms / image |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in results.items():
        if not isinstance(row, dict):
            continue
        cells = [
            f"{row['fid']:.2f}",
            f"{1000 * row['kid']:.2f} ± {1000 * row['kid_std']:.2f}",
            f"{row['requested_class']:.3f}" if "requested_class" in row else "-",
            f"{row['test_bits_per_dim']:.3f}" if "test_bits_per_dim" in row else "-",
            f"{row['ms_per_image']:.1f}" if "ms_per_image" in row else "-",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
