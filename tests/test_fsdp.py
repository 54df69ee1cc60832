"""Sharded training (``trainer.strategy=fsdp``: FSDP2 under Lightning's ModelParallelStrategy) on gloo CPU processes.

- Direct: MAE (ViT), DINO (ViT student and teacher: momentum update, centre, per-parameter clipping)
  and diffusion (ddpm preset: U-Net and its EMA copy; flow preset with a DiT), three optimizer steps
  on a global batch of 8, trained by one process, by 2 FSDP ranks and by 2 DDP ranks. Losses, every
  gradient and the final weights (the teacher and EMA copies included) of FSDP equal DDP's within 1e-6
  and one process's within 1e-5 of each tensor's scale (float32 sums in another order). The FID
  callback's samples of the sharded DDPM, on ranks that make 2 and 1 sample() calls, equal one
  process's.
- Through the CLI: ``lgen train experiment=mae_digits trainer.strategy=fsdp trainer.devices=2`` trains
  whole epochs with validation and image grids, is stopped mid-epoch and resumed, and then equals an
  uninterrupted DDP run bitwise (every logged loss, every weight, the optimizer state); its
  checkpoint exports.
"""

from __future__ import annotations

import csv
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.distributed_equality import KINDS, STEPS, build, differences, train


class Pixels(nn.Flatten):
    """A stand-in FID feature extractor: the pixels themselves (this test is about who samples what)."""

    num_features = 64


def fid_features(world: int, rank: int, run_dir: str) -> torch.Tensor:
    """The FID callback's features of 3 samples generated one per call by the tiny DDPM: 2 calls on
    rank 0, 1 on rank 1 (``seeded_sampling.call_ranges``). Sharded, every call is a collective."""
    from lightning_gen.callbacks.fid import FID, FIDConfig
    from lightning_gen.sharding import shard_method

    method = build("ddpm")
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        shard_method(method, init_device_mesh("cpu", (world,)))
    fid = FID(FIDConfig(num_samples=3, batch_size=1, metrics=["fid"]), run_dir)
    fid.use_extractor(Pixels(), "pixels", "pixels")
    features, _ = fid.generate_features(method, world, rank)
    if world == 1:
        return features
    shares = [None] * world
    dist.all_gather_object(shares, features)
    return torch.cat(shares)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    # a rank waiting for a collective that never comes fails after a minute instead of hanging the suite
    init = f"file://{init_file}"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        results = {(kind, setup): train(kind, setup) for kind in KINDS for setup in ("fsdp", "ddp")}
        results["fid"] = fid_features(world, rank, out_dir)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def assert_close(a: dict, b: dict, rtol: float, what: str) -> None:
    """Losses, first gradients and final weights equal within ``rtol`` of each tensor's largest entry."""
    found = differences(a, b)
    off = {name: d for name, d in found.items() if d > rtol}
    assert not off, f"{what}: {off}"
    assert any(name.startswith("gradient of") for name in found)


@pytest.mark.ddp
def test_fsdp_losses_gradients_and_momentum_copies_equal_ddp_and_one_process(tmp_path):
    """The comparison of benchmarks/distributed_equality.py (which the GPU check runs on NCCL) on 2 gloo processes."""
    warnings.filterwarnings("ignore")
    single = {kind: train(kind, "single") for kind in KINDS}
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "results.pt", weights_only=False)
    for kind in KINDS:
        fsdp, ddp = sharded[kind, "fsdp"], sharded[kind, "ddp"]
        # FSDP reduces gradients with a reduce-scatter, DDP with an all-reduce, and DINO's clipping sums each
        # gradient's norm shard by shard: the same numbers up to the last bits
        assert_close(fsdp, ddp, rtol=1e-6, what=f"{kind} FSDP vs DDP")
        assert_close(fsdp, single[kind], rtol=1e-5, what=f"{kind} FSDP vs one process")
        # the steps trained: the losses moved, and the teacher / EMA copy moved away from its start
        assert not torch.equal(fsdp["losses"][0], fsdp["losses"][-1])
    # the FID callback's samples, sharded over 2 ranks that make 2 and 1 sample() calls, equal one process's
    torch.testing.assert_close(sharded["fid"], fid_features(1, 0, str(tmp_path)), rtol=1e-4, atol=1e-5)
    dino, ddpm = sharded["dino", "fsdp"]["weights"], sharded["ddpm", "fsdp"]["weights"]
    start = build("dino").state_dict()
    teacher = [n for n in dino if n.startswith("teacher_backbone.blocks.0.")]
    assert teacher and not all(torch.equal(dino[n], start[n]) for n in teacher)
    assert int(ddpm["ema_updates"]) == STEPS
    assert not torch.equal(ddpm["ema.stem.weight"], ddpm["net.stem.weight"])


# ------------------------------------------------------------------------------ through lgen train


TINY = [
    "data.image_size=16",
    "data.batch_size=32",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "logger.wandb.enabled=false",
    "callbacks.images.every_n_epochs=1",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
]


@pytest.mark.ddp
def test_lgen_train_mae_sharded_on_two_processes_resumes_bitwise_equal_to_ddp_and_exports(lgen, tmp_path):
    from lightning_gen.cli import main
    from lightning_gen.nets.vit import VisionTransformer
    from tests.conftest import lgen_env
    from tests.test_randomness import assert_same_training, checkpoint

    env = lgen_env(OMP_NUM_THREADS="1")
    args = ["train", "experiment=mae_digits", *TINY]
    runs = lgen.cwd / "runs" / "mae_digits"
    lgen(*args, "trainer.strategy=ddp", "run_id=ddp", env=env)
    lgen(*args, "trainer.strategy=fsdp", "run_id=fsdp", "callbacks.stop_after.steps=4", env=env)
    assert checkpoint(runs / "fsdp")["global_step"] == 4  # stopped mid-epoch 1, after epoch 0's validation
    resumed = lgen(*args, "trainer.strategy=fsdp", "run_id=fsdp", env=env)
    assert "resuming from" in resumed.stdout + resumed.stderr

    # The interrupted sharded run equals the uninterrupted DDP run: every logged loss, weight and optimizer state.
    assert_same_training(runs / "ddp", runs / "fsdp")
    sharded, ddp = checkpoint(runs / "fsdp"), checkpoint(runs / "ddp")
    for got, want in zip(sharded["optimizer_states"], ddp["optimizer_states"]):
        assert got["state"].keys() == want["state"].keys()  # numbered as a plain optimizer numbers them
        for key, state in got["state"].items():
            assert all(torch.equal(state[k], want["state"][key][k]) for k in state)
    # whole epochs with validation, and the grids that every rank drew together
    with open(runs / "fsdp" / "metrics.csv") as handle:
        validated = {r["epoch"] for r in csv.DictReader(handle) if r.get("val/loss")}
    assert validated == {"0", "1"}
    grids = {p.name.split("_epoch")[1] for p in (runs / "fsdp" / "samples").glob("*.png")}
    assert {"000_step000003.png", "001_step000006.png"} <= grids, grids

    out = tmp_path / "encoder.pt"
    assert (
        main(["export", "backbone", f"ckpt={runs / 'fsdp' / 'checkpoints' / 'last.ckpt'}", f"out={out}"]) == 0
    )
    encoder = VisionTransformer(16, 4, 1, width=96, depth=4, heads=3)
    encoder.load_state_dict(torch.load(out, weights_only=True))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, sharded["state_dict"][f"encoder.{name}"])
