"""A newcomer's first hour: bad input is one clear line, a failed run leaves nothing behind, a default
run prints no noise, and a generative experiment works from any directory with no manual step."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from lightning_gen.cli import main
from tests.conftest import FAST, lgen_env, run_lgen

# (command line, what the one-line error must say). Each fails before anything is created.
BAD_INPUT = [
    (["train", "data.batch_size=-5"], "invalid value -5 for data.batch_size: it must be at least 1"),
    (["train", "data.batch_size=0"], "invalid value 0 for data.batch_size: it must be at least 1"),
    (["train", "trainer.devices=abc"], "invalid value 'abc' for trainer.devices"),
    (["train", "trainer.devices=0"], "trainer.devices=[0,1]"),
    (["train", "trainer.max_epochs=-3"], "trainer.max_epochs: it must be at least -1"),
    (["train", "data.image_size=0"], "data.image_size: it must be at least 1"),
    (["train", "data.num_workers=-1"], "data.num_workers: it must be at least 0"),
    (["train", "data.val_fraction=1.5"], "data.val_fraction: it must be between 0 and 0.9"),
    (["train", "method.lr=-0.1"], "method.lr: it must be at least 0"),
    (
        ["train", "trainer.accumulate_grad_batches=0"],
        "trainer.accumulate_grad_batches: it must be at least 1",
    ),
    (
        ["train", "callbacks.images.every_n_epochs=0"],
        "callbacks.images.every_n_epochs: it must be at least 1",
    ),
    (["train", "seed=-1"], "invalid value -1 for seed"),
    (
        ["train", "trainer.strategy=fsdp"],  # the default autoencoder has no blocks to shard
        "trainer.strategy=fsdp: method 'autoencoder' has no transformer or U-Net blocks to shard",
    ),
    # RGB PixelCNN: the masks need one feature group per colour channel; 64 is the method's default width
    (
        ["train", "method=pixelcnn", "data=color_digits"],
        "method.width=64 must be a multiple of the image channels (3)",
    ),
    # a run id is one folder name: this one would have put the run outside runs/
    (["train", "run_id=../../escape"], "invalid value '../../escape' for run_id"),
    # a temperature of 0 divides by zero: the run trained into NaN and ended in a traceback
    (
        ["train", "experiment=simclr_digits", "method.temperature=0"],
        "invalid value 0.0 for method.temperature: it must be greater than 0",
    ),
    (
        ["train", "experiment=dino_digits", "method.views.local_crops.blur_p=[0.5,1.5]"],
        "invalid value 1.5 in method.views.local_crops.blur_p=[0.5, 1.5]: every entry must be between 0 and 1",
    ),
    # the missing folder is named first (the default encoder cannot take its 224 px images either)
    (
        ["train", "data=folder", "data.root=/nonexistent"],
        "dataset 'folder' not found under /nonexistent: missing /nonexistent/train",
    ),
    (
        ["train", "data.image_size=24"],
        "method=autoencoder cannot be built for data=digits (1x24x24 images): the conv encoder needs a "
        "power-of-two image size >= 4, got 24: set data.image_size=16 or 32",
    ),
    (["sample", "ckpt=last.ckpt", "n=-4"], "lgen sample: n=-4: n must be at least 1"),
    (
        [
            "prepare",
            "data=cifar10",
            "data.download=true",
        ],  # no network: the proxy below refuses every connection
        "could not download cifar10",
    ),
]


# Latent diffusion. {ae}: a latent-autoencoder checkpoint of digits at 16 px (8x8x2 latents), written
# outside the working folder; an experiment's stage 1 that would train is checked before it does.
LATENT_BAD_INPUT = [
    (  # another resolution
        ["train", "experiment=ldm_dit_digits", "method.latents=ckpt:{ae}", "data.image_size=28"],
        "was trained on digits at 16 px with 1 channel(s), but this run's data is digits at 28 px",
    ),
    (  # another dataset
        [
            "train",
            "experiment=ldm_dit_digits",
            "method.latents=ckpt:{ae}",
            "data=fashion_mnist",
            "data.image_size=16",
        ],
        "but this run's data is fashion_mnist at 16 px",
    ),
    (  # another channel count
        [
            "train",
            "experiment=ldm_dit_digits",
            "method.latents=ckpt:{ae}",
            "data=color_digits",
            "data.image_size=16",
        ],
        "but this run's data is color_digits at 16 px with 3 channel(s)",
    ),
    (
        [
            "train",
            "experiment=ldm_dit_digits",
            "method.latents=ckpt:{ae}",
            "data.image_size=16",
            "method.dit.patch_size=3",
        ],
        "method.dit.patch_size=3 does not divide the latent size 8",
    ),
    (  # the stage-1 recipe's 7x7 latents, before stage 1 trains
        ["train", "experiment=ldm_dit_digits", "method.dit.patch_size=2"],
        "method.dit.patch_size=2 does not divide the latent size 7",
    ),
    (
        ["train", "experiment=ldm_unet_fashion_mnist", "method.mults=[1,2,2,2]"],
        "method.mults=[1, 2, 2, 2] on the latent size 7: image size 7 is too small for 3 downsamplings",
    ),
    (
        ["train", "experiment=ldm_dit_digits", "method.latents=ckpt:nope.ckpt"],
        "method.latents=ckpt:nope.ckpt: no such file or folder",
    ),
    (["train", "experiment=ddpm_digits", "method.latents=stage1"], "has no stage1 section"),
    (
        ["train", "experiment=ldm_dit_digits", "stage1.trainer.max_epoch=2"],
        "stage1 (experiment latent_autoencoder_digits): unknown config key trainer.max_epoch "
        "(did you mean 'max_epochs'?)",
    ),
    (
        ["train", "experiment=ldm_dit_digits", "stage1.experiment=ddpm_digits"],
        "stage1.experiment=ddpm_digits trains diffusion, not an autoencoder: name a method=latent_autoencoder",
    ),
    (["train", "experiment=ldm_dit_digits", "method.latents=vae.ckpt"], "give ckpt:<latent_autoencoder"),
    (["latents", "ckpt={ae}", "data=digits", "data.image_size=28"], "this run's data is digits at 28 px"),
    (["latents", "ckpt={ae}", "data=digits", "data.image_size=16", "splits=train,bogus"], "no split 'bogus'"),
    (["latents", "data=digits"], "say which autoencoder: ckpt="),
    (["latents", "ckpt={ae}", "data=digits", "dtype=int8"], "dtype=int8: use one of float32"),
    (
        ["train", "experiment=ldm_dit_digits", "data=latents", "data.path=nowhere"],
        "no complete latents under data.path=nowhere",
    ),
]


@pytest.fixture(scope="module")
def digits_autoencoder(tmp_path_factory) -> str:
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.latent_autoencoder import LatentAutoencoder, LatentAutoencoderConfig

    cfg = LatentAutoencoderConfig(
        name="latent_autoencoder", channels=(8, 16), norm_groups=4, latent_channels=2
    )
    module = LatentAutoencoder(cfg, DataInfo(name="digits", channels=1, image_size=16))
    path = tmp_path_factory.mktemp("autoencoder") / "ae.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a[1:]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_error_exit_2_and_creates_nothing(argv, message, tmp_path, monkeypatch, capsys):
    assert_one_line_error(argv, message, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(
    "argv, message", LATENT_BAD_INPUT, ids=[" ".join(a[2:]) for a, _ in LATENT_BAD_INPUT]
)
def test_bad_latent_diffusion_input_is_one_line_and_creates_nothing(
    argv, message, digits_autoencoder, tmp_path, monkeypatch, capsys
):
    argv = [a.replace("{ae}", digits_autoencoder) for a in argv]
    assert_one_line_error(argv, message, tmp_path, monkeypatch, capsys)


def assert_one_line_error(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens there: no network, as offline
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert main(argv) == 2  # an exception (a traceback) would fail the test here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lgen: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # no run directory, no data folder, no W&B run


def test_non_finite_loss_is_one_line_exit_3_and_the_checkpoints_saved_before_are_kept(tmp_path):
    """A VAE stepped with lr 1e12 saves its step-1 checkpoint, then its loss is NaN at step 2."""
    proc = run_lgen(
        "train",
        "experiment=vae_digits",
        *FAST,
        "method.lr=1e12",
        "trainer.checkpoint_every_n_steps=1",
        "run_id=r",
        cwd=tmp_path,
        env=lgen_env(OMP_NUM_THREADS="1"),
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lgen: error:")]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [proc.stderr.strip().splitlines()[-1]], errors  # one line, the last one
    assert "training loss became non-finite (nan) at global step 1" in errors[0]
    assert "checkpoints already saved hold states from before it: last.ckpt, step000001.ckpt" in errors[0]
    for name in ("last.ckpt", "step000001.ckpt"):  # the last good state, intact
        saved = torch.load(tmp_path / "runs" / "vae_digits" / "r" / "checkpoints" / name, weights_only=False)
        assert saved["global_step"] == 1
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_failed_runs_leave_nothing_and_a_default_run_prints_no_noise(tmp_path):
    env = lgen_env(OMP_NUM_THREADS="1")
    # Failures found once everything is built: the dataset is missing; Lightning rejects the trainer.
    missing = run_lgen(
        "train",
        "data=cifar10",
        f"data.root={tmp_path / 'none'}",
        "run_id=r",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert missing.returncode == 2 and "dataset 'cifar10' not found" in missing.stderr
    rejected = run_lgen(
        "train",
        "experiment=mae_digits",
        "trainer.accelerator=cpu",
        "trainer.strategy=fsdp",
        "trainer.precision=16-mixed",  # FSDP2 under Lightning has no sharded loss scaler
        "run_id=r",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert rejected.returncode == 2 and "Lightning rejects the trainer settings" in rejected.stderr
    no_extractor = run_lgen(
        "train",
        "experiment=ddpm_digits",
        "callbacks.fid.domain_extractor_path=nope.pt",
        "run_id=r",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert (
        no_extractor.returncode == 2 and "domain_extractor_path=nope.pt: no such file" in no_extractor.stderr
    )
    for proc in (missing, rejected, no_extractor):
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()

    # The embedded default (one epoch of it), W&B offline as for a user who is not logged in.
    proc = run_lgen("train", "trainer.max_epochs=1", "run_id=r", cwd=tmp_path, env=env)
    output = proc.stdout + proc.stderr
    for noise in (
        "Tip: For seamless cloud logging",  # Lightning advertising LitLogger
        "The anonymous setting has no effect",  # Lightning passes anonymous=None to wandb.init
        "LeafSpec",  # torch deprecation inside Lightning's _pytree
        "log_every_n_steps",  # the digits have 9 batches per epoch, fewer than the logging interval
        "not supported by the model summary",  # bf16-mixed on CPUs with AMX
        "The `srun` command is available",  # Lightning's SLURM hint, where SLURM's client is installed
    ):
        assert noise not in output, noise
    # One W&B run segment: the failed attempts with this run id left none behind.
    offline = list((tmp_path / "runs" / "ae_digits" / "r" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert f"wandb_sync          wandb sync {offline[0].relative_to(tmp_path)}" in proc.stdout
    assert "segments" not in proc.stdout


def test_generative_experiment_runs_from_any_directory_and_builds_the_fid_extractor_once(tmp_path):
    cache, first, second = tmp_path / "cache", tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    env = lgen_env(OMP_NUM_THREADS="1", LGEN_CACHE_DIR=str(cache))
    # A fresh clone's second command, from another directory: no manual step before it.
    built = run_lgen("train", "experiment=ddpm_digits", "trainer.max_epochs=1", cwd=first, env=env)
    extractor = cache / "fid_extractors" / "digits_16px.pt"
    assert f"training it once (about a minute on a CPU) -> {extractor}" in built.stderr
    assert extractor.is_file() and "lightning_gen run summary" in built.stdout
    stamp = extractor.stat().st_mtime_ns

    # Another run elsewhere measures FID with the cached extractor: nothing is rebuilt.
    reused = run_lgen(
        "train",
        "experiment=ddpm_digits",
        *FAST,
        "method.width=8",
        "method.mults=[1,2]",
        "method.sample_steps=3",
        "method.timesteps=20",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.fid.every_n_epochs=1",
        "callbacks.fid.num_samples=30",
        "callbacks.fid.batch_size=10",
        "callbacks.fid.kid_subsets=3",
        "run_id=fid",
        cwd=second,
        env=env,
    )
    assert f"[fid] digits 16 px feature extractor: {extractor} (cached)" in reused.stderr
    assert "training it once" not in reused.stderr
    assert extractor.stat().st_mtime_ns == stamp
    assert "val/fid_digits" in reused.stdout


def test_building_the_extractor_leaves_the_training_random_streams_alone():
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object
    from lightning_gen.eval.fid_extractor import train_extractor

    cfg = compose(["data=digits", "data.image_size=8"])
    datamodule = registry.build("data", section_object(cfg.data))
    torch.manual_seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    net, _ = train_extractor(datamodule, epochs=1, width=4, seed=7, log=lambda _: None)
    after = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    # ...and the extractor itself is a function of its own seed, not of the caller's stream
    torch.manual_seed(999)
    again, _ = train_extractor(datamodule, epochs=1, width=4, seed=7, log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("in_job", [False, True])
def test_lightning_srun_hint_only_inside_a_slurm_job(tmp_path, monkeypatch, in_job):
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lightning_gen.quiet import silence_library_notices

    # Lightning looks for an `srun` on PATH: an empty executable stands for SLURM's client being installed.
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    if in_job:  # an allocation whose script ran python without srun: there the hint is a real warning
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_library_notices()
        SLURMEnvironment.detect()
    hints = [w for w in caught if "`srun` command is available" in str(w.message)]
    assert len(hints) == (1 if in_job else 0)
