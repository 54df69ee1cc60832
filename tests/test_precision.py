"""``trainer.precision=auto`` decides from the compute capability without initialising CUDA, and the
``16-mixed`` it picks for older GPUs scales the GAN's two manually stepped losses correctly.

This machine has no GPU: the capability is injected where NVML would report it (the GPU-side read is
``lightning_gen.precision._nvml_capabilities``, run by benchmarks/gpu_check.sh on a GPU node)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_gen import precision
from lightning_gen.config import compose


@pytest.mark.parametrize(
    ("capability", "cpu_bf16", "expected"),
    [
        ((9, 0), False, "bf16-mixed"),  # H100
        ((8, 0), False, "bf16-mixed"),  # A100: the first with bf16 tensor cores
        ((8, 6), True, "bf16-mixed"),
        ((7, 5), True, "16-mixed"),  # T4: emulated bf16 (is_bf16_supported() says True), fp16 tensor cores
        ((7, 0), False, "16-mixed"),  # V100
        (None, True, "bf16-mixed"),  # CPU with AVX-512-BF16 / AMX
        (None, False, "32-true"),
    ],
)
def test_auto_precision_decision(capability, cpu_bf16, expected):
    assert precision.auto_precision(capability, cpu_bf16) == expected


def test_resolving_auto_never_initialises_cuda(monkeypatch):
    """With GPUs visible (as NVML reports them), resolving reads no CUDA runtime state."""

    def forbidden(*args, **kwargs):
        raise AssertionError("resolve_precision initialised CUDA in the launching process")

    for name in ("_lazy_init", "is_bf16_supported", "get_device_capability", "current_device", "init"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(precision, "_nvml_capabilities", lambda: [(8, 0), (7, 5)])  # the oldest decides
    assert precision.resolve_precision("auto", "auto") == "16-mixed"
    assert precision.resolve_precision("auto", "cpu") in ("32-true", "bf16-mixed")  # the CPU alone
    assert precision.resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"  # a set precision is kept
    assert not torch.cuda.is_initialized()


def test_without_nvml_a_child_process_answers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(precision, "_nvml_capabilities", lambda: None)
    asked = []
    monkeypatch.setattr(precision, "_child_process_capabilities", lambda: asked.append(1) or [(9, 0)])
    assert precision.resolve_precision("auto", "gpu") == "bf16-mixed" and asked
    assert not torch.cuda.is_initialized()


def gan_after_one_step(precision_flag: str) -> dict[str, torch.Tensor]:
    cfg = compose(["experiment=gan_digits", "data.image_size=16", "data.batch_size=16"])
    from lightning_gen import run

    datamodule = run.build_datamodule(cfg)
    cfg.method.optimizer, cfg.method.lr, cfg.method.g_width, cfg.method.d_width = "sgd", 0.1, 8, 8
    torch.manual_seed(0)
    method = run.build_method(cfg, datamodule)
    before = {k: v.detach().clone() for k, v in method.state_dict().items() if v.is_floating_point()}
    # Lightning turns "16-mixed" on a CPU into bf16-mixed; its plugin given directly runs the same
    # GradScaler code as on a GPU (scale each backward, unscale and step, update the scale)
    mixed = [MixedPrecision("16-mixed", "cpu")] if precision_flag == "16-mixed" else []
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=mixed,
        precision=None if mixed else precision_flag,
        max_steps=2,  # manual optimisation: one D step and one G step
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(1)
    trainer.fit(method, datamodule=datamodule)
    if precision_flag == "16-mixed":
        assert trainer.precision_plugin.scaler is not None
        assert trainer.precision_plugin.scaler.get_scale() > 1  # the losses were scaled
    return {k: method.state_dict()[k] - v for k, v in before.items() if k.split(".")[0] != "ema"}


def test_16_mixed_unscales_both_gan_optimizers():
    """SGD steps are proportional to the gradient: had either manual step kept the loss scale
    (65536), its update would be 65536 times the float32 one, and a skipped step 0; fp16 autocast
    itself changes the
    update of each network by less than 20 % here (G 0.999, D 0.82 of the float32 update)."""
    exact, mixed = gan_after_one_step("32-true"), gan_after_one_step("16-mixed")
    for net in ("generator", "discriminator"):
        keys = [k for k in exact if k.startswith(net)]
        step_exact = torch.cat([exact[k].flatten() for k in keys]).norm()
        step_mixed = torch.cat([mixed[k].flatten() for k in keys]).norm()
        assert step_exact > 0, f"{net} did not move"
        assert 0.5 < (step_mixed / step_exact).item() < 2, (net, step_mixed, step_exact)
