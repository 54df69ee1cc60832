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
        "features": feats.features, "labels": feats.labels, "indices": feats.indices,
        "knn": knn_accuracy(x[:25], y[:25], x[25:], y[25:], 3, KNNConfig(k=[3, 10])),
        "probe": linear_probe(x[:25], y[:25], x[25:], y[25:], 3, ProbeConfig(optimizer="lbfgs", weight_decay=1e-3)),
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
