"""Fashion-MNIST representation results: SSL checkpoints vs their random-init twins, a supervised
baseline and raw pixels, all through one protocol; plus each run's online-probe and loss curves.

    python benchmarks/fashion_mnist_results.py runs/simclr_fashion_mnist/final/checkpoints/last.ckpt ... \
        --supervised runs/supervised_fashion_mnist/final/checkpoints/last.ckpt \
        --plots docs/images --out fashion_mnist_results.json

Protocol, the same for every row:

- features: ``embed`` of the un-augmented images (eval mode) of the train split (55,000 images),
  the val split (5,000 held out of the official training set, seeded) and the test split (10,000);
- linear probe: multinomial logistic regression on standardised features by full-batch L-BFGS
  (``lightning_gen.eval.probe``), fitted on all 55,000 train labels, on a class-balanced 10 % (5,500)
  and on 1 % (550; mean of 3 draws, ``eval.finetune.balanced_subset``); its L2 weight is chosen from
  ``WEIGHT_DECAYS`` by accuracy on the val split; top-1 on the test split;
- kNN: k = 20, cosine similarity, votes weighted exp(s / 0.07), the 55,000 train features as the bank;
- k-means: NMI of k-means (k = 10, L2-normalised features, 5 restarts, seed 0) on the test features;
- random init: the same method rebuilt from the checkpoint's config with fresh weights (seed 0);
- raw pixels: the 28x28 images as 784 values in [0, 1] (not resized), same probe, kNN and k-means;
- supervised: its backbone features through the same protocol, and its own classifier on the test split.

Prints a markdown table; ``--out`` writes every number as JSON; ``--append FILE`` adds each row to a
JSON-lines file the moment it is measured (with the run's seed, epochs and ``--cpu-seconds``), which
``benchmarks/fashion_mnist_table.py`` turns into the page's table (mean ± std over seeds) and the
probe-vs-CPU-time plot; ``--plots DIR`` writes ``DIR/fashion_mnist_<experiment>_curves.png`` from each
run's metrics.csv. ``--limit N`` keeps the first N images of every split (a quick check of the script).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fashion_mnist_table beside this script

from lightning_gen import registry  # noqa: E402
from lightning_gen.checkpoint import load_checkpoint  # noqa: E402
from lightning_gen.config import compose, section_object  # noqa: E402
from lightning_gen.data.base import ImageTensorDataset  # noqa: E402
from lightning_gen.eval.cli import EvalConfig, build_data  # noqa: E402
from lightning_gen.eval.clustering import KMeansConfig, cluster_features  # noqa: E402
from lightning_gen.eval.features import Features, split_features  # noqa: E402
from lightning_gen.eval.finetune import balanced_subset  # noqa: E402
from lightning_gen.eval.knn import KNNConfig, knn_accuracy  # noqa: E402
from lightning_gen.eval.probe import ProbeConfig, evaluate_probe, train_linear_probe  # noqa: E402
from lightning_gen.eval.wandb_run import run_dir_of_checkpoint  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FRACTIONS = {"all": 1.0, "10%": 0.1, "1%": 0.01}
SUBSET_DRAWS = 3


def probe_top1(train: Features, val: Features, test: Features, fraction: float) -> float:
    """Test top-1 of the L-BFGS probe whose weight decay scored best on val; mean over label draws."""
    scores = []
    for seed in range(SUBSET_DRAWS if fraction < 1 else 1):
        keep = torch.arange(len(train)) if fraction == 1 else balanced_subset(train.labels, fraction, seed)
        best = (-1.0, 0.0)
        for weight_decay in WEIGHT_DECAYS:
            cfg = ProbeConfig(optimizer="lbfgs", weight_decay=weight_decay, seed=seed)
            probe = train_linear_probe(train.features[keep], train.labels[keep], 10, cfg)
            val_top1 = evaluate_probe(probe, val.features, val.labels)["top1"]
            if val_top1 > best[0]:
                best = (val_top1, evaluate_probe(probe, test.features, test.labels)["top1"])
        scores.append(best[1])
    return sum(scores) / len(scores)


def evaluate(train: Features, val: Features, test: Features, fractions=tuple(FRACTIONS)) -> dict[str, float]:
    row = {name: probe_top1(train, val, test, FRACTIONS[name]) for name in fractions}
    k = min(20, len(train))
    knn = knn_accuracy(train.features, train.labels, test.features, test.labels, 10, KNNConfig(k=[k]))
    row["knn20"] = knn[f"top1_k{k}"]
    row["nmi"] = cluster_features(test.features, test.labels, 10, KMeansConfig(seed=0))["nmi"]
    return row


# experiment -> (name on the page, its method page)
TITLES = {
    "simclr": ("SimCLR", "simclr"),
    "simclr_long": ("SimCLR, 40 epochs", "simclr"),
    "moco_v1": ("MoCo v1", "moco"),
    "moco_v2": ("MoCo v2", "moco"),
    "moco_v3": ("MoCo v3", "moco"),
    "moco_v3_long": ("MoCo v3, 36 epochs", "moco"),
    "dino": ("DINO", "dino"),
    "cpc": ("CPC", "cpc"),
    "byol": ("BYOL", "byol"),
    "simsiam": ("SimSiam", "simsiam"),
    "barlow_twins": ("Barlow Twins", "barlow_twins"),
    "vicreg": ("VICReg", "vicreg"),
    "swav": ("SwAV", "swav"),
    "swav_long": ("SwAV, 25 epochs", "swav"),
    "mae": ("MAE", "mae"),
    "rotation": ("RotNet", "rotation"),
    "relative_patch": ("Relative patch location", "relative_patch"),
    "jigsaw": ("Jigsaw puzzles", "jigsaw"),
    "inpainting": ("Context encoder", "inpainting"),
    "supervised": ("supervised baseline", None),
}


def row_name(experiment: str) -> str:
    title, page = TITLES.get(experiment.removesuffix("_fashion_mnist"), (experiment, None))
    linked = f"[{title}](methods/{page}.md)" if page else title
    return f"{linked} (`{experiment}`)"


def limit_splits(datamodule, n: int | None) -> None:
    """Keep the first ``n`` images of every in-memory split (a quick check of the whole script)."""
    if n:
        for split, data in list(datamodule.datasets.items()):
            datamodule.datasets[split] = ImageTensorDataset(data.images[:n], data.labels[:n])


def run_config(run_dir: Path | None) -> dict:
    from omegaconf import OmegaConf

    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


def method_features(method, datamodule) -> tuple[Features, Features, Features]:
    with torch.autocast("cpu", enabled=False):
        return tuple(split_features(method, datamodule, s) for s in ("train", "val", "test"))


def random_twin(path: str):
    """The checkpoint's method and config with fresh weights (seed 0), without touching the global RNG."""
    hparams = load_checkpoint(path)["hyper_parameters"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return registry.get("method", hparams["method"]).cls(hparams["cfg"], hparams["data"]).eval()


def raw_pixel_features(datamodule_at_28px) -> tuple[Features, Features, Features]:
    out = []
    for split in ("train", "val", "test"):
        data = datamodule_at_28px.datasets[split]
        n = len(data)
        out.append(Features(data.images.flatten(1).float() / 255, data.labels, torch.arange(n)))
    return tuple(out)


@torch.no_grad()
def own_classifier_top1(method, datamodule) -> float:
    correct = 0
    for batch in datamodule.eval_dataloader("test"):
        logits = method.classify(method.to_float(batch["image"], "standard"))
        correct += int((logits.argmax(1) == batch["label"]).sum())
    return correct / len(datamodule.datasets["test"])


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {epoch: value} for the epoch-level columns of metrics.csv (last value per epoch)."""
    series: dict[str, dict[int, float]] = {}
    with open(run_dir / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in ("", None) and key not in ("epoch", "step") and not key.endswith("_step"):
                    series.setdefault(key, {})[int(row["epoch"])] = float(value)
    return series


def plot_curves(run_dir: Path, experiment: str, out_dir: Path) -> Path:
    from matplotlib.figure import Figure

    metrics = read_metrics(run_dir)
    figure = Figure(figsize=(10, 3.6), dpi=110)
    acc, loss = figure.subplots(1, 2)
    for key, label in (
        ("val/probe_acc", "online probe, val (clean images)"),
        ("train/probe_acc_epoch", "online probe, train (augmented views)"),
    ):
        if key in metrics:
            epochs = sorted(metrics[key])
            acc.plot([e + 1 for e in epochs], [metrics[key][e] for e in epochs], marker=".", label=label)
    acc.set(xlabel="epoch", ylabel="top-1", title=f"{experiment}: online linear probe")
    acc.grid(alpha=0.3)
    acc.legend(fontsize=8)
    key = "train/loss_epoch"
    if key in metrics:
        epochs = sorted(metrics[key])
        loss.plot([e + 1 for e in epochs], [metrics[key][e] for e in epochs], marker=".", color="C3")
    loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title=f"{experiment}: SSL loss")
    loss.grid(alpha=0.3)
    figure.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fashion_mnist_{experiment}_curves.png"
    figure.savefig(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="SSL checkpoints (any method with embed)")
    parser.add_argument("--supervised", help="checkpoint of supervised_fashion_mnist")
    parser.add_argument("--no-random", action="store_true", help="skip the random-init twins")
    parser.add_argument("--quick", action="store_true", help="all-label probe and kNN only (pilot runs)")
    parser.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline")
    parser.add_argument("--plots", help="folder for the online-probe / loss curves")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    parser.add_argument("--append", help="add every row to this JSON-lines file as soon as it is measured")
    parser.add_argument("--cpu-seconds", type=float, help="training CPU time of the (single) checkpoint")
    parser.add_argument("--limit", type=int, help="first N images of every split only (a quick check)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results: dict[str, dict] = {}
    fractions = ("all",) if args.quick else tuple(FRACTIONS)

    def report(name: str, row: dict, kind: str, **facts) -> None:
        results[name] = row
        print(f"[fashion_mnist_results] {name}: " + json.dumps(row), flush=True)
        if args.append:
            Path(args.append).parent.mkdir(parents=True, exist_ok=True)
            with open(args.append, "a") as handle:
                handle.write(json.dumps({"name": name, "kind": kind, **facts, **row}) + "\n")

    datamodule = None
    for path in [*args.checkpoints, *([args.supervised] if args.supervised else [])]:
        started = time.time()
        trained = load_method(path)
        run_dir = run_dir_of_checkpoint(path)
        datamodule = build_data(EvalConfig(ckpt=path), trained, run_dir, [])
        limit_splits(datamodule, args.limit)
        experiment = run_dir.parent.name if run_dir else Path(path).stem
        config = run_config(run_dir)
        facts = {
            "experiment": experiment,
            "seed": config.get("seed", 0),
            "epochs": config.get("trainer", {}).get("max_epochs"),
            "cpu_seconds": args.cpu_seconds,
            "checkpoint": str(path),
        }
        row = evaluate(*method_features(trained, datamodule), fractions)
        if run_dir is not None:
            val_probe = read_metrics(run_dir).get("val/probe_acc", {})
            row["online_probe"] = val_probe[max(val_probe)] if val_probe else None
            if args.plots:
                row["plot"] = str(plot_curves(run_dir, experiment, Path(args.plots)))
        row["seconds"] = time.time() - started
        name = row_name(experiment)
        report(
            name + (": its encoder's features" if path == args.supervised else ""), row, "trained", **facts
        )
        if path == args.supervised:
            own = {"all": own_classifier_top1(trained, datamodule)}
            report(f"{name}: its own classifier, end to end", own, "own classifier", **facts)
        if not args.no_random and path != args.supervised:
            twin = evaluate(*method_features(random_twin(path), datamodule), fractions)
            report(f"`{experiment}`, random init", twin, "random init", experiment=experiment, seed=0)

    if not args.no_pixels:
        pixels = registry.build(
            "data", section_object(compose(["data=fashion_mnist", "data.image_size=null"]).data)
        )
        pixels.setup()
        limit_splits(pixels, args.limit)
        report(
            "raw pixels (784 values)", evaluate(*raw_pixel_features(pixels), fractions), "raw pixels", seed=0
        )

    from fashion_mnist_table import aggregate, markdown  # noqa: E402 (beside this script)

    rows = [{"name": n, "kind": "trained", **r} for n, r in results.items()]
    print("\n" + markdown(aggregate(rows)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
