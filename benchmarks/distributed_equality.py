"""One process vs W DDP ranks vs W FSDP ranks: the same losses, gradients and weights, or the report says where not.

MAE (ViT), DINO (ViT student and teacher: momentum update, centre, per-parameter gradient clipping) and
the diffusion method (ddpm preset: U-Net and its EMA copy; flow preset with a DiT) train for three
optimizer steps on one global batch of 8 images, once
on one process and once with each strategy on W ranks, each rank on its 8 / W rows. Everything random
in a step (MAE's masks, DINO's views, the diffusion times and noise) is drawn for the whole global batch and
sliced, so every setup sees the same numbers. A tensor agrees when it is within ``--rtol`` of its
largest entry: FSDP sums gradients with a reduce-scatter, DDP with an all-reduce and one process over
the whole batch, so float32 agrees to its last bits, not bitwise.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/distributed_equality.py --device cuda
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/distributed_equality.py --device cpu

Rank 0 prints one table (largest scaled difference per method and pair) and the exit code is 1 when a
pair is off. ``tests/test_fsdp.py`` runs the same comparison on 2 gloo processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH, STEPS, KINDS = 8, 3, ("mae", "dino", "ddpm", "dit")


def build(kind: str):
    """A tiny method, identical in every process (seeded); plain SGD, so weights are linear in gradients."""
    from lightning_gen.data.views import CropConfig, ViewsConfig
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.diffusion import Diffusion, DiffusionConfig
    from lightning_gen.methods.ssl.dino import DINO, DINOConfig
    from lightning_gen.methods.ssl.mae import MAE, MAEConfig
    from lightning_gen.nets.backbones import BackboneConfig
    from lightning_gen.nets.dit import DiTConfig

    torch.manual_seed(0)
    data = DataInfo(image_size=8, num_classes=3, batch_size=GLOBAL_BATCH)
    vit = BackboneConfig(name="vit", patch_size=4, depth=2, width=16, heads=2)
    sgd = {"optimizer": "sgd", "lr": 1e-2}
    if kind == "mae":
        return MAE(MAEConfig(backbone=vit, decoder_width=16, decoder_depth=1, decoder_heads=2, **sgd), data)
    if kind == "dino":
        views = ViewsConfig(recipe="dino", local_crops=CropConfig(n=2, size=4))
        cfg = DINOConfig(backbone=vit, views=views, out_dim=32, hidden_dim=16, bottleneck_dim=8, **sgd)
        return DINO(cfg, data)
    if kind == "dit":  # the flow preset with a Diffusion Transformer
        dit = DiTConfig(patch_size=4, depth=2, width=16, heads=2)
        cfg = DiffusionConfig(process="flow", prediction="v", net="dit", dit=dit, dropout=0.0, **sgd)
        return Diffusion(cfg, data)
    unet = {"width": 8, "mults": (1, 2), "attention_resolutions": (4,), "dropout": 0.0}
    cfg = DiffusionConfig(
        process="vp", prediction="eps", timesteps=20, noise_schedule="linear", **unet, **sgd
    )
    return Diffusion(cfg, data)  # the ddpm preset, tiny


def draws(kind: str, step: int) -> dict:
    """Everything random in one step, drawn for the whole global batch."""
    from lightning_gen.methods.ssl.pretext import random_patch_mask

    g = torch.Generator().manual_seed(100 + step)
    batch = {
        "image": torch.randint(0, 256, (GLOBAL_BATCH, 1, 8, 8), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
    }
    if kind == "mae":
        return {"batch": batch, "mask": random_patch_mask(GLOBAL_BATCH, 4, 0.75, generator=g)}
    if kind == "dino":
        return {
            "batch": batch,
            "views": [torch.randn(GLOBAL_BATCH, 1, s, s, generator=g) for s in (8, 8, 4, 4)],
        }
    t = (
        torch.randint(0, 20, (GLOBAL_BATCH,), generator=g)
        if kind == "ddpm"
        else torch.rand(GLOBAL_BATCH, generator=g)
    )
    return {"batch": batch, "noise": (t, torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g))}


def use_draws(method, kind: str, drawn: dict, rows: slice, device) -> dict:
    """Hand this process its rows of the step's draws (in place of the method's own random draws);
    returns its rows of the batch."""
    mine = lambda t: t[rows].to(device)  # noqa: E731
    if kind == "mae":
        keep, mask = drawn["mask"]
        method.draw_mask = lambda n, device: (mine(keep), mine(mask))
        method.augment = lambda x: x  # its crop and flip are per-sample draws of each rank's own stream
    elif kind == "dino":
        method.make_views = lambda batch: [mine(v) for v in drawn["views"]]
        method.progress = lambda: None  # its schedules read the Trainer's progress, which this loop has not
        method.teacher_temp_at = lambda progress: 0.04
    elif kind == "ddpm":
        step, z = (mine(d) for d in drawn["noise"])
        method.draw_noise = lambda x: (method.process.at_step(step), step, z)
    else:
        t, z = (mine(d) for d in drawn["noise"])
        method.draw_noise = lambda x: (method.process.coefficients(t), method.process.network_time(t), z)
    return {k: mine(v) for k, v in drawn["batch"].items()}


class TrainingStep(nn.Module):
    """What Lightning's DDP wraps: forward = the method's training_step."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, batch, index):
        return self.method.training_step(batch, index)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a sharded DTensor gathered)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def train(kind: str, setup: str, device: str = "cpu") -> dict:
    """STEPS optimizer steps of ``kind`` as ``setup`` (single | fsdp | ddp): the losses (mean over
    ranks), the first step's gradients and the final weights and buffers."""
    from lightning_gen.methods.base import ema_update
    from lightning_gen.sharding import shard_method

    method = build(kind).to(device)
    world, rank = (dist.get_world_size(), dist.get_rank()) if setup != "single" else (1, 0)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    if setup == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        shard_method(method, init_device_mesh(torch.device(device).type, (world,)))
        step_fn = method.training_step
    elif setup == "ddp":
        step_fn = nn.parallel.DistributedDataParallel(TrainingStep(method))
    else:
        step_fn = method.training_step
    optimizer = method.configure_optimizers()
    losses, grads = [], []
    for step in range(STEPS):
        loss = step_fn(use_draws(method, kind, draws(kind, step), rows, device), step)
        loss.backward()
        method.on_before_optimizer_step(optimizer)  # DINO: per-parameter clipping, frozen last layer
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
        losses.append(mean_loss.cpu() / world)
        if step == 0:  # later steps' gradients show in the final weights (SGD: linear in them)
            grads.append({n: full(p.grad) for n, p in method.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
        if kind == "dino":
            for online, target in method.momentum_pairs():
                ema_update(target, online, 0.9)
        elif kind in ("ddpm", "dit"):
            method.update_ema()
    weights = {n: full(t) for n, t in [*method.named_parameters(), *method.named_buffers()]}
    return {"losses": torch.stack(losses), "grads": grads, "weights": weights}


def differences(a: dict, b: dict) -> dict[str, float]:
    """Largest |a - b| / max|b| per tensor (losses, first gradients, final weights); a missing tensor is inf."""
    out: dict[str, float] = {}

    def diff(name, x, y):
        if not (x.is_floating_point() and y.is_floating_point()):
            out[name] = 0.0 if torch.equal(x, y) else float("inf")
            return
        scale = float(y.abs().max()) or 1.0
        out[name] = float((x - y).abs().max()) / scale if x.shape == y.shape else float("inf")

    diff("losses", a["losses"], b["losses"])
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        for name in ga.keys() | gb.keys():
            both = name in ga and name in gb
            out[f"gradient of {name} at step {step}"] = float("inf") if not both else 0.0
            if both:
                diff(f"gradient of {name} at step {step}", ga[name], gb[name])
    for name in a["weights"].keys() | b["weights"].keys():
        if name in a["weights"] and name in b["weights"]:
            diff(f"final {name}", a["weights"][name], b["weights"][name])
        else:
            out[f"final {name}"] = float("inf")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rtol", type=float, default=1e-5, help="of each tensor's largest entry")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    if args.device == "cuda":  # full float32 in every setup: TF32 would hide the sums' order in its rounding
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    # The one-process reference first, before the process group exists (DINO's centre is all-reduced
    # whenever one does)
    singles = {k: train(k, "single", device) for k in KINDS} if int(os.environ.get("RANK", 0)) == 0 else {}
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    world, failed = dist.get_world_size(), False
    try:
        results = {(k, s): train(k, s, device) for k in KINDS for s in ("fsdp", "ddp")}
        if dist.get_rank() == 0:
            print(f"# {world} rank(s) on {args.device}: largest difference, relative to each tensor's scale")
            print("| method | FSDP vs DDP | FSDP vs 1 process | DDP vs 1 process | worst tensor | result |")
            print("|---|---|---|---|---|---|")
            for kind in KINDS:
                single = singles[kind]
                pairs = {
                    "FSDP vs DDP": differences(results[kind, "fsdp"], results[kind, "ddp"]),
                    "FSDP vs 1 process": differences(results[kind, "fsdp"], single),
                    "DDP vs 1 process": differences(results[kind, "ddp"], single),
                }
                worst = {pair: max(d.values()) for pair, d in pairs.items()}
                name = max(pairs["FSDP vs 1 process"], key=pairs["FSDP vs 1 process"].get)
                ok = all(w <= args.rtol for w in worst.values())
                failed |= not ok
                cells = " | ".join(f"{w:.1e}" for w in worst.values())
                print(f"| {kind} | {cells} | {name} | {'passed' if ok else f'FAILED (> {args.rtol})'} |")
    finally:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
