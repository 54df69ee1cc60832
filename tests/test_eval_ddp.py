"""2 real gloo processes give the same features, kNN and probe results as 1 process.

37 samples in batches of 5 on 2 ranks: DistributedSampler pads to 38 (one duplicate) and every
rank ends with a partial batch, so both the duplicate and the partial batches are exercised.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

N_SAMPLES, BATCH = 37, 5


def build():
    from lightning_gen.data.base import ImageTensorDataset
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.autoencoder import Autoencoder, AutoencoderConfig

    torch.manual_seed(0)
    method = Autoencoder(AutoencoderConfig(latent_dim=6, width=4), DataInfo(image_size=8, num_classes=3))
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_SAMPLES, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(N_SAMPLES) % 3
    return method, DataLoader(ImageTensorDataset(images, labels), batch_size=BATCH, shuffle=False)


def evaluate(method, loader):
    from lightning_gen.eval.features import extract_features
    from lightning_gen.eval.knn import KNNConfig, knn_accuracy
    from lightning_gen.eval.probe import ProbeConfig, linear_probe

    feats = extract_features(method, loader, "cpu")
    x, y = feats.features, feats.labels
    return {
        "features": feats.features,
        "labels": feats.labels,
        "indices": feats.indices,
        "knn": knn_accuracy(x[:25], y[:25], x[25:], y[25:], 3, KNNConfig(k=[3, 10])),
        "probe": linear_probe(
            x[:25], y[:25], x[25:], y[25:], 3, ProbeConfig(optimizer="lbfgs", weight_decay=1e-3)
        ),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method, loader = build()
        torch.save(evaluate(method, loader), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_equal_one_process_with_padding_and_partial_batches(tmp_path):
    method, loader = build()
    single = evaluate(method, loader)
    assert single["indices"].tolist() == list(range(N_SAMPLES))

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["indices"].tolist() == list(range(N_SAMPLES)), "padding duplicate kept or a sample lost"
        assert torch.equal(got["labels"], single["labels"])
        torch.testing.assert_close(got["features"], single["features"], atol=1e-5, rtol=1e-5)
        assert got["knn"] == single["knn"]
        assert got["probe"]["top1"] == single["probe"]["top1"]
        assert got["probe"]["loss"] == pytest.approx(single["probe"]["loss"], rel=1e-4)


@pytest.mark.ddp
def test_knn_callback_under_ddp_equals_offline_single_process_eval(tmp_path):
    """`lgen train` on 2 gloo processes: the kNN callback equals a 1-process `lgen eval knn` of last.ckpt.

    300 digits -> 45 val and 255 train images: both odd, so DistributedSampler pads both splits, and
    eval batches of 16 leave partial batches on every rank.
    """
    import csv
    import json

    from tests.conftest import lgen_env, run_lgen

    env = lgen_env(OMP_NUM_THREADS="1")
    run_lgen(
        "train",
        "experiment=ae_digits",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "data.image_size=16",
        "data.batch_size=32",
        "data.eval_batch_size=16",
        "data.max_train_samples=300",
        "method.width=8",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        "logger.wandb.enabled=false",
        "callbacks.images.enabled=false",
        "callbacks.linear_probe.enabled=false",
        "callbacks.clustering.enabled=false",
        "callbacks.embedding_plot.enabled=false",
        "callbacks.knn.k=[5,20]",
        "run_id=ddp",
        cwd=tmp_path,
        env=env,
    )
    run_dir = tmp_path / "runs" / "ae_digits" / "ddp"
    with open(run_dir / "metrics.csv") as handle:
        (row,) = [r for r in csv.DictReader(handle) if r.get("eval/knn_top1_k5")]
    run_lgen(
        "eval", "knn", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "k=[5,20]", cwd=tmp_path, env=env
    )
    offline = json.loads((run_dir / "eval" / "last" / "knn.json").read_text())
    assert offline["results"]["top1_k5"] == pytest.approx(float(row["eval/knn_top1_k5"]), abs=1e-6)
    assert offline["results"]["top1_k20"] == pytest.approx(float(row["eval/knn_top1_k20"]), abs=1e-6)
