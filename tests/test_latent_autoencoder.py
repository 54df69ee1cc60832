"""The latent-diffusion autoencoder (method=latent_autoencoder): trains, switches its discriminator on
at its start, resumes bitwise and is evaluated through the real CLI; the adaptive GAN weight against its
closed form; a diffusers-layout AutoencoderKL written here with random weights loads into this
project's network and computes what an independent forward written here computes."""

from __future__ import annotations

import csv
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from lightning_gen.checkpoint import CheckpointError
from lightning_gen.config import ConfigError
from lightning_gen.losses.gan import adaptive_weight, hinge_discriminator_loss, hinge_generator_loss
from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.generative.latent_autoencoder import (
    LatentAutoencoder,
    LatentAutoencoderConfig,
    load_latent_autoencoder,
)
from tests.conftest import lgen_env, run_lgen

ENV = lgen_env(OMP_NUM_THREADS="1")  # bitwise comparisons of sums need one fixed thread count
TINY = [
    "experiment=latent_autoencoder_digits",
    "data.image_size=16",
    "data.batch_size=32",
    "method.channels=[8,16]",  # f = 2: 8x8 latents
    "method.norm_groups=4",
    "method.latent_channels=2",
    "method.disc_width=8",
    "method.disc_start_epochs=1",
    "method.scale_images=100",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
]


def step_losses(run_dir) -> dict[int, str]:
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {int(r["step"]): r["train/loss_step"] for r in rows if r.get("train/loss_step")}, rows


def test_trains_switches_the_discriminator_on_resumes_bitwise_and_lgen_eval_recon_reports(tmp_path):
    runs = tmp_path / "runs" / "latent_autoencoder_digits"
    run_lgen("train", *TINY, "run_id=full", cwd=tmp_path, env=ENV)
    # epoch 0: only the autoencoder steps (2 batches, 2 optimizer steps); epoch 1: both (2 x 2 steps)
    run_lgen("train", *TINY, "run_id=cut", "callbacks.stop_after.steps=4", cwd=tmp_path, env=ENV)
    cut = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert cut["global_step"] == 4  # stopped after the first batch of epoch 1, mid-epoch
    resumed = run_lgen("train", *TINY, "run_id=cut", cwd=tmp_path, env=ENV)
    assert "resuming from" in resumed.stdout + resumed.stderr

    # D off in epoch 0 (1 optimizer step per batch), on in epoch 1 (2 per batch): 2 + 4 steps; a D that
    # trained from the start would make 8
    full = torch.load(runs / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    assert full["global_step"] == 2 + 4 and full["optimizer_states"][1]["state"]
    (losses_full, rows), (losses_cut, _) = step_losses(runs / "full"), step_losses(runs / "cut")
    assert losses_full == losses_cut and len(losses_full) == 4
    assert sorted(int(r["epoch"]) for r in rows if r.get("train/d_loss_step")) == [1, 1]
    assert sorted(int(r["epoch"]) for r in rows if r.get("train/g_loss_step")) == [1, 1]
    after = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    for name, value in full["state_dict"].items():
        assert torch.equal(value, after["state_dict"][name]), name

    # latent_scale in the checkpoint: 1 / std of the posterior means of the first 100 training images
    module = load_latent_autoencoder(runs / "full" / "checkpoints" / "last.ckpt")
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object

    data = registry.build("data", section_object(compose(TINY).data))  # the run's own splits
    data.setup()
    first = data.datasets["train"].images[:100].float() / 127.5 - 1
    means = module.autoencoder.encode(first)[0]
    assert module.latent_scale == pytest.approx(1 / means.std().item(), rel=1e-5)
    assert module.latent_scale.item() != 1.0 and module.latent_shape == (2, 8, 8)
    z = module.encode_latents(first[:4])
    assert torch.allclose(z, means[:4] * module.latent_scale, atol=1e-6)
    assert module.decode_latents(z).shape == (4, 1, 16, 16)

    # lgen eval recon: MSE / PSNR on the test split, FID of the reconstructions with a domain extractor
    from lightning_gen.eval.fid_extractor import DomainFeatureNet, save_extractor

    torch.manual_seed(0)
    extractor = tmp_path / "extractor.pt"
    save_extractor(DomainFeatureNet(1, 16, 10, width=4).eval(), data.info, 4, 0.0, extractor)
    proc = run_lgen(
        "eval",
        "recon",
        f"ckpt={runs / 'full' / 'checkpoints' / 'last.ckpt'}",
        f"domain_extractor_path={extractor}",
        cwd=tmp_path,
        env=ENV,
    )
    assert "psnr" in proc.stdout and "fid" in proc.stdout
    report = json.loads((runs / "full" / "eval" / "last" / "recon.json").read_text())["results"]
    test = data.datasets["test"].images
    assert report["images"] == len(test) == 359
    reconstruction = module.reconstruct(test)
    per_image = (reconstruction - test.float() / 255).square().flatten(1).mean(1)
    assert report["mse"] == pytest.approx(per_image.mean().item(), rel=1e-4)
    assert report["psnr"] == pytest.approx((-10 * per_image.log10()).mean().item(), rel=1e-4)
    assert math.isfinite(report["fid"]) and report["fid"] > 0


def test_adaptive_weight_and_hinge_losses_equal_their_closed_forms():
    g = torch.Generator().manual_seed(0)
    x, target, v = (
        torch.randn(5, 3, generator=g),
        torch.randn(5, 2, generator=g),
        torch.randn(5, 2, generator=g),
    )
    w = torch.randn(2, 3, generator=g, requires_grad=True)  # the "decoder's last layer"
    out = x @ w.T
    rec = (out - target).square().sum()
    gan = -(v * out).mean()
    # by hand: d/dw sum (wx - t)^2 = 2 (wx - t)^T x;  d/dw -mean(v * wx) = -v^T x / numel
    rec_grad = 2 * (x @ w.detach().T - target).T @ x
    gan_grad = -(v.T @ x) / v.numel()
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    assert adaptive_weight(rec, gan, w) == pytest.approx(expected.item(), rel=1e-5)
    assert adaptive_weight(rec, gan, w, max_weight=0.5).item() == 0.5  # clamped
    assert adaptive_weight(rec, 0 * out.sum(), w).item() == 1e4  # no GAN gradient: the cap
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.5])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(
        0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    )
    assert hinge_generator_loss(fake).item() == pytest.approx(0.5)


def test_bad_sizes_and_foreign_data_are_one_line_errors():
    cfg = LatentAutoencoderConfig(name="latent_autoencoder", channels=(8, 16, 16), norm_groups=4)
    with pytest.raises(
        ConfigError, match=r"data.image_size=30 is not a multiple of the downsampling factor f=4"
    ):
        LatentAutoencoder(cfg, DataInfo(name="digits", image_size=30))
    module = LatentAutoencoder(cfg, DataInfo(name="digits", image_size=28))
    with pytest.raises(ConfigError) as error:
        module.check_data(DataInfo(name="fashion_mnist", image_size=28), "ae.ckpt")
    assert "ae.ckpt was trained on digits at 28 px" in str(error.value) and "\n" not in str(error.value)
    module.check_data(DataInfo(name="digits", image_size=28))  # its own data: fine


# ------------------------------------------------------------------ the diffusers layout, written here
CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.3,
    "shift_factor": 0.1,
}


def diffusers_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor an AutoencoderKL of ``config`` has, by its diffusers name, with random values."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def norm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c), resnet(f"{name}.resnets.1", c, c)
        norm(f"{name}.attentions.0.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes.update(
                {f"{name}.attentions.0.{proj}.weight": (c, c), f"{name}.attentions.0.{proj}.bias": (c,)}
            )

    widths, latent, layers = (
        config["block_out_channels"],
        config["latent_channels"],
        config["layers_per_block"],
    )
    conv("encoder.conv_in", config["in_channels"], widths[0], 3)
    for i, w in enumerate(widths):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", widths[max(i - 1, 0)] if j == 0 else w, w)
        if i < len(widths) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", w, w, 3)
    mid("encoder.mid_block", widths[-1])
    norm("encoder.conv_norm_out", widths[-1]), conv("encoder.conv_out", widths[-1], 2 * latent, 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1), conv("post_quant_conv", latent, latent, 1)
    up = widths[::-1]
    conv("decoder.conv_in", latent, up[0], 3)
    mid("decoder.mid_block", up[0])
    for i, w in enumerate(up):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", up[max(i - 1, 0)] if j == 0 else w, w)
        if i < len(up) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", w, w, 3)
    norm("decoder.conv_norm_out", widths[0]), conv("decoder.conv_out", widths[0], config["out_channels"], 3)
    g = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """The format written from its description: u64 header length, JSON header, raw little-endian bytes."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def reference_autoencoder(W: dict[str, torch.Tensor], config: dict, x: torch.Tensor):
    """The AutoencoderKL forward written from the architecture's description, on the raw tensors:
    (posterior mean, log-variance, decoding of the mean)."""
    groups = config["norm_num_groups"]

    def gn(h, name):
        return F.group_norm(h, groups, W[f"{name}.weight"], W[f"{name}.bias"], eps=1e-6)

    def conv(h, name, stride=1, padding=1):
        return F.conv2d(h, W[f"{name}.weight"], W[f"{name}.bias"], stride=stride, padding=padding)

    def resnet(h, name):
        out = conv(F.silu(gn(h, f"{name}.norm1")), f"{name}.conv1")
        out = conv(F.silu(gn(out, f"{name}.norm2")), f"{name}.conv2")
        skip = conv(h, f"{name}.conv_shortcut", padding=0) if f"{name}.conv_shortcut.weight" in W else h
        return skip + out

    def attention(h, name):
        n, c, height, width = h.shape
        t = gn(h, f"{name}.group_norm").reshape(n, c, -1).transpose(1, 2)
        q, k, v = (t @ W[f"{name}.{p}.weight"].T + W[f"{name}.{p}.bias"] for p in ("to_q", "to_k", "to_v"))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        out = a @ W[f"{name}.to_out.0.weight"].T + W[f"{name}.to_out.0.bias"]
        return h + out.transpose(1, 2).reshape(n, c, height, width)

    def mid(h, name):
        return resnet(attention(resnet(h, f"{name}.resnets.0"), f"{name}.attentions.0"), f"{name}.resnets.1")

    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    h = conv(x, "encoder.conv_in")
    for i in range(levels):
        for j in range(layers):
            h = resnet(h, f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down_blocks.{i}.downsamplers.0.conv", 2, 0)
    h = conv(F.silu(gn(mid(h, "encoder.mid_block"), "encoder.conv_norm_out")), "encoder.conv_out")
    mean, logvar = conv(h, "quant_conv", padding=0).chunk(2, dim=1)
    h = conv(conv(mean, "post_quant_conv", padding=0), "decoder.conv_in")
    h = mid(h, "decoder.mid_block")
    for i in range(levels):
        for j in range(layers + 1):
            h = resnet(h, f"decoder.up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            h = conv(
                F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up_blocks.{i}.upsamplers.0.conv"
            )
    return mean, logvar, conv(F.silu(gn(h, "decoder.conv_norm_out")), "decoder.conv_out")


def test_a_diffusers_autoencoder_loads_from_safetensors_or_bin_and_computes_the_reference_forward(tmp_path):
    tensors = diffusers_tensors(CONFIG)
    folder = tmp_path / "sd" / "vae"  # a pipeline snapshot: the autoencoder in vae/
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar, decoded = reference_autoencoder(tensors, CONFIG, x)

    module = load_latent_autoencoder(tmp_path / "sd")
    assert module.latent_shape == (2, 8, 8) and module.downsampling_factor == 2
    got_mean, got_logvar = module.autoencoder.encode(x)
    assert torch.allclose(got_mean, mean, atol=1e-5) and torch.allclose(got_logvar, logvar, atol=1e-5)
    z = module.encode_latents(x)  # scaling_factor and shift_factor of the config
    assert torch.allclose(z, (mean - 0.1) * 0.3, atol=1e-5)
    assert torch.allclose(module.decode_latents(z), decoded, atol=1e-4)
    sampled = module.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == z.shape and not torch.allclose(sampled, z)

    # the older names (query/key/value/proj_attn, as 1x1 convs) in a .bin file give the same network
    old = {}
    for name, value in tensors.items():
        for new, before in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{before}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        old[name] = value
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    again = load_latent_autoencoder(folder / "diffusion_pytorch_model.bin")
    assert torch.allclose(again.autoencoder.decode(mean), decoded, atol=1e-4)

    # every tensor is checked: one missing is a one-line error naming it
    del old["decoder.conv_out.bias"]
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. decoder\.conv_out\.bias\)"):
        load_latent_autoencoder(folder)
    (folder / "config.json").write_text(
        json.dumps({**CONFIG, "down_block_types": ["CrossAttnDownBlock2D"] * 2})
    )
    with pytest.raises(ConfigError, match="CrossAttnDownBlock2D"):
        load_latent_autoencoder(folder)
