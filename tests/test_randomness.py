"""Randomness of a training run (lightning_gen.randomness, lightning_gen.data.sampler), end to end.

- every DDP rank draws its own views / diffusion (t, eps) / GAN z / MAE masks, and a rerun with the
  same seed draws the same (2 real gloo processes through `lgen train trainer.devices=2`);
- evaluation (linear probe, kNN, k-means, image grids, validation) neither consumes nor resets the
  training streams: a run with all of it on trains bitwise like a run with all of it off, and so do
  runs that validate twice an epoch, never, or with a sanity check and more validation batches;
- a run stopped mid-epoch and resumed (`callbacks.stop_after.steps`) has per-step losses and final
  weights bitwise equal to the uninterrupted run: SimCLR, MoCo v2, SwAV and DDPM on 1 process, SimCLR on 2;
- the generator EMA moves once per optimizer step under gradient accumulation.
CPU, 32-true, one thread per process (bitwise comparisons of sums need a fixed thread count).
"""

from __future__ import annotations

import csv

import pytest
import torch

from tests.conftest import lgen_env

TINY = [
    "data.image_size=16",
    "data.batch_size=32",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "logger.wandb.enabled=false",
]
EVALUATION_ON = [
    "callbacks.linear_probe.every_n_epochs=1",
    "callbacks.knn.every_n_epochs=1",
    "callbacks.clustering.every_n_epochs=1",
    "callbacks.images.every_n_epochs=1",
]
EXPERIMENTS = {
    "simclr_digits": EVALUATION_ON,
    "moco_v2_digits": [*EVALUATION_ON, "method.queue_size=96"],
    "ddpm_digits": ["method.width=16", "callbacks.fid.enabled=false", "callbacks.images.every_n_epochs=1"],
    # queue full after 2 steps and in use at the cut; prototypes frozen in epoch 0, trained after
    "swav_digits": ["method.queue_size=64", "method.queue_start_epoch=0", "method.num_prototypes=20"],
}
STOP = 6  # mid-epoch 1: after epoch 0's validation and evaluation callbacks


def run_env():
    return lgen_env(OMP_NUM_THREADS="1")


def losses(run_dir) -> dict[int, str]:
    """Per-step training loss as logged (full float repr): equal strings = bitwise equal floats."""
    with open(run_dir / "metrics.csv") as handle:
        return {
            int(r["step"]): r["train/loss_step"] for r in csv.DictReader(handle) if r.get("train/loss_step")
        }


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_training(a, b) -> None:
    """Two run directories trained identically: every step's loss and every final tensor, bitwise."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) and la == lb, {
        s: (la.get(s), lb.get(s)) for s in la if la.get(s) != lb.get(s)
    }
    ca, cb = checkpoint(a), checkpoint(b)
    assert ca["global_step"] == cb["global_step"]
    for name, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][name]), name


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_interrupted_mid_epoch_run_resumes_bitwise(lgen, experiment):
    args = ["train", f"experiment={experiment}", *TINY, *EXPERIMENTS[experiment]]
    runs = lgen.cwd / "runs" / experiment
    lgen(*args, "run_id=full", env=run_env())
    lgen(*args, "run_id=cut", f"callbacks.stop_after.steps={STOP}", env=run_env())
    assert checkpoint(runs / "cut")["global_step"] == STOP  # stopped mid-epoch, saved at that step
    assert checkpoint(runs / "cut")["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples"] == 64
    resumed = lgen(*args, "run_id=cut", env=run_env())
    assert "not resumable" not in resumed.stderr  # Lightning's warning for loaders that restart the epoch
    assert_same_training(runs / "full", runs / "cut")
    if experiment == "simclr_digits":  # evaluation on every epoch vs none at all: the same training
        off = [a for a in args if not a.startswith("callbacks.")] + ["callbacks.images.enabled=false"]
        lgen(*off, "run_id=quiet", env=run_env())
        assert_same_training(runs / "full", runs / "quiet")
        assert "eval/probe_top1" in (runs / "full" / "metrics.csv").read_text()  # the probe did run


def test_training_is_independent_of_validation_settings(lgen):
    """Validation (how often, how many batches, the sanity check) never shifts the training stream, and a
    mid-epoch checkpoint written at a validating step resumes bitwise. Lightning iterates a validation
    loader before on_validation_start: a loader without its own generator would draw its workers' base
    seed from the training stream there."""
    base = ["train", "experiment=simclr_digits", *TINY, "callbacks.images.enabled=false"]
    runs = lgen.cwd / "runs" / "simclr_digits"
    often = ["trainer.val_check_interval=2"]  # after batches 2 and 4 of every epoch, no sanity check
    lgen(*base, *often, "run_id=often", env=run_env())
    lgen(*base, "trainer.check_val_every_n_epoch=100", "run_id=never", env=run_env())
    assert len(validations(runs / "often")) == 4 and not validations(runs / "never")
    assert_same_training(runs / "often", runs / "never")
    # Step 6 (batch 2 of epoch 1) validates right after its checkpoint is written; this run also has a
    # sanity check and validates on 3 batches instead of 1.
    more = [*often, "trainer.num_sanity_val_steps=2", "trainer.limit_val_batches=3", "run_id=cut"]
    lgen(*base, *more, f"callbacks.stop_after.steps={STOP}", env=run_env())
    lgen(*base, *more, env=run_env())
    assert checkpoint(runs / "cut")["global_step"] == 8
    assert_same_training(runs / "often", runs / "cut")


def validations(run_dir) -> list[str]:
    with open(run_dir / "metrics.csv") as handle:
        return [r["step"] for r in csv.DictReader(handle) if r.get("val/probe_acc")]


@pytest.mark.ddp
def test_ranks_draw_their_own_randomness_and_a_ddp_run_resumes_bitwise(lgen):
    """2 gloo processes: each rank's stream differs (views, diffusion noise, GAN z, MAE masks drawn from
    the states saved at the same step), reruns are reproducible, and a mid-epoch resume is exact."""
    from lightning_gen.data.views import Views, ViewsConfig
    from lightning_gen.methods.generative.diffusion import Diffusion, DiffusionConfig
    from lightning_gen.methods.generative.gan import GAN, GANConfig
    from lightning_gen.methods.ssl.pretext import random_patch_mask
    from lightning_gen.randomness import restore_state

    args = ["train", "experiment=simclr_digits", *TINY, "trainer.devices=2", "trainer.accelerator=cpu"]
    runs = lgen.cwd / "runs" / "simclr_digits"
    lgen(*args, "run_id=full", env=run_env())
    lgen(*args, "run_id=cut", "callbacks.stop_after.steps=3", env=run_env())
    saved = checkpoint(runs / "cut")["random_streams"]
    assert saved["world_size"] == 2 and len(saved["states"]) == 2

    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    views = Views(ViewsConfig(), (0.5,), (0.5,), 16)
    ddpm = Diffusion(
        DiffusionConfig(timesteps=1000, width=16, mults=(1,), attention_resolutions=(), ema_decay=0)
    )
    gan = GAN(GANConfig(g_width=8, d_width=8, z_dim=4, ema_decay=0))
    draws = []
    for state in saved["states"]:  # what each rank draws next, from its own saved stream
        restore_state(state)
        t, eps = ddpm.draw_time(8, "cpu")[1], torch.randn(8, 1, 16, 16)  # Algorithm 1's draws
        draws.append([*views(images), t, eps, gan.noise(8), *random_patch_mask(8, 16, 0.75)])
    for what, first, second in zip(["view1", "view2", "t", "eps", "z", "keep", "mask"], *draws):
        assert not torch.equal(first, second), f"both ranks draw the same {what}"

    lgen(*args, "run_id=cut", env=run_env())
    assert_same_training(runs / "full", runs / "cut")  # the first segment reran the full run's steps too


def test_generator_ema_moves_once_per_optimizer_step(lgen):
    args = ["train", "experiment=ddpm_digits", *TINY, *EXPERIMENTS["ddpm_digits"], "run_id=acc"]
    lgen(*args, "trainer.accumulate_grad_batches=2")
    saved = checkpoint(lgen.cwd / "runs" / "ddpm_digits" / "acc")
    assert saved["global_step"] == 4  # 2 epochs x 4 batches / 2 accumulated
    assert int(saved["state_dict"]["ema_updates"]) == saved["global_step"]


def test_last_checkpoint_never_claims_an_interrupted_epoch_complete(tmp_path):
    """A stop mid-epoch whose checkpoint was written elsewhere (SLURM's hpc_ckpt) must not be followed by
    an epoch-end last.ckpt: Lightning would record the cut epoch as complete and a resume would skip
    the rest of it. last.ckpt keeps the previous epoch's end."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gen.checkpoint import LastCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)

    class StoppedElsewhere(L.Callback):  # as RequeueAtStepBoundary after Lightning's hpc save
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                trainer.lgen_stop_checkpoint_step = trainer.global_step
                trainer.should_stop = True

    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[StoppedElsewhere(), LastCheckpoint(tmp_path)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny())
    assert trainer.global_step == 6  # stopped in epoch 1, after 2 of its 4 batches
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 4  # epoch 0's end
