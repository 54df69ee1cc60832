"""Evaluation under real DDP (gloo processes) gives one process's results, for world sizes that do
not divide the work.

- 4 spawned processes run the evaluation callbacks as the Trainer calls them: linear probe, kNN and
  clustering of a tiny VAE's features on digits, and FID, KID, IS, precision/recall/density/coverage
  and memorisation of its samples (a fixed random conv net as the extractor; the held-out split
  extracted over the 4 shards too). 150 digits -> 135 train / 15 val images in eval batches of 4: DistributedSampler
  pads both splits and every rank ends with a partial batch. 30 samples in calls of at most 20
  were 2 calls for 4 ranks under the old dealing (which crashed); 3 samples leave rank 0 without any.
- `lgen train` on 3 processes with the FID callback (40 samples in calls of 20: fewer than the ranks
  under the old dealing) and the kNN callback: FID within 1e-9 and KID bitwise of one process's
  computation on the checkpoint, kNN equal to a 1-process `lgen eval knn`.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.conftest import start_gloo_workers

WORLD = 4
PRELOAD = (  # what the workers import, loaded once for all of them (tests.conftest.start_gloo_workers)
    "lightning_gen.callbacks.clustering",
    "lightning_gen.callbacks.fid",
    "lightning_gen.callbacks.knn",
    "lightning_gen.callbacks.linear_probe",
    "lightning_gen.data.digits",
    "lightning_gen.methods.generative.vae",
    "sklearn.datasets",
)
FID_SETTINGS = dict(  # 3 parts for IS and 2-NN balls: enough for the 7 or 8 samples a rank has
    num_samples=30, batch_size=20, kid_subsets=5, kid_subset_size=25, is_splits=3, prdc_k=2
)


def build():
    from lightning_gen.data.digits import DigitsConfig, DigitsDataModule
    from lightning_gen.eval.fid_extractor import DomainFeatureNet
    from lightning_gen.methods.generative.vae import VAE, VAEConfig

    data = DigitsDataModule(
        DigitsConfig(name="digits", image_size=8, max_train_samples=150, eval_batch_size=4)
    )
    data.setup()
    torch.manual_seed(0)
    vae = VAE(VAEConfig(width=4, latent_dim=4), data.info)
    torch.manual_seed(1)
    extractor = DomainFeatureNet(1, 8, 10, width=4).eval()  # a fixed random conv net
    return data, vae, extractor


def evaluate(world: int, rank: int, run_dir: str) -> dict:
    """What each rank's evaluation callbacks compute at an epoch end (a collective on every rank)."""
    from lightning_gen.callbacks.clustering import Clustering, ClusteringConfig
    from lightning_gen.callbacks.fid import FID, FIDConfig
    from lightning_gen.callbacks.knn import KNN, KNNCallbackConfig
    from lightning_gen.callbacks.linear_probe import LinearProbe, LinearProbeConfig

    torch.set_num_threads(1)  # every process (and the 1-process reference) with the same kernels
    data, vae, extractor = build()
    trainer = SimpleNamespace(global_step=0, datamodule=data)  # the Trainer attributes these callbacks read
    out = {}
    for callback in (
        LinearProbe(LinearProbeConfig(), run_dir),
        KNN(KNNCallbackConfig(k=[3, 10]), run_dir),
        Clustering(ClusteringConfig(n_init=2), run_dir),
    ):
        out.update(callback.evaluate(trainer, vae))
    out["train_indices"] = trainer.lgen_feature_cache["train"].indices
    out["train_features"] = trainer.lgen_feature_cache["train"].features

    fid = FID(FIDConfig(**FID_SETTINGS), run_dir)
    fid.use_extractor(extractor, "digits", "random")
    held_out = fid.extract(data.eval_dataloader("test"), "cpu")  # memorisation's threshold
    fid.set_reference(fid.extract(data.eval_dataloader("train"), "cpu"), "cpu", held_out)
    out["real"] = fid.real.features
    out["fake"] = fid.generate_features(vae, world, rank)[0]  # this rank's share
    out["fid"] = fid.measure(vae, world, rank)
    out["metric_names"] = fid.metric_names
    # 3 samples: features that agree to rounding only (below); FID and KID, whose values move smoothly
    fid.metrics = [m for m in fid.metrics if m.name in ("fid", "kid")]
    fid.cfg.num_samples = 3
    out["fid_3_samples"] = fid.measure(vae, world, rank)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(evaluate(world, rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_four_processes_run_the_evaluation_callbacks_and_equal_one_process(tmp_path):
    threads = torch.get_num_threads()
    try:
        single = evaluate(1, 0, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert single["train_indices"].tolist() == list(range(135))
    assert single["metric_names"] == [
        "fid",
        "kid",
        "is",
        "prdc",
        "memorization",
    ]  # all an unconditional model allows
    # untrained samples differ from digits: FID is of the order of the features' variance, not 0
    assert single["fid"]["val/fid_digits"] > 0.5 * float(single["real"].var(0).sum())

    start_gloo_workers(_worker, WORLD, str(tmp_path / "init"), str(tmp_path), preload=(__name__, *PRELOAD))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [len(r["fake"]) for r in ranks] == [7, 8, 7, 8]  # balanced, in sample order
    assert torch.equal(torch.cat([r["fake"] for r in ranks]), single["fake"])  # the same samples
    for got in ranks:
        assert got["train_indices"].tolist() == list(range(135)), "padding duplicate kept or a sample lost"
        assert torch.equal(got["train_features"], single["train_features"])
        assert torch.equal(got["real"], single["real"])  # real FID features extracted over 4 shards
        for key in ("probe_top1", "probe_top5", "knn_top1_k3", "knn_top1_k10", "cluster_nmi", "cluster_ari"):
            assert got[key] == single[key], key
        assert got["fid"]["val/fid_digits"] == pytest.approx(single["fid"]["val/fid_digits"], rel=1e-9)
        for key, value in single["fid"].items():  # gathered in sample order: bitwise one process's
            if key != "val/fid_digits":
                assert got["fid"][key] == value, key
        # 3 samples on 4 ranks: rank 0 has none and the others generate one each. A batch of one
        # runs other CPU kernels (matrix-vector) than the batch of three of one process, so the
        # features, hence the values, agree to rounding rather than bitwise.
        for key, value in got["fid_3_samples"].items():
            assert value == pytest.approx(single["fid_3_samples"][key], rel=1e-5), key


@pytest.mark.ddp
def test_three_process_training_with_fid_and_knn_equals_one_process(tmp_path):
    """`lgen train` on 3 gloo processes with FID on 40 samples in calls of 20 (under the old dealing
    rank 2 had none, and the run died) and kNN: the values equal one process's on the checkpoint.

    312 digits -> 47 val and 265 train images: neither divides by 3, so DistributedSampler pads both,
    and eval batches of 16 leave partial batches on every rank."""
    import csv

    from lightning_gen import registry
    from lightning_gen.callbacks.fid import FID, FIDConfig
    from lightning_gen.config import from_saved, section_object
    from lightning_gen.eval.fid_extractor import DomainFeatureNet, load_extractor, save_extractor
    from lightning_gen.methods.base import DataInfo, load_method
    from tests.conftest import lgen_env, run_lgen

    torch.manual_seed(1)
    extractor_path = tmp_path / "extractor.pt"  # a fixed random conv net in the extractor file format
    info = DataInfo(name="digits", channels=1, image_size=16, num_classes=10)
    save_extractor(DomainFeatureNet(1, 16, 10, width=4), info, 4, 0.0, extractor_path)
    fid_settings = dict(num_samples=40, batch_size=20, kid_subsets=3, metrics=["fid", "kid"])
    env = lgen_env(OMP_NUM_THREADS="1")
    run_lgen(
        "train",
        "experiment=vae_digits",
        "trainer.devices=3",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "data.image_size=16",
        "data.batch_size=32",
        "data.eval_batch_size=16",
        "data.max_train_samples=312",
        "method.width=8",
        "method.latent_dim=4",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        "logger.wandb.enabled=false",
        "callbacks.images.enabled=false",
        "callbacks.fid.every_n_epochs=1",
        f"callbacks.fid.domain_extractor_path={extractor_path}",
        *[f"callbacks.fid.{k}={v}" for k, v in fid_settings.items() if k != "metrics"],
        "callbacks.fid.metrics=[fid,kid]",
        "callbacks.knn.k=[5,20]",
        "run_id=ddp",
        cwd=tmp_path,
        env=env,
    )
    run_dir = tmp_path / "runs" / "vae_digits" / "ddp"
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    logged = json.loads((run_dir / "fid" / "epoch000.json").read_text())
    assert logged["world_size"] == 3 and logged["num_samples"] == 40 and logged["num_real"] == 265
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each training process
    try:
        method = load_method(str(ckpt)).to(memory_format=torch.channels_last)  # as `lgen train` built it
        data = registry.build("data", section_object(from_saved(run_dir / "config.yaml").data))
        data.setup()
        fid = FID(FIDConfig(**fid_settings), run_dir)
        fid.use_extractor(load_extractor(extractor_path)[0], "digits", "random")
        fid.set_reference(fid.extract(data.eval_dataloader("train"), "cpu"), "cpu")
        single = fid.measure(method)
    finally:
        torch.set_num_threads(threads)
    assert logged["results"]["val/fid_digits"] == pytest.approx(single["val/fid_digits"], rel=1e-9)
    assert logged["results"]["val/kid_digits"] == single["val/kid_digits"]  # bitwise
    assert logged["results"]["val/kid_digits_std"] == single["val/kid_digits_std"]

    with open(run_dir / "metrics.csv") as handle:
        (row,) = [r for r in csv.DictReader(handle) if r.get("eval/knn_top1_k5")]
    run_lgen("eval", "knn", f"ckpt={ckpt}", "k=[5,20]", cwd=tmp_path, env=env)
    offline = json.loads((run_dir / "eval" / "last" / "knn.json").read_text())
    assert offline["results"]["top1_k5"] == pytest.approx(float(row["eval/knn_top1_k5"]), abs=1e-6)
    assert offline["results"]["top1_k20"] == pytest.approx(float(row["eval/knn_top1_k20"]), abs=1e-6)
