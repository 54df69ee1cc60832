"""Every generator trains through the real CLI on tiny digits, with the FID callback on, and samples
through `lgen sample`. DDP (2 gloo processes) is spent where it matters most: DDPM (FID generation
split over ranks, then a 1-process resume with EMA and cached real statistics) and the GAN (manual
optimisation with two optimizers, conditional G and D, k D-steps per G step)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_gen import schedules
from lightning_gen.callbacks.fid import FID, FIDConfig
from lightning_gen.config import ConfigError
from lightning_gen.eval.extractors import ExtractorSettings, check_extractor
from lightning_gen.methods.base import DataInfo, load_method
from tests.conftest import FAST, lgen_env, run_lgen

ENV = lgen_env(OMP_NUM_THREADS="1")  # tiny tensors: a second thread per process only thrashes a shared CPU

TINY = {
    "vae": ["method.width=8", "method.latent_dim=4"],
    "gan": ["method.g_width=8", "method.d_width=8", "method.z_dim=8"],
    "pixelcnn": ["method.width=8", "method.blocks=1"],
    "flow": ["method.width=8", "method.mults=[1,2]", "method.sample_steps=3", "method.conditional=true"],
    "ddpm": ["method.width=8", "method.mults=[1,2]", "method.sample_steps=3", "method.timesteps=20"],
}


def lgen(*args, cwd: Path):
    return run_lgen(*args, cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fid_extractor")
    proc = lgen(
        "fid-extractor", "data=digits", "data.image_size=16", "epochs=1", "width=4", "out=ex.pt", cwd=folder
    )
    assert "test accuracy" in proc.stdout
    blob = torch.load(folder / "ex.pt", weights_only=False)
    assert blob["data"] == "digits" and blob["image_size"] == 16
    return folder / "ex.pt"


def fid_args(extractor: Path, cache: Path) -> list[str]:
    return [
        f"callbacks.fid.domain_extractor_path={extractor}",
        "callbacks.fid.every_n_epochs=1",
        "callbacks.fid.num_samples=30",
        "callbacks.fid.batch_size=10",
        "callbacks.fid.kid_subsets=3",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.images.every_n_epochs=1",
        f"callbacks.fid.cache_dir={cache}",
    ]


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def last_value(rows, key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key)]
    assert values, f"{key} was never logged"
    return values[-1]


@pytest.mark.parametrize("method", ["vae", "gan", "pixelcnn", "flow"])
def test_generator_trains_logs_fid_and_samples(method, extractor, tmp_path):
    lgen(
        "train",
        f"experiment={method}_digits",
        *FAST,
        *TINY[method],
        *fid_args(extractor, tmp_path / "cache"),
        "run_id=a",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / f"{method}_digits" / "a"
    rows = metrics(run_dir)
    fid = last_value(rows, "val/fid_digits")
    assert math.isfinite(fid) and fid > 0
    assert last_value(rows, "val/fid_digits_floor") < fid  # untrained samples are far from real digits
    assert math.isfinite(last_value(rows, "val/kid_digits"))
    assert list((run_dir / "samples").glob("real_samples*.png"))  # the image-grid callback showed samples
    extra = ["class=3", "guidance=2", "steps=2"] if method == "flow" else []
    out = tmp_path / "grid.png"
    proc = lgen(
        "sample", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "n=4", f"out={out}", *extra, cwd=tmp_path
    )
    name = "diffusion" if method == "flow" else method  # flow is a preset of method=diffusion
    assert out.is_file() and f"4 {name} samples" in proc.stdout


@pytest.mark.ddp
def test_ddpm_ddp_with_fid_then_resume_keeps_ema_and_cached_real_statistics(extractor, tmp_path):
    cache = tmp_path / "cache"
    common = [
        "experiment=ddpm_digits",
        *FAST,
        *TINY["ddpm"],
        *fid_args(extractor, cache),
        "run_id=r",
        "data.batch_size=2048",
        "method.ema_warmup=false",
        "method.ema_decay=0.9",
    ]  # one batch an epoch
    first = lgen("train", *common, "trainer.devices=2", "trainer.accelerator=cpu", cwd=tmp_path)
    assert "computed and cached" in first.stdout + first.stderr
    run_dir = tmp_path / "runs" / "ddpm_digits" / "r"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = load_method(str(ckpt))
    ema_1 = {k: v.clone() for k, v in before.ema.state_dict().items()}
    assert last_value(metrics(run_dir), "val/fid_digits") > 0
    cached = sorted(cache.glob("*.pt"))
    assert len(cached) == 2  # train (real) and test (floor) features
    stamps = {p: p.stat().st_mtime_ns for p in cached}

    second = lgen("train", *common, "trainer.max_epochs=2", cwd=tmp_path)
    log = second.stdout + second.stderr
    assert "resuming from" in log and "loaded from cache" in log and "computed and cached" not in log
    assert "real-vs-real floor" not in log  # restored from the callback state, logged once per run
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    after = load_method(str(ckpt))
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    # one more EMA update on top of the *restored* EMA: ema_2 = 0.9 ema_1 + 0.1 theta_2
    for name, theta in after.net.state_dict().items():
        if theta.dtype.is_floating_point:
            expected = 0.9 * ema_1[name] + 0.1 * theta
            assert torch.allclose(after.ema.state_dict()[name], expected, atol=1e-6), name

    # lgen sample: sampler choices, and clear errors for what this model cannot do
    out = tmp_path / "ddpm.png"
    lgen("sample", f"ckpt={ckpt}", "n=2", "sampler=ddpm", f"out={out}", cwd=tmp_path)
    assert out.is_file()
    bad = run_lgen("sample", f"ckpt={ckpt}", "n=2", "temperature=2", cwd=tmp_path, env=ENV, check=False)
    assert bad.returncode == 2 and "does not take sampling option(s) temperature" in bad.stderr
    bad = run_lgen("sample", f"ckpt={ckpt}", "n=2", "class=3", cwd=tmp_path, env=ENV, check=False)
    assert bad.returncode == 2 and "unconditional" in bad.stderr


@pytest.mark.ddp
def test_conditional_gan_ddp_manual_optimisation_with_k_d_steps(tmp_path):
    lgen(
        "train",
        "experiment=gan_digits",
        *FAST,
        *TINY["gan"],
        "method.conditional=true",
        "method.d_steps=2",
        "method.schedule=cosine",
        "trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=1",
        "callbacks.fid.enabled=false",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "run_id=g",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "gan_digits" / "g"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 + 2  # Lightning counts both optimizers' steps: 4 D steps, 2 G steps
    assert len(ckpt["optimizer_states"]) == 2
    rows = metrics(run_dir)
    assert last_value(rows, "train/g_loss_step") > 0
    # the LR follows the batch count (4 batches planned), not global_step, which runs 1.5x faster
    expected = [2e-4 * schedules.warmup_cosine(b, 4, 0, 0.0) for b in range(4)]
    logged = [float(r["lr"]) for r in rows if r.get("lr")]
    assert len(logged) >= 3 and min(logged) > 0  # keyed on global_step, the last batches would get lr 0
    for lr in logged:
        assert any(lr == pytest.approx(e, rel=1e-6) for e in expected), (lr, expected)
    method = load_method(str(run_dir / "checkpoints" / "last.ckpt"))
    images = method.sample(10, cond=torch.arange(10))
    assert images.shape == (10, 1, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_fid_errors_name_the_missing_file_and_the_fix(tmp_path):
    callback = FID(FIDConfig(domain_extractor_path=str(tmp_path / "nope.pt")), run_dir=tmp_path)
    module = SimpleNamespace(
        is_generative=True, data_info=DataInfo(name="digits", image_size=16), registry_name="ddpm"
    )
    with pytest.raises(ConfigError, match="lgen fid-extractor data=digits data.image_size=16"):
        callback.setup(None, module, "fit")
    with pytest.raises(ConfigError, match=r"nope\.pth.*weights-inception-2015-12-05"):
        check_extractor(
            "inception", module.data_info, ExtractorSettings(inception_path=str(tmp_path / "nope.pth"))
        )
    not_generator = SimpleNamespace(is_generative=False, registry_name="simclr")
    with pytest.raises(ConfigError, match="needs a generator"):
        callback.setup(None, not_generator, "fit")


def test_sample_refuses_a_checkpoint_that_is_not_a_generator(tmp_path):
    from lightning_gen.methods.generative.autoencoder import Autoencoder, AutoencoderConfig

    ae = Autoencoder(AutoencoderConfig(name="autoencoder", latent_dim=4, width=8), DataInfo(image_size=16))
    ckpt = tmp_path / "ae.ckpt"
    torch.save({"hyper_parameters": dict(ae.hparams), "state_dict": ae.state_dict()}, ckpt)
    proc = run_lgen("sample", f"ckpt={ckpt}", cwd=tmp_path, env=ENV, check=False)
    assert proc.returncode == 2 and "not a generator" in proc.stderr


def test_best_generator_checkpoint_is_chosen_by_fid_never_by_gan_losses(tmp_path):
    """With the FID callback on, a generator's best checkpoint is the lowest FID (checked on the epochs
    FID runs); a GAN without FID keeps the newest, since neither of its losses measures quality."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_gen.checkpoint import LastCheckpoint
    from lightning_gen.config import compose
    from lightning_gen.run import build_callbacks, build_datamodule, build_method

    def best_rule(*overrides):
        cfg = compose(list(overrides))
        method = build_method(cfg, build_datamodule(cfg))
        (best,) = [
            c
            for c in build_callbacks(cfg, method, tmp_path, validates=True)
            if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)
        ]
        return best.monitor, best.mode, best._every_n_epochs

    assert best_rule("experiment=gan_digits") == ("val/fid_digits", "min", 30)
    assert best_rule("experiment=ddpm_digits") == ("val/fid_digits", "min", 10)
    assert best_rule("experiment=gan_digits", "callbacks.fid.enabled=false")[0] is None
    assert best_rule("experiment=vae_digits", "callbacks.fid.enabled=false")[0] == "train/loss"  # its own
