"""Sharded training (``trainer.strategy=fsdp``: FSDP2 under Lightning's ModelParallelStrategy) on gloo CPU processes.

- Direct: MAE (ViT), DINO (ViT student and teacher: momentum update, centre, per-parameter clipping)
  and DDPM (U-Net and its EMA copy), three optimizer steps on a global batch of 8, trained by one
  process, by 2 FSDP ranks and by 2 DDP ranks. Losses, every gradient and the final weights (the
  teacher and EMA copies included) of FSDP equal DDP's within 1e-6 and one process's within 1e-5 of
  each tensor's scale (float32 sums in another order).
- Through the CLI: ``lgen train experiment=mae_digits trainer.strategy=fsdp trainer.devices=2`` trains
  whole epochs with validation and image grids, is stopped mid-epoch and resumed, and then equals an
  uninterrupted DDP run bitwise (every logged loss, every weight, the optimizer state); its
  checkpoint exports.
"""

from __future__ import annotations

import csv
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

GLOBAL_BATCH, STEPS, KINDS = 8, 3, ("mae", "dino", "ddpm")


# ------------------------------------------------------------------------------ the direct comparison


def build(kind: str):
    """A tiny method, identical in every process (seeded)."""
    from lightning_gen.data.views import CropConfig, ViewsConfig
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.ddpm import DDPM, DDPMConfig
    from lightning_gen.methods.ssl.dino import DINO, DINOConfig
    from lightning_gen.methods.ssl.mae import MAE, MAEConfig
    from lightning_gen.nets.backbones import BackboneConfig

    torch.manual_seed(0)
    data = DataInfo(image_size=8, num_classes=3, batch_size=GLOBAL_BATCH)
    vit = BackboneConfig(name="vit", patch_size=4, depth=2, width=16, heads=2)
    if kind == "mae":
        cfg = MAEConfig(
            backbone=vit, decoder_width=16, decoder_depth=1, decoder_heads=2, optimizer="sgd", lr=1e-2
        )
        return MAE(cfg, data)
    if kind == "dino":
        views = ViewsConfig(recipe="dino", local_crops=CropConfig(n=2, size=4))
        cfg = DINOConfig(
            backbone=vit, views=views, out_dim=32, hidden_dim=16, bottleneck_dim=8, optimizer="sgd", lr=1e-2
        )
        return DINO(cfg, data)
    cfg = DDPMConfig(
        width=8, mults=(1, 2), attention_resolutions=(4,), dropout=0.0, timesteps=20, optimizer="sgd", lr=1e-2
    )
    return DDPM(cfg, data)


def draws(kind: str, step: int) -> dict:
    """Everything random in one step, drawn for the whole global batch (so every setup sees the same)."""
    from lightning_gen.methods.ssl.pretext import random_patch_mask

    g = torch.Generator().manual_seed(100 + step)
    batch = {
        "image": torch.randint(0, 256, (GLOBAL_BATCH, 1, 8, 8), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
    }
    if kind == "mae":
        return {"batch": batch, "mask": random_patch_mask(GLOBAL_BATCH, 4, 0.75, generator=g)}
    if kind == "dino":
        views = [torch.randn(GLOBAL_BATCH, 1, s, s, generator=g) for s in (8, 8, 4, 4)]
        return {"batch": batch, "views": views}
    t = torch.randint(0, 20, (GLOBAL_BATCH,), generator=g)
    return {"batch": batch, "noise": (t, torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g))}


def use_draws(method, kind: str, drawn: dict, rows: slice) -> dict:
    """Hand this process its rows of the step's draws; returns its rows of the batch."""
    import lightning_gen.methods.ssl.mae as mae

    if kind == "mae":
        keep, mask = drawn["mask"]
        mae.random_patch_mask = lambda n, length, ratio, device=None, generator=None: (keep[rows], mask[rows])
    elif kind == "dino":
        method.make_views = lambda batch: [v[rows] for v in drawn["views"]]
        method.teacher_temp_at = lambda step: 0.04  # its schedule reads the Trainer, which this loop has not
    else:
        method.draw_noise = lambda x0: tuple(d[rows] for d in drawn["noise"])
    return {k: v[rows] for k, v in drawn["batch"].items()}


class TrainingStep(nn.Module):
    """What Lightning's DDP wraps: forward = the method's training_step."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, batch, index):
        return self.method.training_step(batch, index)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(kind: str, setup: str) -> dict:
    """STEPS optimizer steps of ``kind`` as ``setup`` (single | fsdp | ddp): the losses (mean over ranks), the
    first step's gradients and the final weights and buffers."""
    from lightning_gen.methods.base import ema_update
    from lightning_gen.sharding import shard_method

    method = build(kind)
    world, rank = (dist.get_world_size(), dist.get_rank()) if setup != "single" else (1, 0)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    if setup == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        shard_method(method, init_device_mesh("cpu", (world,)))
        step_fn = method.training_step
    elif setup == "ddp":
        step_fn = nn.parallel.DistributedDataParallel(TrainingStep(method))
    else:
        step_fn = method.training_step
    optimizer = method.configure_optimizers()
    losses, grads = [], []
    for step in range(STEPS):
        loss = step_fn(use_draws(method, kind, draws(kind, step), rows), step)
        loss.backward()
        method.on_before_optimizer_step(optimizer)  # DINO: per-parameter clipping, frozen last layer
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
        losses.append(mean_loss / world)
        if step == 0:  # later steps' gradients show in the final weights (SGD: linear in them)
            grads.append({n: full(p.grad) for n, p in method.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
        if kind == "dino":
            for online, target in method.momentum_pairs():
                ema_update(target, online, 0.9)
        elif kind == "ddpm":
            method.update_ema()
    weights = {n: full(t) for n, t in [*method.named_parameters(), *method.named_buffers()]}
    return {"losses": torch.stack(losses), "grads": grads, "weights": weights}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {(kind, setup): train(kind, setup) for kind in KINDS for setup in ("fsdp", "ddp")}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def assert_same(a: dict, b: dict, rtol: float, what: str) -> None:
    """Losses, first gradients and final weights equal within ``rtol`` of each tensor's largest entry."""

    def same(x, y, name):
        scale = float(y.abs().max()) if y.numel() and y.is_floating_point() else 0.0
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {name}: {m}")

    same(a["losses"], b["losses"], "losses")
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        assert sorted(ga) == sorted(gb), f"{what}: parameters with gradients at step {step}"
        for name in ga:
            same(ga[name], gb[name], f"gradient of {name} at step {step}")
    assert sorted(a["weights"]) == sorted(b["weights"])
    for name in a["weights"]:
        same(a["weights"][name], b["weights"][name], f"final {name}")


@pytest.mark.ddp
def test_fsdp_losses_gradients_and_momentum_copies_equal_ddp_and_one_process(tmp_path):
    warnings.filterwarnings("ignore")
    single = {kind: train(kind, "single") for kind in KINDS}
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "results.pt", weights_only=False)
    for kind in KINDS:
        fsdp, ddp = sharded[kind, "fsdp"], sharded[kind, "ddp"]
        # FSDP reduces gradients with a reduce-scatter, DDP with an all-reduce, and DINO's clipping sums each
        # gradient's norm shard by shard: the same numbers up to the last bits
        assert_same(fsdp, ddp, rtol=1e-6, what=f"{kind} FSDP vs DDP")
        assert_same(fsdp, single[kind], rtol=1e-5, what=f"{kind} FSDP vs one process")
        # the steps trained: the losses moved, and the teacher / EMA copy moved away from its start
        assert not torch.equal(fsdp["losses"][0], fsdp["losses"][-1])
    dino, ddpm = sharded["dino", "fsdp"]["weights"], sharded["ddpm", "fsdp"]["weights"]
    start = build("dino").state_dict()
    teacher = [n for n in dino if n.startswith("teacher_backbone.blocks.0.")]
    assert teacher and not all(torch.equal(dino[n], start[n]) for n in teacher)
    assert int(ddpm["ema_updates"]) == STEPS and not torch.equal(
        ddpm["ema.stem.weight"], ddpm["net.stem.weight"]
    )


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
