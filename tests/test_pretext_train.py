"""Every pretext method trains through the real CLI (`lgen train`), on one process and with 2-process DDP.

Single process: all six methods (colorization as split-brain, inpainting with the adversarial
loss and random masks, so the less common paths run too; these two also log to an offline W&B
run). The checkpoint is reloaded with ``load_method`` and embeds images; colorization, inpainting
and MAE leave image grids in samples/ (and in the W&B run's media).

DDP (gloo, 2 CPU processes; ~40-60 s each, so only where cross-process state exists):
jigsaw (the permutation set must be the same on every rank: the method checks it and the test
compares it with the seeded recomputation), colorization (the ab prior is summed over ranks: the
checkpoint must have counted the pixels of both processes), MAE (per-rank random masking under DDP).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lightning_gen.methods.base import load_method
from lightning_gen.methods.ssl.pretext import maximal_hamming_permutations
from tests.conftest import FAST

SMALL = ["method.backbone.conv_width=8", "method.backbone.conv_dim=32"]
CASES = {
    "rotation": ["experiment=rotation_digits", *SMALL],
    "relative_patch": ["experiment=relative_patch_digits", "data.image_size=24", *SMALL],
    "jigsaw": ["experiment=jigsaw_digits", "data.image_size=24", "method.num_permutations=20", *SMALL],
    "split_brain": ["experiment=split_brain_digits", *SMALL],
    "inpainting": ["experiment=inpainting_digits", "method.adversarial=true", "method.mask=random", *SMALL],
    "mae": ["experiment=mae_digits", "method.backbone.depth=2", "method.decoder_depth=1"],
}
GRIDS = {"split_brain": "colorized", "inpainting": "inpainted", "mae": "reconstruction"}
WANDB_OFFLINE = ["logger.wandb.enabled=true", "logger.wandb.mode=offline"]  # after FAST, which disables it


def metrics(run_dir) -> dict[str, list[float]]:
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def check_run(run_dir, image_size: int) -> torch.nn.Module:
    logged = metrics(run_dir)
    assert (
        logged["val/probe_acc"]
        and logged["val/loss"]
        and all(map(torch.isfinite, map(torch.tensor, logged["val/loss"])))
    )
    method = load_method(str(run_dir / "checkpoints" / "last.ckpt"))
    images = torch.randint(0, 256, (4, method.data_info.channels, image_size, image_size), dtype=torch.uint8)
    features = method.embed_images(images)
    assert features.ndim == 2 and len(features) == 4 and torch.isfinite(features).all()
    return method


@pytest.mark.parametrize("name", list(CASES))
def test_trains_single_process(lgen, name):
    args = CASES[name]
    experiment = args[0].split("=")[1]
    with_wandb = WANDB_OFFLINE if name in ("split_brain", "inpainting") else []
    lgen("train", *FAST, *args, *with_wandb, "run_id=single")
    run_dir = lgen.cwd / "runs" / experiment / "single"
    size = next((int(a.split("=")[1]) for a in reversed(args) if a.startswith("data.image_size=")), 16)
    method = check_run(run_dir, size)
    if name in GRIDS:
        grids = list((run_dir / "samples").glob("*.png"))
        assert grids and GRIDS[name] in grids[0].name
    if with_wandb:  # the same grid went to the (offline) W&B run as an image
        assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    if name == "jigsaw":
        saved = json.loads((run_dir / "jigsaw_permutations.json").read_text())
        assert torch.equal(torch.tensor(saved["permutations"]), method.permutations)
        assert torch.equal(method.permutations, maximal_hamming_permutations(20, 9, 0))


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["jigsaw", "colorization", "mae"])
def test_trains_with_two_ddp_processes(lgen, name):
    args = {**CASES, "colorization": ["experiment=colorization_digits", *SMALL]}[name]
    experiment = args[0].split("=")[1]
    lgen("train", *FAST, *args, "trainer.devices=2", "trainer.accelerator=cpu", "run_id=ddp")
    run_dir = lgen.cwd / "runs" / experiment / "ddp"
    size = 24 if name == "jigsaw" else 16
    method = check_run(run_dir, size)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    if name == "jigsaw":
        saved = json.loads((run_dir / "jigsaw_permutations.json").read_text())
        assert torch.equal(torch.tensor(saved["permutations"]), maximal_hamming_permutations(20, 9, 0))
        assert torch.equal(checkpoint["state_dict"]["permutations"], maximal_hamming_permutations(20, 9, 0))
    if name == "colorization":
        per_device_batch = 32
        pixels_both_ranks = checkpoint["global_step"] * 2 * per_device_batch * size * size
        assert float(method.ab_counts.sum()) == pytest.approx(pixels_both_ranks, rel=1e-4)
