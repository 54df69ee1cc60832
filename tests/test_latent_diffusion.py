"""Latent diffusion (method.latents) through the real CLI: one command from a fresh directory trains the
stage-1 autoencoder and then the DiT on its latents; a second command reuses stage 1; a run stopped
mid-epoch and resumed equals the uninterrupted one bitwise; the checkpoint carries the frozen autoencoder,
so a copy samples decoded images with the autoencoder's files gone; under 2 DDP processes stage 1 runs
in its own 2 processes before stage 2's start. Bad input is in tests/test_first_hour.py."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from PIL import Image

from lightning_gen.cli import main as lgen_main
from lightning_gen.methods.base import load_method
from lightning_gen.methods.generative.latent_autoencoder import load_latent_autoencoder
from lightning_gen.stages import FINISHED
from tests.conftest import REPO, lgen_env, run_lgen

ENV = lgen_env(OMP_NUM_THREADS="1")  # bitwise comparisons of sums need one fixed thread count
STAGE1 = [  # the stage-1 recipe made tiny: 16 px -> 8x8x2 latents (f = 2), two steps
    "stage1.data.image_size=16",
    "stage1.method.channels=[8,16]",
    "stage1.method.norm_groups=4",
    "stage1.method.latent_channels=2",
    "stage1.method.disc_width=8",
    "stage1.method.scale_images=64",
    "stage1.trainer.max_epochs=1",
    "stage1.trainer.limit_train_batches=2",
    "stage1.trainer.limit_val_batches=1",
]
TINY = [
    "experiment=ldm_dit_digits",
    *STAGE1,
    "data.image_size=16",
    "data.batch_size=32",
    "method.dit.patch_size=2",  # 16 tokens of the 8x8 latents
    "method.dit.depth=1",
    "method.dit.width=16",
    "method.dit.heads=2",
    "method.sample_steps=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "callbacks.images.enabled=false",
]


def step_losses(run_dir) -> dict[int, str]:
    with open(run_dir / "metrics.csv") as handle:
        return {
            int(r["step"]): r["train/loss_step"] for r in csv.DictReader(handle) if r.get("train/loss_step")
        }


def test_one_command_trains_both_stages_reuses_stage1_resumes_bitwise_and_a_copy_samples_alone(
    tmp_path, capsys
):
    stage1_dir = tmp_path / "runs" / "latent_autoencoder_digits" / "stage1-seed0"
    runs = tmp_path / "runs" / "ldm_dit_digits"
    first = run_lgen("train", *TINY, "run_id=full", cwd=tmp_path, env=ENV)
    log = first.stdout + first.stderr
    assert (
        f"stage 1: training the autoencoder (experiment latent_autoencoder_digits) into {stage1_dir.relative_to(tmp_path)}/"
        in log
    )
    assert (stage1_dir / FINISHED).is_file()
    stage1_ckpt = stage1_dir / "checkpoints" / "last.ckpt"
    stage1_bytes = stage1_ckpt.read_bytes()

    cut = run_lgen("train", *TINY, "run_id=cut", "callbacks.stop_after.steps=3", cwd=tmp_path, env=ENV)
    assert "stage 1: reusing the finished autoencoder" in cut.stdout + cut.stderr
    assert "stage 1: training" not in cut.stdout + cut.stderr
    assert torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed = run_lgen("train", *TINY, "run_id=cut", cwd=tmp_path, env=ENV)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert stage1_ckpt.read_bytes() == stage1_bytes  # stage 1 neither retrained nor rewritten

    full = torch.load(runs / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    after = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert full["global_step"] == 4 and step_losses(runs / "full") == step_losses(runs / "cut")
    assert len(step_losses(runs / "full")) == 4
    for name, value in full["state_dict"].items():
        assert torch.equal(value, after["state_dict"][name]), name

    # The checkpoint carries stage 1's autoencoder, frozen: its weights and latent scale as trained, no
    # discriminator, nothing of it in the optimizer (Adam keeps state for the DiT's parameters only).
    stage1 = torch.load(stage1_ckpt, weights_only=False)["state_dict"]
    carried = {
        k.removeprefix("autoencoder."): v
        for k, v in full["state_dict"].items()
        if k.startswith("autoencoder.")
    }
    assert carried.keys() == {k for k in stage1 if not k.startswith("discriminator.")}
    assert all(torch.equal(carried[k], stage1[k]) for k in carried)
    assert carried["latent_scale"].item() != 1.0  # set from the data by stage 1
    dit_params = sum(1 for k in full["state_dict"] if k.startswith("net.") and not k.endswith("pos_embed"))
    assert len(full["optimizer_states"][0]["state"]) == dit_params
    assert full["hyper_parameters"]["latent_autoencoder"]["cfg"]["latent_channels"] == 2

    # Decoding is stage 1's decoder with its scale: samples in [0, 1] at the images' 16 px
    autoencoder = load_latent_autoencoder(stage1_ckpt)
    method = load_method(str(runs / "full" / "checkpoints" / "last.ckpt"))
    z = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(method.decode(z), ((autoencoder.decode_latents(z) + 1) / 2).clamp(0, 1))
    images = method.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 16, 16) and images.min() >= 0 and images.max() <= 1

    # A copied checkpoint samples on its own: the autoencoder's run directory is gone
    copy = tmp_path / "elsewhere" / "ldm.ckpt"
    copy.parent.mkdir()
    shutil.copy(runs / "full" / "checkpoints" / "last.ckpt", copy)
    shutil.rmtree(tmp_path / "runs" / "latent_autoencoder_digits")
    grid = tmp_path / "grid.png"
    proc = run_lgen(
        "sample",
        f"ckpt={copy}",
        "n=4",
        "nrow=4",
        "sampler=heun",
        "steps=2",
        f"out={grid}",
        cwd=tmp_path,
        env=ENV,
    )
    assert "4 diffusion samples (sampler=heun, 2 steps, NFE 3" in proc.stdout
    assert Image.open(grid).size == (4 * 17 + 1, 17 + 1)  # 16 px images (not 8 px latents), 1 px padding

    # bits/dim of the pixels is not defined for a latent model: one line, nothing written
    assert lgen_main(["eval", "bpd", f"ckpt={copy}", "n=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs on an autoencoder's latents" in err[0], err
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ldm.ckpt"]


def test_a_stage1_folder_trained_with_other_settings_is_not_reused(tmp_path, monkeypatch, capsys):
    """The folder of stage 1 holds a run of another recipe: one line, nothing created or trained."""
    monkeypatch.chdir(tmp_path)
    stage1_dir = tmp_path / "runs" / "latent_autoencoder_digits" / "stage1-seed0"
    stage1_dir.mkdir(parents=True)
    from lightning_gen.config import compose, to_yaml
    from lightning_gen.stages import stage1_overrides

    other = compose(stage1_overrides(compose(TINY)) + ["method.kl_weight=0.5"])
    (stage1_dir / "config.yaml").write_text(to_yaml(other))
    assert lgen_main(["train", *TINY, "run_id=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "holds a stage 1 trained with other settings (method: kl_weight=0.5 there" in err[0]
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latent_autoencoder_digits"]
    assert [p.name for p in stage1_dir.iterdir()] == ["config.yaml"]


def test_under_ddp_stage1_trains_in_its_own_processes_before_stage2_starts(tmp_path):
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1"]
    proc = run_lgen("train", *TINY, *ddp, "run_id=ddp", cwd=tmp_path, env=ENV)
    log = proc.stdout + proc.stderr
    # stage 1 ran with the command's devices, as a run of its own, and finished before stage 2 began
    stage1_at = log.index("experiment latent_autoencoder_digits: method=latent_autoencoder")
    stage2_at = log.index("experiment ldm_dit_digits: method=diffusion")
    assert stage1_at < log.index("[lgen] stage 1 finished") < stage2_at
    assert log.count("x 2 processes") == 2  # both stages: 2 DDP processes
    ckpt = torch.load(
        tmp_path / "runs" / "ldm_dit_digits" / "ddp" / "checkpoints" / "last.ckpt", weights_only=False
    )
    assert ckpt["global_step"] == 2
    stage1 = torch.load(
        tmp_path / "runs" / "latent_autoencoder_digits" / "stage1-seed0" / "checkpoints" / "last.ckpt",
        weights_only=False,
    )
    assert torch.equal(ckpt["state_dict"]["autoencoder.latent_scale"], stage1["state_dict"]["latent_scale"])


def test_the_imagenet_dit_recipe_runs_on_a_diffusers_autoencoder_folder(tmp_path):
    """dit_xl2_imagenet256 on Stable Diffusion's VAE layout (random weights written here, 16 px, f = 2):
    latents scaled and shifted by the folder's factors, a step trains, guided ancestral sampling decodes."""
    import json

    from lightning_gen.config import compose, section_object
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.diffusion import Diffusion
    from tests.test_latent_autoencoder import CONFIG, diffusers_tensors, write_safetensors

    folder = tmp_path / "sd-vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", diffusers_tensors(CONFIG))
    cfg = compose(
        [
            "experiment=dit_xl2_imagenet256",
            f"method.latents=ckpt:{folder}",
            *("method.dit.depth=1", "method.dit.width=16", "method.dit.heads=2"),  # XL/2's patch 2 stays
            "method.timesteps=20",
        ]
    )
    assert (cfg.method.lr, cfg.method.weight_decay, cfg.method.ema_decay, cfg.method.prediction) == (
        1e-4,
        0.0,
        0.9999,
        "eps",
    )
    torch.manual_seed(0)
    method = Diffusion(
        section_object(cfg.method), DataInfo(name="folder", channels=3, image_size=16, num_classes=1000)
    )
    assert method.model_shape == (2, 8, 8) and method.net.patch_size == 2
    assert method.autoencoder.latent_scale.item() == pytest.approx(0.3)
    assert method.autoencoder.latent_shift.item() == pytest.approx(0.1)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean = method.autoencoder.autoencoder.encode(images.float() / 127.5 - 1)[0]
    torch.manual_seed(1)
    latents = method.encode(images)  # a draw of q(z|x), scaled
    torch.manual_seed(1)
    noise = torch.randn_like(mean)
    logvar = method.autoencoder.autoencoder.encode(images.float() / 127.5 - 1)[1]
    assert torch.allclose(latents, (mean + (0.5 * logvar).exp() * noise - 0.1) * 0.3, atol=1e-6)
    method.log_loss = lambda stage, loss: None
    loss = method.training_step({"image": images, "label": torch.tensor([3, 999])}, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in method.autoencoder.parameters())
    sample = method.sample(
        2, cond=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), steps=3, guidance=0.5
    )
    assert sample.shape == (2, 3, 16, 16) and method.last_sample["nfe"] == 3


def test_the_unet_runs_on_odd_latent_sizes_and_is_unchanged_on_even_ones():
    """7x7 latents (28 px at f = 4): 7 -> 4 -> 7. On an even size the up path equals the former
    nn.Upsample(scale_factor=2) exactly (the blocks run here by hand, as the former forward did)."""
    from lightning_gen.nets.unet import UNet, sinusoidal_embedding

    torch.manual_seed(0)
    odd = UNet(4, 7, 8, (1, 2), 1, (4,), 0.0, 10)
    out = odd(torch.randn(2, 4, 7, 7), torch.tensor([3.0, 500.0]), torch.tensor([1, 10]))
    assert out.shape == (2, 4, 7, 7)
    assert any(type(m).__name__ == "Attention" for m in odd.down[-1])  # attention at the 4x4 level

    net = UNet(1, 8, 8, (1, 2), 1, (4,), 0.0, 0).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 20.0, 700.0])
    emb = net.time_mlp(sinusoidal_embedding(t, net.width))
    h = net.stem(x)
    hs = [h]
    for block in net.down:
        h = net._run(block, h, emb)
        hs.append(h)
    h = net.mid[2](net.mid[1](net.mid[0](h, emb)), emb)
    for block in net.up:
        if isinstance(block, torch.nn.ModuleList):
            h = net._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        else:
            h = block(h)  # nn.Upsample(scale_factor=2), then the conv
    assert torch.equal(net(x, t), net.head(h))


def tiny_autoencoder(path, seed: int = 0) -> str:
    """A latent-autoencoder checkpoint of digits at 16 px (8x8x2 latents), as load_method reads it."""
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.latent_autoencoder import LatentAutoencoder, LatentAutoencoderConfig

    torch.manual_seed(seed)
    cfg = LatentAutoencoderConfig(
        name="latent_autoencoder", channels=(8, 16), norm_groups=4, latent_channels=2
    )
    module = LatentAutoencoder(cfg, DataInfo(name="digits", channels=1, image_size=16))
    module.latent_scale.fill_(1.7)  # as a trained one: latents scaled to unit variance
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


def test_latents_cached_by_lgen_latents_train_as_encoding_on_the_fly(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    ae = tiny_autoencoder(tmp_path / "ae.ckpt")
    assert lgen_main(["latents", f"ckpt={ae}", "data=digits", "data.image_size=16", "out=cache"]) == 0
    meta = json.loads((tmp_path / "cache" / "latents.json").read_text())
    assert meta["splits"] == {"train": 1222, "val": 216, "test": 359} and meta["latent_shape"] == [2, 8, 8]
    # the cached posterior is the autoencoder's, unscaled, of the DataModule's own split
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object

    data = registry.build("data", section_object(compose(["data=digits", "data.image_size=16"]).data))
    data.setup()
    cached = torch.load(tmp_path / "cache" / "val.pt")
    mean, std = load_latent_autoencoder(ae).posterior(data.datasets["val"].images[:5].float() / 127.5 - 1)
    assert torch.allclose(cached["mean"][:5], mean, atol=1e-6) and torch.allclose(
        cached["std"][:5], std, atol=1e-6
    )
    assert torch.equal(cached["label"], data.datasets["val"].labels)

    common = [
        *TINY[:1],
        f"method.latents=ckpt:{ae}",
        *[a for a in TINY if a.startswith(("data.", "method.dit", "trainer.", "logger.", "callbacks."))],
        "trainer.max_epochs=1",
    ]
    assert lgen_main(["train", *common, "run_id=fly"]) == 0
    assert lgen_main(["train", *common, "data=latents", "data.path=cache", "run_id=cached"]) == 0
    runs = tmp_path / "runs" / "ldm_dit_digits"
    fly, from_cache = step_losses(runs / "fly"), step_losses(runs / "cached")
    assert len(fly) == 2 and fly.keys() == from_cache.keys()
    # the same draws and operations; the encoder ran on other batch compositions, hence not bitwise
    assert all(float(fly[k]) == pytest.approx(float(from_cache[k]), rel=1e-5) for k in fly)

    # latents of another autoencoder than the method's: one line, nothing created
    other = tiny_autoencoder(tmp_path / "other.ckpt", seed=1)
    capsys.readouterr()
    argv = [
        "train",
        *common,
        "data=latents",
        "data.path=cache",
        f"method.latents=ckpt:{other}",
        "run_id=other",
    ]
    assert lgen_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the latents of another autoencoder" in err[0], err
    assert not (runs / "other").exists()


def test_result_rows_are_written_into_the_page_and_committed_one_by_one(tmp_path, monkeypatch):
    """benchmarks/result_rows.py: each finished row goes to the JSON file and between the page's markers
    at once, one commit per row (a git repository made here); a rerun finds the rows it has."""
    import subprocess
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from result_rows import ResultRows

    for key, value in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }.items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    page = tmp_path / "page.md"
    page.write_text("# Results\n\n<!-- t:begin -->\nNot measured yet.\n<!-- t:end -->\n\nafter\n")
    render = lambda rows: "\n".join(f"| {k} | {v['fid']} |" for k, v in rows.items())  # noqa: E731
    rows = ResultRows(tmp_path / "results" / "t.json", {"t": render}, page, commit=True)
    rows.add("a", {"fid": 1.5})
    rows.add("b", {"fid": 2.5})
    assert (
        page.read_text()
        == "# Results\n\n<!-- t:begin -->\n| a | 1.5 |\n| b | 2.5 |\n<!-- t:end -->\n\nafter\n"
    )
    log = subprocess.run(
        ["git", "log", "--format=%s"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert log.stdout.split("\n")[:2] == ["t: b row", "t: a row"]
    again = ResultRows(tmp_path / "results" / "t.json", {"t": render}, page)
    assert "a" in again and "b" in again and "c" not in again


def test_the_result_scripts_run_tiny(tmp_path):
    """benchmarks/ldm_fashion_mnist.py (stage 1, then the latent DiT: FID rows, recon, grids, FID vs NFE)
    and benchmarks/diffusion_grid_digits.py (one cell) with everything shrunk; untrained extractors."""
    import json
    import subprocess
    import sys

    from lightning_gen.eval.fid_extractor import DomainFeatureNet, save_extractor
    from lightning_gen.methods.base import DataInfo

    torch.manual_seed(0)
    for name, size in (("fashion_mnist", 28), ("digits", 16)):
        net = DomainFeatureNet(1, size, 10, width=4).eval()
        save_extractor(net, DataInfo(name=name, image_size=size), 4, 0.0, tmp_path / f"{name}.pt")
    out = tmp_path / "out"
    common = ["--tiny", "--results", str(out), "--n", "20"]
    for script, extra in (
        (
            "ldm_fashion_mnist.py",
            ["--only", "ldm_dit_fashion_mnist", "--nfe-n", "10", "--nfe-steps", "2", "--guidance", "1"],
        ),
        ("diffusion_grid_digits.py", ["--cells", "flow:eps"]),
    ):
        name = script.split("_")[0] + "_" + script.split("_")[1]
        extractor = tmp_path / ("fashion_mnist.pt" if script.startswith("ldm") else "digits.pt")
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / script),
                *common,
                *extra,
                "--extractor",
                str(extractor),
            ],
            cwd=tmp_path,
            env=ENV,
            check=True,
            capture_output=True,
            timeout=600,
        )
    rows = json.loads((out / "ldm_fashion_mnist.json").read_text())
    assert sorted(rows) == [
        "floor",
        "latent_autoencoder_fashion_mnist",
        "ldm_dit_fashion_mnist",
        "samplers ldm_dit_fashion_mnist",
    ]
    dit = rows["ldm_dit_fashion_mnist"]
    assert dit["network"] == "dit" and dit["steps"] == 2 and dit["test_bits_per_dim"] is None
    assert {p["sampler"] for p in rows["samplers ldm_dit_fashion_mnist"]["points"]} == {
        "ddpm",
        "ddim",
        "euler",
        "heun",
        "dpm++2m",
    }
    assert (out / "grids" / "fashion_mnist_ldm_dit_fashion_mnist_w1.png").is_file()
    assert rows["latent_autoencoder_fashion_mnist"]["psnr"] > 0
    grid = json.loads((out / "diffusion_grid_digits.json").read_text())
    assert sorted(grid) == ["floor", "flow:eps"] and grid["flow:eps"]["test_bits_per_dim"] > 0
    assert (out / "grids" / "diffusion_grid_digits_flow_eps.png").is_file()


@pytest.mark.parametrize("name", ["edm_cifar10", "edm_cifar10_cond"])
def test_the_edm_recipes_train_a_step_and_sample_with_heun(name):
    """Karras et al.'s settings (log-normal noise levels, Heun 18 = 35 NFE, EMA half-life 0.5 Mimg at
    batch 512); the U-Net made tiny here."""
    from lightning_gen.config import compose, section_object
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.diffusion import Diffusion

    cfg = compose([f"experiment={name}", "method.width=8", "method.blocks_per_level=1"])
    m = cfg.method
    assert (m.t_sampling, m.log_sigma_mean, m.log_sigma_std, m.sampler, m.sample_steps) == (
        "log_normal",
        -1.2,
        1.2,
        "heun",
        18,
    )
    assert m.ema_decay == pytest.approx(0.5 ** (512 / 500_000), abs=1e-5)
    assert cfg.data.batch_size * cfg.cluster.gpus_per_node == 512
    torch.manual_seed(0)
    method = Diffusion(section_object(m), DataInfo(name="cifar10", channels=3, image_size=32, num_classes=10))
    assert method.conditional == (name == "edm_cifar10_cond")
    method.log_loss = lambda stage, loss: None
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([1, 2])}
    assert torch.isfinite(method.training_step(batch, 0))
    images = method.sample(2, generator=torch.Generator().manual_seed(0), steps=2)
    assert images.shape == (2, 3, 32, 32) and method.last_sample["nfe"] == 3
