"""`lgen train` end to end: run directory, resume, damaged checkpoints, non-finite losses, 2-process DDP."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_gen.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint
from lightning_gen.methods.base import load_method
from tests.conftest import FAST


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_writes_run_directory_and_resume_continues(lgen):
    first = lgen("train", "experiment=ae_digits", *FAST, "run_id=a")
    run_dir = lgen.cwd / "runs" / "ae_digits" / "a"
    assert "lightning_gen run summary" in first.stdout and "last_checkpoint" in first.stdout
    assert "global batch 32 = 32 per device x 1 processes" in first.stderr + first.stdout
    for name in ("config.yaml", "metrics.csv", "hparams.yaml", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "samples").glob("input_reconstruction_epoch000_*.png"))
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
    first_rows = rows(run_dir / "metrics.csv")

    second = lgen("train", "experiment=ae_digits", *FAST, "run_id=a", "trainer.max_epochs=2")
    assert "resuming from" in second.stderr + second.stdout
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and last["epoch"] == 1  # continued from step 3, did not start over
    all_rows = rows(run_dir / "metrics.csv")
    assert all_rows[: len(first_rows)] == [{k: r.get(k, "") for k in all_rows[0]} for r in first_rows], (
        "metrics.csv rows of the first segment were lost"
    )
    assert any(r["epoch"] == "1" for r in all_rows)
    # Any checkpoint rebuilds its method from the config stored inside it, weights included.
    model = load_method(run_dir / "checkpoints" / "last.ckpt")
    assert (
        type(model).__name__ == "Autoencoder"
        and model.cfg.latent_dim == 32
        and model.data_info.image_size == 16
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in last["state_dict"].items())


def test_last_checkpoint_is_the_newest_state_even_when_the_metric_stops_improving(lgen):
    # lr=0: val/loss is the same every epoch, so the best checkpoint stays at epoch 0; Lightning >= 2.5
    # would then leave last.ckpt there too, and resuming would silently go back two epochs.
    lgen("train", "experiment=ae_digits", *FAST, "run_id=flat", "trainer.max_epochs=3", "method.lr=0")
    ckpt_dir = lgen.cwd / "runs" / "ae_digits" / "flat" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch000-step000003.ckpt", "last.ckpt"]
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 9


def test_corrupt_last_checkpoint_names_file_and_fallback(lgen):
    lgen("train", "experiment=ae_digits", *FAST, "run_id=c", "callbacks.images.enabled=false")
    ckpt_dir = lgen.cwd / "runs" / "ae_digits" / "c" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # truncated, as by a kill mid-copy
    proc = lgen("train", "experiment=ae_digits", *FAST, "run_id=c", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    fallback = next(p for p in ckpt_dir.glob("epoch*.ckpt"))
    assert f"checkpoint {last.relative_to(lgen.cwd)} is corrupt or truncated" in proc.stderr
    assert f"resume={fallback.relative_to(lgen.cwd)}" in proc.stderr
    resumed = lgen(
        "train", "experiment=ae_digits", *FAST, "run_id=c", f"resume={fallback}", "trainer.max_epochs=2"
    )
    assert "resuming from" in resumed.stderr + resumed.stdout


def test_trainer_settings_lightning_rejects_are_a_config_error(lgen):
    # sharded training has no sharded loss scaler in Lightning: 16-mixed is refused on any machine
    settings = ["trainer.accelerator=cpu", "trainer.strategy=fsdp", "trainer.precision=16-mixed"]
    proc = lgen("train", "experiment=mae_digits", *settings, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Lightning rejects the trainer settings" in proc.stderr
    assert all(setting in proc.stderr for setting in settings)
    assert "Choose a different precision" in proc.stderr  # Lightning's own reason is kept


def test_checkpoint_write_killed_midway_leaves_previous_copy_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["global_step"] == 1  # the only complete copy was never touched
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "last.ckpt.tmp")


def test_non_finite_loss_stops_with_advice_and_keeps_checkpoints(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_gen.callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
    from lightning_gen.config import compose, section_object
    from lightning_gen.methods.generative.autoencoder import Autoencoder
    from lightning_gen.registry import build

    class Diverging(Autoencoder):
        registry_name = "autoencoder"

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step >= 2 else loss

    cfg = compose(["experiment=ae_digits", *FAST])
    dm = build("data", section_object(cfg.data))
    model = Diverging(section_object(cfg.method), dm.info)
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=5,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True),
            NonFiniteLossGuard(ckpt_dir),
        ],
        plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, datamodule=dm)
    assert "global step 2" in str(error.value) and "method.lr" in str(error.value)
    saved = load_checkpoint(ckpt_dir / "last.ckpt")
    assert saved["global_step"] == 2  # written after the last finite step, never with NaN weights
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


@pytest.mark.ddp
def test_two_process_ddp_run_writes_one_set_of_checkpoints_and_a_wandb_offline_run(lgen):
    fast = [o for o in FAST if not o.startswith("logger.")]
    proc = lgen(
        "train",
        "experiment=ae_digits",
        *fast,
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "callbacks.images.enabled=false",
        timeout=900,
    )
    runs = list((lgen.cwd / "runs" / "ae_digits").iterdir())
    assert len(runs) == 1, f"every process must share one run directory, got {runs}"
    run_dir = runs[0]
    assert "global batch 64 = 32 per device x 2 processes" in proc.stderr + proc.stdout
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["epoch001-step000006.ckpt", "last.ckpt"], ckpts  # one set, from rank 0 only
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), (
        "no W&B offline run that `wandb sync` could upload"
    )
    assert "wandb sync" in proc.stdout
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
