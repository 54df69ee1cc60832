"""Generative metrics through `lgen train` (the FID callback), `lgen eval gen` and `lgen eval stats`.

One class-conditional GAN run on digits (16 px, 1 epoch of 2 steps) with the FID callback on every
metric and W&B offline, measured with a fixed random conv net saved in the domain extractor's format,
is shared by the tests of this module.

- The callback computes every metric the model allows (class_fid and cas too) and writes the
  provenance with the numbers, to its JSON and to the W&B summary.
- `lgen eval gen ckpt=` with the callback's seed and sample count gives its numbers exactly, and
  adds them with their provenance to the run's W&B run.
- `fake=DIR|NPZ` against `real=<dataset>:<split>`: FID from features computed here; `lgen eval
  stats` written and read back gives the same FID; a pytorch-fid file written by numpy is read.
- Bad input: one `lgen: error:` line, exit 2, nothing written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gen.eval.wandb_run import read_wandb_file
from tests.conftest import lgen_env, run_lgen
from tests.test_fid import scipy_fid

ENV = lgen_env(OMP_NUM_THREADS="1")
N = 40  # generated images per evaluation


def random_extractor(path: Path, seed: int = 3) -> Path:
    """A fixed random conv net at 16 px in the domain extractor's file format (He-initialised, so its
    features keep their scale and the nearest-neighbour metrics are not all 0 or 1)."""
    from lightning_gen.eval.fid_extractor import DomainFeatureNet, save_extractor
    from lightning_gen.methods.base import DataInfo

    torch.manual_seed(seed)
    net = DomainFeatureNet(1, 16, 10, width=8)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    save_extractor(net, DataInfo(name="digits", channels=1, image_size=16, num_classes=10), 8, 0.0, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("gen_eval")
    extractor = random_extractor(cwd / "extractor.pt")
    run_lgen(
        "train",
        "experiment=gan_digits",
        "method.conditional=true",
        "method.g_width=8",
        "method.d_width=8",
        "data.image_size=16",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        "logger.wandb.mode=offline",
        "callbacks.images.enabled=false",
        "callbacks.fid.every_n_epochs=1",
        f"callbacks.fid.num_samples={N}",
        f"callbacks.fid.batch_size={N}",
        f"callbacks.fid.domain_extractor_path={extractor}",
        "run_id=g",
        cwd=cwd,
        env=ENV,
    )
    run_dir = cwd / "runs" / "gan_digits" / "g"
    return {
        "cwd": cwd,
        "extractor": extractor,
        "run_dir": run_dir,
        "ckpt": run_dir / "checkpoints" / "last.ckpt",
    }


def lgen_main(capsys, cwd: Path, *args: str) -> tuple[int, str]:
    """`lgen ARGS` in this process (the CLI's own code path), from ``cwd``; (exit code, stderr)."""
    import os

    from lightning_gen.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(list(args))
    finally:
        os.chdir(here)
    return code, capsys.readouterr().err


def summaries(run_dir: Path) -> list[dict]:
    return [read_wandb_file(f)["summary"] for f in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))]


def appended_summary(run_dir: Path, key: str) -> dict:
    """The summary of the newest offline W&B run folder, once it holds ``key``: wandb's service process
    writes the log of a run this process finished in its own time."""
    import time

    for _ in range(60):
        latest = summaries(run_dir)[-1]
        if key in latest:
            break
        time.sleep(0.5)
    return latest


def test_the_callback_computes_every_metric_and_records_its_provenance(run):
    logged = json.loads((run["run_dir"] / "fid" / "epoch000.json").read_text())
    results = logged["results"]
    assert logged["metrics"] == ["fid", "kid", "is", "prdc", "memorization", "class_fid", "cas"]
    for key in (
        "fid",
        "kid",
        "is",
        "precision",
        "recall",
        "density",
        "coverage",
        "memorization",
        "class_fid",
        "cas",
    ):
        assert f"val/{key}_digits" in results, key
    assert {f"val/class_fid_digits_{c}" for c in range(10)} <= set(results)
    assert 1 <= results["val/is_digits"] <= 10 and 0 <= results["val/cas_digits"] <= 1
    provenance = logged["provenance"]
    sha = hashlib.sha256(run["extractor"].read_bytes()).hexdigest()
    assert provenance["weights_sha256"] == sha and provenance["extractor"] == "domain"
    assert provenance["resize"] == "clean" and provenance["image_size"] == 16 and provenance["seed"] == 1234
    assert provenance["num_fake"] == N and provenance["num_real"] == 1222
    assert provenance["reference"] == "digits:train" and provenance["held_out"] == "digits:test"
    assert provenance["cas_classifier"] == "the extractor's head"
    (summary,) = summaries(run["run_dir"])
    assert summary["val/is_digits"] == pytest.approx(results["val/is_digits"], rel=1e-6)
    assert summary["val/provenance_digits/weights_sha256"] == sha
    assert summary["val/provenance_digits/resize"] == "clean"


def test_eval_gen_of_the_checkpoint_gives_the_callbacks_numbers(run, capsys):
    code, err = lgen_main(
        capsys,
        run["cwd"],
        "eval",
        "gen",
        f"ckpt={run['ckpt']}",
        f"n={N}",
        "seed=1234",
        f"batch_size={N}",
        f"domain_extractor_path={run['extractor']}",
    )
    assert code == 0, err
    offline = json.loads((run["run_dir"] / "eval" / "last" / "gen.json").read_text())
    online = json.loads((run["run_dir"] / "fid" / "epoch000.json").read_text())["results"]
    for key, value in offline["results"].items():
        assert value == pytest.approx(online[f"val/{key}"], rel=1e-9, abs=1e-12), key
    assert (
        offline["provenance"]["weights_sha256"]
        == json.loads((run["run_dir"] / "fid" / "epoch000.json").read_text())["provenance"]["weights_sha256"]
    )
    appended = appended_summary(run["run_dir"], "offline_eval/gen/fid_digits")
    assert appended["offline_eval/gen/fid_digits"] == pytest.approx(
        offline["results"]["fid_digits"], rel=1e-6
    )
    assert appended["offline_eval/gen/provenance_digits/num_fake"] == N


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image, "L").save(folder / f"{i:03d}.png")
    return folder


def test_image_files_statistics_files_and_the_pytorch_fid_layout(run, capsys, tmp_path):
    from lightning_gen.eval.extractors import ExtractorSettings, load_extractor
    from lightning_gen.eval.gen_cli import dataset_images
    from lightning_gen.methods.base import DataInfo

    pixels = (
        (torch.rand(30, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    )
    fake_dir = write_pngs(tmp_path / "fake", pixels)
    np.savez(tmp_path / "fake.npz", arr_0=pixels[..., None])  # (N, H, W, C), the ADM sampler's layout
    extractor, _ = load_extractor(
        "domain",
        DataInfo(name="digits", image_size=16),
        ExtractorSettings(domain_extractor_path=str(run["extractor"])),
    )
    test_images, _ = dataset_images("digits", "test", 16, [])
    with torch.no_grad():  # the features, independently of the command
        fake = extractor(torch.from_numpy(pixels)[:, None].float() / 255).double().numpy()
        real = torch.cat([extractor(x.float() / 255) for x, _ in test_images.batches(100)]).double().numpy()
    common = [
        "extractor=domain",
        f"domain_extractor_path={run['extractor']}",
        "metrics=[fid,kid,prdc]",
        "kid_subset_size=20",
    ]

    def gen(fake_arg: str, real_arg: str, *extra: str) -> dict:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        code, err = lgen_main(capsys, tmp_path, "eval", "gen", fake_arg, real_arg, f"out={out}", *extra)
        assert code == 0, err
        return json.loads((out / "gen.json").read_text())

    folder = gen(f"fake={fake_dir}", "real=digits:test", *common)
    assert folder["results"]["fid_digits"] == pytest.approx(
        scipy_fid(real, fake), rel=1e-6
    )  # batches of float32
    assert folder["provenance"]["reference"] == "digits:test" and folder["provenance"]["num_real"] == 359
    assert gen(f"fake={tmp_path / 'fake.npz'}", "real=digits:test", *common)["results"] == folder["results"]

    code, err = lgen_main(
        capsys, tmp_path, "eval", "stats", "data=digits", "split=test", "data.image_size=16",
        f"out={tmp_path / 'stats.npz'}", f"domain_extractor_path={run['extractor']}",
    )  # fmt: skip
    assert code == 0, err
    stats = np.load(tmp_path / "stats.npz")
    assert str(stats["extractor"]) == "domain" and str(stats["resize"]) == "clean"
    assert int(stats["image_size"]) == 16 and int(stats["n"]) == 359 and stats["sigma"].shape == (32, 32)
    read_back = gen(
        f"fake={fake_dir}", f"real={tmp_path / 'stats.npz'}", f"domain_extractor_path={run['extractor']}"
    )
    assert read_back["results"]["fid_digits"] == pytest.approx(folder["results"]["fid_digits"], rel=1e-9)
    assert set(read_back["metrics"]) == {"fid", "is"} and "real features" in read_back["skipped"]["prdc"]

    other = random_extractor(tmp_path / "other_extractor.pt", seed=4)  # same architecture, other weights
    for args, message in (
        (["extractor=inception"], "holds statistics of the domain extractor, not inception"),
        ([f"domain_extractor_path={other}"], "was measured with other digits weights"),
        (["resize=legacy", f"domain_extractor_path={run['extractor']}"], "was measured with resize=clean"),
    ):
        code, err = lgen_main(
            capsys, tmp_path, "eval", "gen", f"fake={fake_dir}", f"real={tmp_path / 'stats.npz'}", *args
        )
        assert code == 2 and message in err, err

    np.savez(tmp_path / "pytorch_fid.npz", mu=real.mean(0), sigma=np.cov(real, rowvar=False))  # nothing else
    foreign = gen(f"fake={fake_dir}", f"real={tmp_path / 'pytorch_fid.npz'}", *common[:2], "metrics=[fid]")
    assert foreign["results"]["fid_digits"] == pytest.approx(scipy_fid(real, fake), rel=1e-6)


def test_bad_input_is_one_error_line_and_writes_nothing(run, capsys, tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "mixed" / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "mixed" / "b.png")
    write_pngs(
        tmp_path / "fake", np.zeros((N, 16, 16), np.uint8) + np.arange(N, dtype=np.uint8)[:, None, None]
    )
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    domain = f"domain_extractor_path={run['extractor']}"
    cases = {
        "holds no images": ["fake=empty", "real=digits:test"],
        "holds images of different sizes: 16x16 (a.png) and 8x8 (b.png)": ["fake=mixed", "real=digits:test"],
        "has neither mu and sigma": ["fake=fake", "real=other.npz", domain],
        "kid_subset_size=100 is larger than the 40 generated": ["fake=fake", "real=digits:test", domain, "kid_subset_size=100"],
        "prdc with k=40 needs more than k generated": ["fake=fake", "real=digits:test", domain, "prdc_k=40"],
        "does not hold the FID InceptionV3's weights": ["fake=fake", "real=digits:test", f"inception_path={run['extractor']}", "extractor=inception"],
        "needs ckpt=PATH": ["real=digits:test"],
    }  # fmt: skip
    for message, args in cases.items():
        code, err = lgen_main(capsys, tmp_path, "eval", "gen", *args, "out=result")
        errors = [line for line in err.splitlines() if line.startswith("lgen: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, (
            message,
            err,
        )
        assert not (tmp_path / "result").exists()
    code, err = lgen_main(capsys, tmp_path, "eval", "stats", "data=digits", "out=stats.txt")
    assert code == 2 and "out=FILE.npz" in err and not (tmp_path / "stats.txt").exists()
