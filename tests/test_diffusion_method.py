"""method=diffusion: the ddpm / ddpm_cfg / flow presets train bitwise like the methods they replaced,
checkpoints of those methods load and sample as before, `lgen sample` runs every sampler with clear
errors for what cannot run, bits/dim through `lgen eval bpd`, and the sampler benchmark runs tiny.

The bitwise reference is an independent re-implementation of the replaced training steps (Algorithm 1
of Ho et al. with label dropout; the rectified-flow step), drawing from the same seeded streams.
tests/data/legacy_{ddpm_cfg,flow_cfg}.pt are checkpoints written by `lgen train` with the former
``ddpm`` and ``flow`` methods (experiments ddpm_cfg_digits and flow_digits with method.conditional=true,
width 4, 8 px, 3 steps; optimizer and loop states removed to keep them small), together with the
samples that code drew from them (``reference_samples``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_gen.cli import main as lgen_main
from lightning_gen.config import ConfigError, compose, section_object
from lightning_gen.methods.base import DataInfo, load_method
from lightning_gen.methods.generative.diffusion import Diffusion, DiffusionConfig
from lightning_gen.nets.unet import UNet
from tests.conftest import REPO, lgen_env, run_lgen

DATA = Path(__file__).parent / "data"
INFO = DataInfo(name="digits", channels=1, image_size=8, num_classes=10)
SMALL = ["method.width=8", "method.mults=[1,2]", "method.attention_resolutions=[4]"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preset(name: str, *overrides: str) -> Diffusion:
    cfg = compose([f"method={name}", "data=digits", *SMALL, *overrides])
    return Diffusion(section_object(cfg.method), INFO)


def drop_labels(labels: torch.Tensor, p: float, null: int) -> torch.Tensor:
    return torch.where((torch.rand(labels.shape) < p) | (labels < 0), torch.full_like(labels, null), labels)


def legacy_ddpm_loss(net, alpha_bar, images, labels, conditional: bool) -> torch.Tensor:
    """The former DDPM.step: t ~ U{0..T-1}, eps, label dropout; || eps - eps(sqrt(ab) x0 + sqrt(1-ab) eps) ||^2."""
    x0 = images.float() / 255.0 * 2.0 - 1.0
    i = torch.randint(0, len(alpha_bar), (len(x0),))
    eps = torch.randn_like(x0)
    y = drop_labels(labels, 0.1, 10) if conditional else None
    ab = alpha_bar[i].to(x0.dtype).view(-1, 1, 1, 1)
    return F.mse_loss(net(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, i, y).float(), eps.float())


def legacy_flow_loss(
    net, images, labels, conditional: bool, logit_normal: bool, reduction: str
) -> torch.Tensor:
    """The former RectifiedFlow.step: z, t (logit-normal or uniform), label dropout; || v(x_t, 1000 t) - (z - x) ||^2."""
    x = images.float() / 255.0 * 2.0 - 1.0
    z = torch.randn_like(x)
    t = torch.randn(len(x)).sigmoid() if logit_normal else torch.rand(len(x))
    xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * z
    y = drop_labels(labels, 0.1, 10) if conditional else None
    err = (net(xt, t * 1000.0, y).float() - (z - x).float()).pow(2)
    return err.mean() if reduction == "mean" else err.flatten(1).sum(1).mean()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ddpm", []),
        ("ddpm_cfg", []),
        ("flow", ["method.conditional=true"]),
        ("flow", ["method.t_sampling=uniform", "method.loss_reduction=sum"]),
    ],
)
def test_presets_train_bitwise_like_the_methods_they_replaced(name, overrides):
    torch.manual_seed(0)
    method = preset(name, *overrides)
    method.log_loss = lambda stage, loss: None  # no Trainer here to log to
    cfg = method.cfg
    torch.manual_seed(0)  # the former methods built exactly this U-Net from the same stream
    net = UNet(1, 8, 8, (1, 2), 1, (4,), 0.1, 10 if cfg.conditional else 0)
    assert all(torch.equal(a, b) for a, b in zip(method.net.state_dict().values(), net.state_dict().values()))
    ours = torch.optim.Adam(method.net.parameters(), lr=1e-3)
    theirs = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(3):
        torch.manual_seed(100 + step)
        batch = {
            "image": torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8),
            "label": torch.randint(0, 10, (6,)),
        }
        batch["label"][0] = -1  # an unlabeled image: always the null class
        state = torch.get_rng_state()
        loss = method.training_step(batch, step)
        torch.set_rng_state(state)
        if name.startswith("ddpm"):
            reference = legacy_ddpm_loss(
                net, method.process.alpha_bar, batch["image"], batch["label"], cfg.conditional
            )
        else:
            reference = legacy_flow_loss(
                net,
                batch["image"],
                batch["label"],
                cfg.conditional,
                cfg.t_sampling == "logit_normal",
                cfg.loss_reduction,
            )
        assert torch.equal(loss, reference), f"step {step}: {loss.item()} != {reference.item()}"
        for optimizer, value in ((ours, loss), (theirs, reference)):
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(method.net.state_dict().values(), net.state_dict().values()))


@pytest.mark.parametrize("name", ["legacy_ddpm_cfg", "legacy_flow_cfg"])
def test_checkpoints_of_the_former_methods_load_and_sample_as_before(name):
    path = DATA / f"{name}.pt"
    stored = torch.load(path, weights_only=False)
    assert stored["hyper_parameters"]["method"] in ("ddpm", "flow")
    method = load_method(str(path))
    assert method.registry_name == "diffusion" and method.conditional
    expected = {"legacy_ddpm_cfg": ("vp", "eps", 20, "ddim"), "legacy_flow_cfg": ("flow", "v", 0, "euler")}[
        name
    ]
    assert (method.cfg.process, method.cfg.prediction, method.cfg.timesteps, method.cfg.sampler) == expected
    for i, (call, reference) in enumerate(stored["reference_samples"].items()):
        options = dict(item.split("=") for item in call.split())
        cond = int(options.pop("class")) if "class" in options else None
        typed = {
            k: int(v) if k == "steps" else float(v) if k in ("eta", "guidance") else v
            for k, v in options.items()
        }
        images = method.sample(3, cond=cond, generator=torch.Generator().manual_seed(i + 1), **typed)
        assert (images - reference).abs().max() < 5e-4, call  # the same samples (float rounding aside)


def test_sample_cli_runs_heun_and_dpmpp_and_refuses_what_cannot_run(tmp_path, capsys):
    ckpt = DATA / "legacy_ddpm_cfg.pt"
    out = tmp_path / "heun.png"
    proc = run_lgen(
        "sample", f"ckpt={ckpt}", "n=4", "sampler=heun", "steps=3", "guidance=2", f"out={out}", cwd=tmp_path
    )
    assert out.is_file() and "sampler=heun, 3 steps, NFE 5, guided" in proc.stdout
    out = tmp_path / "dpm.png"
    assert lgen_main(["sample", f"ckpt={ckpt}", "n=2", "sampler=dpm++2m", "steps=4", f"out={out}"]) == 0
    assert out.is_file() and "NFE 4" in capsys.readouterr().out

    # an eps-model of rectified flow: x is unknowable from eps at t = 1, where ddim/euler/ddpm start
    flow_eps = Diffusion(
        DiffusionConfig(process="flow", prediction="eps", width=8, mults=(1,), attention_resolutions=()), INFO
    )
    bad_ckpt = tmp_path / "flow_eps.ckpt"
    torch.save({"hyper_parameters": dict(flow_eps.hparams), "state_dict": flow_eps.state_dict()}, bad_ckpt)
    for args, message in [
        (["sampler=euler"], "pure noise"),
        (["sampler=heun", "steps=0"], "steps must be at least 1"),
        (["sampler=heun", "eta=1"], "takes no eta"),
    ]:
        target = tmp_path / "never.png"
        assert lgen_main(["sample", f"ckpt={bad_ckpt}", "n=2", f"out={target}", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lgen: error:") and message in err[0], err
        assert not target.exists()
    assert (
        lgen_main(
            ["sample", f"ckpt={bad_ckpt}", "n=2", "sampler=heun", "steps=2", f"out={tmp_path / 'ok.png'}"]
        )
        == 0
    )


def test_configuration_errors_name_the_mismatch():
    with pytest.raises(ConfigError, match="timesteps=1000 .* process=vp only"):
        preset("flow", "method.timesteps=1000")
    with pytest.raises(ConfigError, match="method.sampler=ddim: .*pure noise"):
        preset("flow", "method.prediction=eps", "method.sampler=ddim")
    with pytest.raises(ConfigError, match="patch_size=3 does not divide the image size 8"):
        preset("diffusion", "method.net=dit", "method.dit.patch_size=3")


def test_the_diffusion_transformer_plugs_in_as_the_network():
    """method.net=dit: the same call f(x_t, t, y) and time input as the U-Net, CFG, every sampler."""
    dit = [
        "method.net=dit",
        "method.dit.width=16",
        "method.dit.depth=1",
        "method.dit.heads=2",
        "method.dit.learn_sigma=true",
    ]
    method = preset("diffusion", *dit, "method.conditional=true")
    assert type(method.net).__name__ == "DiT" and type(method.ema).__name__ == "DiT"
    method.log_loss = lambda stage, loss: None
    batch = {"image": torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), "label": torch.arange(4)}
    method.training_step(batch, 0).backward()
    assert (
        method.net.final_layer.linear.weight.grad.abs().sum() > 0
    )  # adaLN-Zero: the output layer learns first
    images = method.sample(
        2, cond=3, generator=torch.Generator().manual_seed(0), sampler="heun", steps=2, guidance=2.0
    )
    assert images.shape == (2, 1, 8, 8) and method.last_sample["nfe"] == 3


def test_every_process_and_prediction_trains_a_step_and_samples_with_every_sampler():
    for process in ("vp", "ve", "flow"):
        for prediction in ("eps", "x", "v"):
            method = preset(
                "diffusion",
                f"method.process={process}",
                f"method.prediction={prediction}",
                "method.conditional=true",
            )
            method.log_loss = lambda stage, loss: None
            batch = {
                "image": torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8),
                "label": torch.arange(4),
            }
            loss = method.training_step(batch, 0)
            loss.backward()
            assert torch.isfinite(loss) and all(
                torch.isfinite(p.grad).all() for p in method.net.parameters() if p.grad is not None
            )
            for sampler in ("ddpm", "ddim", "euler", "heun", "dpm++2m"):
                if (
                    prediction == "eps"
                    and method.process.pure_noise_at_end
                    and sampler in ("ddpm", "ddim", "euler")
                ):
                    continue
                images = method.sample(
                    2, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=2, guidance=1.0
                )
                assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
                assert method.last_sample["nfe"] == (3 if sampler == "heun" else 2)


def test_bits_per_dim_through_lgen_eval_bpd(tmp_path, capsys):
    ckpt = DATA / "legacy_ddpm_cfg.pt"
    out = tmp_path / "eval"
    assert (
        lgen_main(
            ["eval", "bpd", f"ckpt={ckpt}", "n=6", "draws=2", "batch_size=4", f"out={out}", "wandb=false"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "bpd.json").read_text())["results"]
    assert result["images"] == 6 and len(result["per_image"]) == 6 and result["estimator"] == "diffusion vlb"
    assert 0 < result["bits_per_dim"] < 64 and result["mc_stderr"] > 0 and "bits_per_dim" in printed
    method = load_method(str(ckpt))
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    bpd, var = method.bits_per_dim(
        images, estimator="ode", steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert bpd.shape == (2,) and torch.isfinite(bpd).all() and (var == 0).all()
    flow = load_method(str(DATA / "legacy_flow_cfg.pt"))
    bpd, var = flow.bits_per_dim(images, estimator="vlb", draws=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(bpd).all() and (var > 0).all()


def test_sampler_benchmark_runs_tiny(tmp_path):
    from lightning_gen.eval.fid_extractor import DomainFeatureNet, save_extractor

    torch.manual_seed(0)  # an untrained extractor is enough to exercise the table
    extractor = tmp_path / "extractor.pt"
    save_extractor(DomainFeatureNet(1, 8, 10, width=4), INFO, 4, 0.0, extractor)
    out = tmp_path / "nfe.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sampler_nfe.py"), str(DATA / "legacy_ddpm_cfg.pt"),
         "--n", "20", "--batch", "10", "--samplers", "heun", "ddim", "--steps", "2", "30",
         "--extractor", str(extractor), "--out", str(out)],
        cwd=tmp_path, env=lgen_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["models"]["legacy_ddpm_cfg"]
    by = {(r["sampler"], r["steps"]): r for r in rows}
    assert by[("heun", 2)]["nfe"] == 3 and by[("ddim", 2)]["nfe"] == 2 and by[("heun", 30)]["nfe"] == 59
    assert "at most T=20" in by[("ddim", 30)]["refused"]
    assert "| heun | 2 | 3 |" in proc.stdout


def test_log_normal_time_sampling_draws_the_noise_levels_of_karras_et_al_for_every_process():
    """t_sampling=log_normal: the noise level sigma = b/a of each drawn time is exp(m + s u) for the same
    normal draws u, whatever the process (the EDM training distribution, Karras et al. 2022)."""
    for process in ("vp", "ve", "flow"):
        method = preset(
            "diffusion",
            f"method.process={process}",
            "method.t_sampling=log_normal",
            "method.log_sigma_mean=-0.5",
            "method.log_sigma_std=0.8",
        )
        torch.manual_seed(0)
        coef, t_net = method.draw_time(2048, "cpu")
        torch.manual_seed(0)
        expected = -0.5 + 0.8 * torch.randn(2048)
        assert torch.allclose((coef.b / coef.a).log(), expected, atol=2e-3), process
        assert torch.equal(t_net, method.process.network_time(method.process.t_of_sigma(expected.exp())))
