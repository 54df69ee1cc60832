"""Linear-probe accuracy on digits: trained SSL encoders vs random encoders of the same architecture.

Works for any checkpoint with ``embed`` trained on ``digits`` or ``color_digits`` (contrastive, pretext,
autoencoders); the data are rebuilt from the checkpoint's dataset name and image size.

For every checkpoint given, ``embed`` features of the (un-augmented) digits train and test splits
are fitted with scikit-learn's logistic regression (standardised features), once for the trained
encoder and once for the same method rebuilt from the checkpoint's config with fresh random
weights (seed 0); the same features also go through the project's kNN evaluator (cosine, k = 20,
T = 0.07, the train split as the bank). Prints a markdown table.

    python benchmarks/ssl_digits_probe.py runs/simclr_digits/readme/checkpoints/last.ckpt ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gen import registry  # noqa: E402
from lightning_gen.checkpoint import load_checkpoint  # noqa: E402
from lightning_gen.eval.cli import EvalConfig, build_data  # noqa: E402
from lightning_gen.methods.base import load_method  # noqa: E402


@torch.no_grad()
def features(method, loader) -> tuple[np.ndarray, np.ndarray]:
    method.eval()
    xs, ys = [], []
    for batch in loader:
        xs.append(method.embed_images(batch["image"]).float())
        ys.append(batch["label"])
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def probe_accuracy(method, data, per_class: int | None = None, repeats: int = 5) -> float:
    """Test accuracy of a logistic regression on frozen features; ``per_class`` labels per class
    (mean over ``repeats`` seeded draws) or all labels when None. Few labels separate good
    representations from random ones far better than all 1222 labels on a task this easy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = features(method, data.eval_dataloader("train"))
    x_test, y_test = features(method, data.eval_dataloader("test"))
    scores = []
    for seed in range(repeats if per_class else 1):
        keep = np.arange(len(y_train))
        if per_class:
            rng = np.random.default_rng(seed)
            keep = np.concatenate(
                [
                    rng.choice(np.flatnonzero(y_train == c), per_class, replace=False)
                    for c in np.unique(y_train)
                ]
            )
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        scores.append(clf.fit(x_train[keep], y_train[keep]).score(x_test, y_test))
    return float(np.mean(scores))


def knn_top1(method, data) -> float:
    from lightning_gen.eval.knn import KNNConfig, knn_accuracy

    x_train, y_train = features(method, data.eval_dataloader("train"))
    x_test, y_test = features(method, data.eval_dataloader("test"))
    result = knn_accuracy(
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        10,
        KNNConfig(k=[20]),
    )
    return result["top1_k20"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    print(
        "| experiment | method | trained, 10 labels/class | random init, 10 labels/class "
        "| trained, all labels | random init, all labels | trained, kNN k=20 | random init, kNN k=20 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        hparams = load_checkpoint(path)["hyper_parameters"]
        trained = load_method(path)
        data = build_data(EvalConfig(ckpt=path), trained, None, [])  # the checkpoint's dataset and size
        torch.manual_seed(0)
        random_init = registry.get("method", hparams["method"]).cls(hparams["cfg"], hparams["data"])
        experiment = Path(path).parents[2].name
        name = hparams["method"] + (f" {hparams['cfg']['version']}" if "version" in hparams["cfg"] else "")
        cells = [probe_accuracy(m, data, k) for k in (10, None) for m in (trained, random_init)]
        cells += [knn_top1(m, data) for m in (trained, random_init)]
        print(f"| {experiment} | {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
