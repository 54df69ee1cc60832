"""Linear-probe accuracy of each pretext method after a short run vs. the same encoder at random init.

For every method: train its digits experiment with `lgen train`'s own code path (``run.train``),
then fit a logistic-regression probe (scikit-learn, standardised features) on the frozen
``embed`` features of the digits train split and report its accuracy on the held-out test split.
The baseline is the *same* method built from the same config and seed but never trained, probed
the same way. A probe on the raw pixels is printed for reference.

    PYTHONPATH=. python benchmarks/pretext_probe.py --epochs 5
    PYTHONPATH=. python benchmarks/pretext_probe.py --epochs 5 --methods rotation mae

Prints a markdown table (also written to --out if given).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lightning_gen import registry
from lightning_gen.config import compose, section_object
from lightning_gen.run import build_datamodule, train

EXPERIMENTS = {
    "rotation": "rotation_digits",
    "relative_patch": "relative_patch_digits",
    "jigsaw": "jigsaw_digits",
    "colorization": "colorization_digits",
    "split_brain": "split_brain_digits",
    "inpainting": "inpainting_digits",
    "mae": "mae_digits",
}
COMMON = [
    "logger.wandb.enabled=false",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "callbacks.images.enabled=false",
]


@torch.no_grad()
def features(method, datamodule, split: str) -> tuple[np.ndarray, np.ndarray]:
    method.eval()
    out, labels = [], []
    for batch in datamodule.eval_dataloader(split):
        out.append(method.embed_images(batch["image"]).float())
        labels.append(batch["label"])
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def few_labels(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    )


def probe_accuracy(method, datamodule, per_class: int) -> tuple[float, float]:
    """Test accuracy of logistic-regression probes fit on all train labels / ``per_class`` per class."""
    x_train, y_train = features(method, datamodule, "train")
    x_test, y_test = features(method, datamodule, "test")
    scores = []
    for keep in (np.arange(len(y_train)), few_labels(y_train, per_class)):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        probe.fit(x_train[keep], y_train[keep])
        scores.append(float(probe.score(x_test, y_test)))
    return scores[0], scores[1]


class RawPixels:
    """Stands in for a method whose embedding is the image itself."""

    def eval(self):
        return self

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=list(EXPERIMENTS))
    parser.add_argument("--runs-dir", default="runs/benchmarks")
    parser.add_argument("--per-class", type=int, default=5, help="labels per class of the few-label probe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for name in args.methods:
        overrides = [
            f"experiment={EXPERIMENTS[name]}",
            f"trainer.max_epochs={args.epochs}",
            *COMMON,
            f"runs_dir={args.runs_dir}",
            "run_id=probe",
            "resume=never",
        ]
        cfg = compose(overrides)
        torch.manual_seed(cfg.seed)
        datamodule = build_datamodule(cfg)
        datamodule.setup()
        untrained = registry.build("method", section_object(cfg.method), data=datamodule.info)
        random_acc = probe_accuracy(untrained, datamodule, args.per_class)
        started = time.time()
        run = train(compose(overrides))
        seconds = time.time() - started
        trained_acc = probe_accuracy(run.method, run.datamodule, args.per_class)
        summary = run.summary
        pretext = summary.get("val/pretext_acc")
        rows.append(
            (
                name,
                EXPERIMENTS[name],
                args.epochs,
                summary.get("val/loss"),
                pretext,
                summary.get("val/probe_acc"),
                trained_acc,
                random_acc,
                seconds,
            )
        )
        print(f"[pretext_probe] {name}: probe {trained_acc} vs random init {random_acc}", flush=True)

    digits = build_datamodule(compose(["experiment=rotation_digits"]))
    pixels = probe_accuracy(RawPixels(), digits, args.per_class)
    k = args.per_class
    lines = [
        "| method | experiment | epochs | val pretext loss | val pretext acc | online probe (val) "
        f"| linear probe (test) | random init | probe, {k}/class | random init, {k}/class | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for name, exp, epochs, loss, pretext, online, trained, random_acc, seconds in rows:
        lines.append(
            f"| {name} | {exp} | {epochs} | {fmt(loss)} | {fmt(pretext)} | {fmt(online)} | "
            f"**{trained[0]:.3f}** | {random_acc[0]:.3f} | **{trained[1]:.3f}** | {random_acc[1]:.3f} "
            f"| {seconds:.0f} |"
        )
    lines.append(f"| (raw pixels) | - | - | - | - | - | {pixels[0]:.3f} | - | {pixels[1]:.3f} | - | - |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
