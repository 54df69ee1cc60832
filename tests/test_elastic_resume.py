"""Resuming on another allocation (lightning_gen.schedules.training_progress, data.sampler, Method).

- The epoch order of an epoch interrupted on W processes is finished on W' processes: each position of
  the permutation not yet trained on is dealt to exactly one new rank.
- 2 processes -> 1 and 1 -> 2 (real gloo DDP, mid-epoch): the learning rate, DINO's teacher momentum τ
  and teacher temperature continue on the uninterrupted run's curve, within one optimizer step's worth
  of progress; the interrupted epoch trains exactly the batches it has left, then the run goes on; the
  peak LR is rescaled by `lr_scaling` for the new global batch, with a warning naming both.
"""

from __future__ import annotations

import csv

import pytest
import torch

from lightning_gen.data.sampler import EpochSampler, ResumableLoader
from tests.conftest import lgen_env

# 301 digits, 15 % held out for validation -> 256 training images: 8 batches of 32 on one process,
# 4 per process on two. 2 epochs: 16 optimizer steps on one process, 8 on two.
SAMPLES, BATCH, EPOCHS = 256, 32, 2
DINO = [
    "experiment=dino_digits",
    "data.image_size=16",
    f"data.batch_size={BATCH}",
    "data.max_train_samples=301",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "logger.wandb.enabled=false",
    "callbacks.images.enabled=false",
    "method.views.local_crops.n=2",
    "method.lr=1e-3",
    "method.lr_scaling=linear",  # peak LR 1e-3 x global batch / 32
    "method.base_batch_size=32",
    "method.warmup_epochs=1",
    "method.teacher_temp=0.07",  # from 0.04 over 2 epochs
    "method.teacher_temp_warmup_epochs=2",
]
SCHEDULES = ("lr", "train/momentum", "train/teacher_temp")


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 3)])
@pytest.mark.parametrize("old_batch, new_batch", [(4, 4), (4, 3)])
def test_an_interrupted_epoch_is_finished_on_another_world_size_once(old, new, old_batch, new_batch):
    n, epoch = 103, 5
    done_batches = 2
    before = [EpochSampler(range(n), num_replicas=old, rank=r, seed=7) for r in range(old)]
    for sampler in before:
        sampler.set_epoch(epoch)
    order = before[0].order()
    trained = [i for s in before for i in list(s)[: done_batches * old_batch]]
    skip = done_batches * old_batch * old
    assert sorted(trained) == sorted(order[:skip].tolist())  # what the old ranks trained: the first `skip`

    after = [EpochSampler(range(n), num_replicas=new, rank=r, seed=7) for r in range(new)]
    for sampler in after:
        sampler.resume_from(epoch, skip)
        sampler.set_epoch(epoch)
    dealt = [list(s) for s in after]
    assert len({len(d) for d in dealt}) == 1  # every rank gets as many (DDP steps together)
    seen = [i for d in dealt for i in d]
    # the same permutation, trimmed to a multiple of the new world size, less what does not fill all ranks
    permutation = after[0].order()
    assert torch.equal(permutation[:skip], order[:skip])
    left = (len(permutation) - skip) // new * new
    assert len(seen) == len(set(seen)) == left  # each remaining position once
    assert set(seen) == set(permutation[skip : skip + left].tolist())
    assert not set(seen) & set(trained)
    # what ElasticEpochResume counts as left: the whole batches of what each new rank is dealt
    loader = ResumableLoader(range(n), after[0], batch_size=new_batch, drop_last=True)
    assert loader.batches_left(skip) == len(dealt[0]) // new_batch


@pytest.mark.parametrize(
    "epochs, max_steps, accumulate, expected_total",
    [(2, -1, 1, 10), (2, -1, 2, 6), (3, 4, 1, 4), (-1, 7, 2, 7)],  # 5 batches per epoch
)
def test_progress_is_global_step_over_the_planned_steps_on_the_allocation_a_run_started_with(
    tmp_path, epochs, max_steps, accumulate, expected_total
):
    """On an unchanged allocation the shared progress is Lightning's own count: global_step at every
    batch (accumulation included), over estimated_stepping_batches (or max_steps where it ends first)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gen.schedules import training_progress

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.seen = torch.nn.Linear(2, 1), []

        def on_train_batch_start(self, batch, batch_idx):
            progress = training_progress(self.trainer)
            self.seen.append((progress.step, self.global_step, progress.total, progress.steps_per_epoch))

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Recorder()
    trainer = L.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2))
    assert {total for _, _, total, _ in module.seen} == {expected_total}
    assert {per_epoch for *_, per_epoch in module.seen} == {-(-5 // accumulate)}
    assert [step for step, *_ in module.seen] == [global_step for _, global_step, *_ in module.seen]
    assert trainer.global_step == expected_total


def logged(run_dir) -> dict[str, list[float]]:
    """Per optimizer step, in order: every schedule value as logged in metrics.csv."""
    with open(run_dir / "metrics.csv") as handle:
        rows = sorted((r for r in csv.DictReader(handle) if r.get("lr")), key=lambda r: int(r["step"]))
    return {key: [float(r[key]) for r in rows] for key in SCHEDULES}


def within_one_step(uninterrupted: list[float], progress: list[float], values: list[float], step: float):
    """Each value lies on the uninterrupted curve (sampled at i / len) within ``step`` of its progress."""
    total = len(uninterrupted)
    for p, value in zip(progress, values, strict=True):
        near = [v for i, v in enumerate(uninterrupted) if abs(i / total - p) <= step + 1e-9]
        assert min(near) * (1 - 1e-6) <= value <= max(near) * (1 + 1e-6), (p, value, near)


@pytest.mark.ddp
def test_schedules_continue_across_a_change_of_world_size(lgen):
    env = lgen_env(OMP_NUM_THREADS="1")
    runs = lgen.cwd / "runs" / "dino_digits"
    one, two = SAMPLES // BATCH, SAMPLES // (2 * BATCH)  # optimizer steps per epoch
    # Uninterrupted, one process; it also keeps its checkpoint of step 12 (epoch 1, 4 of 8 batches done).
    lgen("train", *DINO, "run_id=full", "trainer.checkpoint_every_n_steps=12", env=env)
    full = logged(runs / "full")
    assert len(full["lr"]) == EPOCHS * one

    # 2 -> 1: stopped after 6 steps of 64 images (epoch 1, 2 of 4 batches), resumed on one process.
    lgen("train", *DINO, "run_id=down", "trainer.devices=2", "callbacks.stop_after.steps=6", env=env)
    resumed = lgen("train", *DINO, "run_id=down", env=env)
    assert "global batch of 64, this run's is 32" in resumed.stderr and "0.002 -> 0.001" in resumed.stderr
    assert "resuming epoch 1 after 128 samples" in resumed.stderr + resumed.stdout
    down = logged(runs / "down")
    # progress of each logged step: 6 steps of 1/(2 x 4), then the 4 batches left of epoch 1, of 1/(2 x 8)
    progress = [s / (EPOCHS * two) for s in range(6)] + [s / (EPOCHS * one) for s in range(12, EPOCHS * one)]
    assert len(down["lr"]) == len(progress)  # the interrupted epoch trained exactly its 4 batches left
    down["lr"][:6] = [lr / 2 for lr in down["lr"][:6]]  # the 2-process segment ran at twice the peak LR
    for key in SCHEDULES:
        within_one_step(full[key], progress, down[key], step=1 / (EPOCHS * two))
        assert down[key][6:] == full[key][12:]  # on one process again: the very same grid of steps

    # 1 -> 2: the uninterrupted run's step-12 checkpoint resumed on two processes.
    step12 = runs / "full" / "checkpoints" / "step000012.ckpt"
    resumed = lgen("train", *DINO, "run_id=up", "trainer.devices=2", f"resume={step12}", env=env)
    assert "global batch of 32, this run's is 64" in resumed.stderr and "0.001 -> 0.002" in resumed.stderr
    up = logged(runs / "up")
    progress = [s / (EPOCHS * two) for s in range(6, EPOCHS * two)]
    assert len(up["lr"]) == len(progress)  # 2 batches per process left of epoch 1
    up["lr"] = [lr / 2 for lr in up["lr"]]
    for key in SCHEDULES:
        within_one_step(full[key], progress, up[key], step=1 / (EPOCHS * two))
    final = torch.load(runs / "up" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == EPOCHS - 1 and final["global_step"] == 12 + len(progress)
