"""The evaluation callbacks inside `lgen train`, the offline `lgen eval` commands, W&B, and bad input.

One small autoencoder run on digits (16 px, width 8, 2 epochs of 3 steps) with all four evaluation
callbacks and W&B offline is shared by the tests of this module.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_gen.eval.wandb_run import read_wandb_file
from tests.conftest import lgen_env, run_lgen

TRAIN = [
    "experiment=ae_digits",
    "data.image_size=16",
    "data.batch_size=32",
    "method.width=8",
    "method.latent_dim=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.mode=offline",
    "callbacks.images.enabled=false",
    "callbacks.linear_probe.every_n_epochs=1",
    "callbacks.knn.every_n_epochs=1",
    "callbacks.clustering.every_n_epochs=1",
    "callbacks.embedding_plot.every_n_epochs=2",
    "callbacks.embedding_plot.num_samples=100",
    "run_id=e2e",
]
EVAL_METRICS = [
    "eval/probe_top1",
    "eval/probe_top5",
    "eval/knn_top1_k20",
    "eval/knn_top1_k200",
    "eval/cluster_nmi",
    "eval/cluster_ari",
]
ENV = lgen_env(OMP_NUM_THREADS="1")  # tiny matrices: threads only contend on a shared machine


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("eval_cli")
    run_lgen("train", *TRAIN, cwd=cwd, env=ENV)
    return cwd / "runs" / "ae_digits" / "e2e"


def eval_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return [r for r in csv.DictReader(handle) if r.get("eval/knn_top1_k20")]


def wandb_logs(run_dir: Path) -> list[dict]:
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [read_wandb_file(f) for f in files]


def test_callbacks_log_to_metrics_csv_wandb_and_the_run_dir(trained):
    rows = eval_rows(trained)
    assert [r["epoch"] for r in rows] == ["0", "1"]  # every epoch, as configured
    for row in rows:
        for name in EVAL_METRICS:
            assert 0.0 <= float(row[name]) <= 1.0, name
    assert float(rows[-1]["eval/probe_top1"]) > 0.3  # digits features beat chance (0.1) even this early

    (log,) = wandb_logs(trained)
    history = [h for h in log["history"] if "eval/knn_top1_k20" in h]
    assert len(history) == 2
    for name in EVAL_METRICS:
        assert log["summary"][name] == pytest.approx(float(rows[-1][name]), abs=1e-6)
    assert log["summary"]["eval/embeddings/_type"] == "images/separated"  # the embedding plot went to W&B
    assert len(list((trained / "embeddings").glob("epoch001_*.png"))) == 1


def test_offline_eval_all_writes_results_subsets_and_appends_to_the_wandb_run(trained):
    ckpt = trained / "checkpoints" / "last.ckpt"
    proc = run_lgen(
        "eval",
        "all",
        f"ckpt={ckpt}",
        "probe.epochs=10",
        "finetune.min_steps=3",
        "finetune.epochs=[1,1]",
        "finetune.batch_size=32",
        cwd=trained.parents[2],
        env=ENV,
    )
    out = trained / "eval" / "last"
    results = {
        p: json.loads((out / f"{p}.json").read_text())["results"]
        for p in ("probe", "knn", "finetune", "cluster")
    }
    assert "knn - last.ckpt on digits" in proc.stdout and "top1_k20" in proc.stdout

    # Same weights, same data, same protocol as the callbacks at the last epoch: same numbers.
    last = eval_rows(trained)[-1]
    assert results["knn"]["top1_k20"] == pytest.approx(float(last["eval/knn_top1_k20"]), abs=1e-6)
    assert results["knn"]["top1_k200"] == pytest.approx(float(last["eval/knn_top1_k200"]), abs=1e-6)
    assert results["cluster"]["nmi"] == pytest.approx(float(last["eval/cluster_nmi"]), abs=1e-6)
    assert 0.0 <= results["probe"]["top1"] <= results["probe"]["top5"] <= 1.0
    assert {"1pct_top1", "10pct_top1", "1pct_top5", "10pct_top5"} <= set(results["finetune"])

    # Subsets: class-balanced, and the same indices an independent computation with the seed gives.
    from lightning_gen.data.digits import DigitsConfig, DigitsDataModule
    from lightning_gen.eval.finetune import balanced_subset

    dm = DigitsDataModule(DigitsConfig(image_size=16, val_fraction=0.15))
    dm.setup()
    labels = dm.datasets["train"].labels
    for tag, fraction in (("1pct", 0.01), ("10pct", 0.1)):
        subset = json.loads((out / f"finetune_subset_{tag}.json").read_text())
        assert len(set(subset["per_class"])) == 1 and subset["per_class"][0] == round(
            fraction * len(labels) / 10
        )
        assert subset["indices"] == balanced_subset(labels, fraction, seed=0).tolist()
        assert torch.bincount(labels[subset["indices"]], minlength=10).tolist() == subset["per_class"]

    first, appended = wandb_logs(trained)  # a second offline run folder with the training run's id
    assert appended["run_id"] == first["run_id"] == (trained / "wandb_id").read_text().strip()
    assert appended["summary"]["offline_eval/knn/top1_k20"] == pytest.approx(results["knn"]["top1_k20"])
    assert appended["summary"]["offline_eval/finetune/10pct_top1"] == pytest.approx(
        results["finetune"]["10pct_top1"]
    )


def test_papers_protocols_through_the_cli_semi_frozen_finetune_and_augmented_probe(trained, tmp_path):
    """`lgen eval finetune freeze=K` (RotNet) and `lgen eval probe augment=true` (MoCo's main_lincls.py),
    in one `lgen eval all` (tests/test_eval_protocols.py checks what each does)."""
    ckpt = trained / "checkpoints" / "last.ckpt"
    run_lgen(
        "eval",
        "all",
        f"ckpt={ckpt}",
        f"out={tmp_path}",
        "wandb=false",
        "probe.augment=true",
        "probe.epochs=1",
        "finetune.freeze=2",
        "finetune.fractions=[0.1]",
        "finetune.epochs=[1]",
        "finetune.min_steps=2",
        "finetune.batch_size=32",
        cwd=trained.parents[2],
        env=ENV,
    )
    probe = json.loads((tmp_path / "probe.json").read_text())
    finetune = json.loads((tmp_path / "finetune.json").read_text())
    assert probe["config"]["probe"]["augment"] is True and 0.0 <= probe["results"]["top1"] <= 1.0
    assert finetune["results"]["10pct_frozen_stages"] == 2 and 0.0 <= finetune["results"]["10pct_top1"] <= 1.0


def eval_main(capsys, protocol: str, *overrides: str) -> tuple[int, str]:
    from lightning_gen.eval import cli

    code = cli.main(argparse.Namespace(protocol=protocol, overrides=list(overrides)))
    return code, capsys.readouterr().err


def test_k_larger_than_the_bank_and_unknown_keys_are_clear_errors(trained, capsys):
    ckpt = trained / "checkpoints" / "last.ckpt"
    code, err = eval_main(capsys, "knn", f"ckpt={ckpt}", "k=[5000]", "wandb=false")
    assert (
        code == 2 and "k=5000 needs 1 <= k <= the number of labeled training samples" in err and "1222" in err
    )
    code, err = eval_main(capsys, "knn", f"ckpt={ckpt}", "temprature=0.1")
    assert code == 2 and "knn.temprature" in err and "did you mean 'temperature'" in err
    code, err = eval_main(capsys, "probe", "data=digits")
    assert code == 2 and "ckpt=PATH is required" in err


def test_checkpoint_of_a_method_without_embed_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from torch import nn

    from lightning_gen import registry
    from lightning_gen.methods.base import DataInfo, Method, MethodConfig
    from lightning_gen.registry import register_method

    # registered for this test only: later tests list every method (tests/test_sync_free.py)
    registry.load_all()
    monkeypatch.setitem(registry._REGISTRIES, "method", dict(registry._REGISTRIES["method"]))

    @register_method("test_no_embed", MethodConfig)
    class NoEmbed(Method):
        """A method with no representation (like a generator)."""

        def __init__(self, cfg, data=None):
            super().__init__(cfg, data)
            self.net = nn.Linear(2, 2)

    method = NoEmbed(MethodConfig(name="test_no_embed"), DataInfo())
    path = tmp_path / "no_embed.ckpt"
    torch.save({"hyper_parameters": dict(method.hparams), "state_dict": method.state_dict()}, path)
    code, err = eval_main(capsys, "probe", f"ckpt={path}")
    assert code == 2 and "method 'test_no_embed' does not expose embed(x)" in err


def test_dataset_without_labels_is_a_clear_error():
    from lightning_gen.data.base import DataConfig, ImageDataModule, ImageTensorDataset
    from lightning_gen.eval import EvalError
    from lightning_gen.eval.features import split_features
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.autoencoder import Autoencoder, AutoencoderConfig

    class Unlabeled(ImageDataModule):
        registry_name, channels = "unlabeled_test", 1

        def load(self, split):
            return ImageTensorDataset(torch.zeros(12, 1, 8, 8, dtype=torch.uint8), torch.full((12,), -1))

    dm = Unlabeled(DataConfig(eval_batch_size=5, val_fraction=0.25))
    method = Autoencoder(AutoencoderConfig(width=4, latent_dim=4), DataInfo(image_size=8))
    features = split_features(method, dm, "train")  # extraction itself needs no labels (embedding plots)
    assert len(features) == 9
    with pytest.raises(
        EvalError, match="kNN needs labels, but none of the 9 samples of this split is labeled"
    ):
        features.labeled("kNN")
