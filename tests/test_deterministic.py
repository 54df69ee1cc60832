"""trainer.deterministic = true | false | warn, and the deterministic stand-ins of lightning_gen.nets.deterministic.

CUDA raises under ``torch.use_deterministic_algorithms(True)`` for adaptive-average-pooling and bicubic
backward and for the 4-D NLL; the CPU kernels do not, so on CPU the tests show (1) that each stand-in
equals the op it replaces, value and gradient, and (2) that with deterministic algorithms on, a training
step of the conv backbone on a multi-crop local view, of the ViT on a smaller crop and of split-brain
colorization never calls those ops (recorded by a TorchDispatchMode), while with the setting off it does
(so the recorder sees them).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_gen.config import ConfigError, compose, validate
from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.ssl.colorization import Colorization, ColorizationConfig
from lightning_gen.nets.backbones import BackboneConfig, build_backbone
from lightning_gen.nets.deterministic import bicubic_by_matmul, cross_entropy_by_gather, pool_by_matmul

# the aten ops that have no deterministic CUDA kernel (torch.use_deterministic_algorithms' list)
NONDETERMINISTIC_ON_CUDA = {
    "aten._adaptive_avg_pool2d_backward.default",
    "aten.upsample_bicubic2d_backward.grad_input",
    "aten.upsample_bicubic2d_backward.default",
    "aten.nll_loss2d_forward.default",
}


def value_and_grad(fn, x: torch.Tensor, *args):
    x = x.detach().requires_grad_(True)
    out = fn(x, *args)
    weights = torch.randn_like(out, generator=torch.Generator().manual_seed(1))  # a generic upstream gradient
    (out * weights).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("size_in", [2, 3, 6, 8, 16])
def test_pooling_by_matmul_equals_adaptive_average_pooling(size_in):
    x = torch.randn(
        2, 3, size_in, size_in + 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    expected = value_and_grad(F.adaptive_avg_pool2d, x, 4)
    got = value_and_grad(pool_by_matmul, x, 4)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "size_in, size_out", [(4, (2, 2)), (14, (6, 6)), (4, (3, 5)), (2, (5, 5)), (3, (3, 3))]
)
def test_bicubic_by_matmul_equals_bicubic_interpolation(size_in, size_out):
    x = torch.randn(1, 8, size_in, size_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def bicubic(t, size):
        return F.interpolate(t, size=size, mode="bicubic", align_corners=False)

    expected = value_and_grad(bicubic, x, size_out)
    got = value_and_grad(bicubic_by_matmul, x, size_out)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_cross_entropy_by_gather_equals_the_4d_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, 4, dtype=torch.float64, generator=generator)
    target = torch.randint(0, 7, (3, 5, 4), generator=generator)
    expected = value_and_grad(F.cross_entropy, logits, target)
    got = value_and_grad(cross_entropy_by_gather, logits, target)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def training_steps() -> None:
    """Forward and backward of the three code paths."""
    torch.manual_seed(0)
    conv = build_backbone(BackboneConfig(name="conv", conv_width=8, conv_dim=16), 1, 16)
    conv(torch.rand(2, 1, 8, 8)).sum().backward()  # a local crop: 2x2 features pooled to 4x4
    vit = build_backbone(BackboneConfig(name="vit", patch_size=4, depth=1, width=16, heads=2), 1, 16)
    vit(torch.rand(2, 1, 8, 8)).sum().backward()  # 2x2 patches: position embeddings resized from 4x4
    cfg = ColorizationConfig(
        backbone=BackboneConfig(name="conv", conv_width=8, conv_dim=16), decoder_width=8, split_brain=True
    )
    colorization = Colorization(cfg, DataInfo(channels=3, image_size=16, num_classes=0))
    colorization.pretext_loss(torch.rand(2, 3, 16, 16), "train")[0].backward()


def test_deterministic_mode_avoids_the_ops_without_a_deterministic_cuda_kernel():
    with deterministic_algorithms(False), RecordOps() as fast:
        training_steps()
    assert NONDETERMINISTIC_ON_CUDA & fast.names >= {
        "aten._adaptive_avg_pool2d_backward.default",
        "aten.nll_loss2d_forward.default",
    } and any("bicubic2d_backward" in name for name in fast.names)
    with deterministic_algorithms(True), RecordOps() as deterministic:
        training_steps()
    assert not NONDETERMINISTIC_ON_CUDA & deterministic.names
    assert not any("bicubic2d_backward" in name for name in deterministic.names)


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("warn", "warn")])
def test_trainer_deterministic_takes_true_false_or_warn_to_lightning(tmp_path, value, expected):
    from lightning_gen.run import build_trainer

    cfg = validate(
        compose(["experiment=simclr_digits", f"trainer.deterministic={value}", "trainer.accelerator=cpu"])
    )
    assert cfg.trainer.deterministic == expected
    with deterministic_algorithms(False):
        build_trainer(cfg, [], [], tmp_path)
        assert torch.are_deterministic_algorithms_enabled() == (expected is not False)
        assert torch.is_deterministic_algorithms_warn_only_enabled() == (expected == "warn")


def test_trainer_deterministic_refuses_anything_else():
    with pytest.raises(ConfigError, match="trainer.deterministic: expected true .* warn .* or false"):
        validate(compose(["experiment=simclr_digits", "trainer.deterministic=sometimes"]))
