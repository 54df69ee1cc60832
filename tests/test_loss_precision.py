"""Every loss computes in float32 under mixed precision: under CPU bf16 autocast its value and its
gradients equal the float32 ones within 1e-6 (relative), for float32 inputs and for bf16 inputs
(compared with the float32 computation on the same, upcast values). Without ``full_precision``
NT-Xent is off in the third digit (checked below, so the comparison is known to be sensitive), and
the Barlow Twins / VICReg matrices overflow float16 at realistic batch sizes."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import lightning_gen.losses as losses_package
from lightning_gen.losses.classification import labeled_cross_entropy
from lightning_gen.losses.contrastive import info_nce, moco_loss, nt_xent
from lightning_gen.losses.dino import DINOLoss
from lightning_gen.losses.elbo import (
    bernoulli_nll,
    gaussian_nll,
    importance_weighted_bound,
    kl_standard_normal,
)
from lightning_gen.losses.gan import (
    discriminator_loss,
    generator_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from lightning_gen.losses.noncontrastive import (
    barlow_twins_loss,
    byol_regression,
    covariance_term,
    negative_cosine,
    variance_term,
    vicreg_loss,
)
from lightning_gen.losses.quantization import commitment_loss
from lightning_gen.losses.regression import squared_error
from lightning_gen.losses.swav import assign_codes, sinkhorn_knopp, swapped_prediction_loss

# Public callables of lightning_gen.losses that are not losses, and why they need no float32 guard.
NOT_LOSSES = {
    "precision.full_precision": "the mechanism itself",
    "contrastive.KeyQueue": "a buffer of detached, normalised keys",
    "swav.FeatureQueue": "a buffer of detached embeddings",
    "elbo.reparameterize": "a sample, not a loss (elementwise: autocast leaves it alone)",
    "elbo.bits_per_dim": "an affine rescaling of an NLL already in float32",
    "elbo.discrete_bits_per_dim": "an affine rescaling of an NLL already in float32",
    "noncontrastive.standardize": "a helper called inside barlow_twins_loss (guarded there)",
    "noncontrastive.off_diagonal": "a view of a matrix",
    "gan.adaptive_weight": "a ratio of gradient norms (float32 inside) of losses guarded themselves; "
    "casting its last_layer argument would cut it from the graph",
}


def g(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def first(out):
    return out[0] if isinstance(out, tuple) else out


def dino_loss(student, teacher):
    loss = DINOLoss(16, student_temp=0.1)
    loss.center.copy_(g(9, 1, 16) * 0.1)
    return loss(student, teacher, 0.04)


codes = sinkhorn_knopp(g(7, 8, 10))
# name -> (loss of a list of inputs, the inputs: differentiable float32 leaves, or fixed tensors)
CASES = {
    "nt_xent": (lambda z: nt_xent(z, torch.arange(8).repeat(2), 0.1, gather=False), [g(0, 16, 32)]),
    "nt_xent_supervised": (
        lambda z: nt_xent(z, torch.tensor([0, 1, 2, 3] * 4), 0.5, gather=False),
        [g(1, 16, 32)],
    ),
    "info_nce": (lambda q, k: info_nce(q, k, 0.2, gather=False), [g(2, 8, 32), g(3, 8, 32)]),
    "moco_loss": (
        lambda q, k, queue: first(moco_loss(q, k, queue, 0.07)),
        [g(4, 8, 32), g(5, 8, 32), g(6, 64, 32)],
    ),
    "dino": (
        lambda a, b, c, d: dino_loss([a, b, c, d], [a.detach() * 0.5, b.detach()]),
        [g(i, 8, 16) for i in range(4)],
    ),
    "sinkhorn_knopp": (lambda s: sinkhorn_knopp(s, 0.05), [g(7, 8, 10)]),
    "assign_codes": (lambda s, q: assign_codes(s, q, 0.05), [g(8, 8, 10), g(10, 12, 10)]),
    "swapped_prediction": (
        lambda a, b, c: swapped_prediction_loss([a, b, c], [codes, codes], 0.1),
        [g(i, 8, 10) for i in range(3)],
    ),
    "byol_regression": (byol_regression, [g(11, 8, 32), g(12, 8, 32)]),
    "negative_cosine": (negative_cosine, [g(13, 8, 32), g(14, 8, 32)]),
    "barlow_twins": (
        lambda a, b: barlow_twins_loss(a, b, 5e-3, gather=False),
        [g(15, 32, 24), g(16, 32, 24)],
    ),
    "vicreg": (lambda a, b: first(vicreg_loss(a, b, gather=False)), [g(17, 32, 24), g(18, 32, 24)]),
    "variance_term": (variance_term, [g(19, 32, 24, scale=0.5)]),
    "covariance_term": (covariance_term, [g(20, 32, 24)]),
    "kl_standard_normal": (lambda m, v: kl_standard_normal(m, v).mean(), [g(21, 8, 16), g(22, 8, 16)]),
    "gaussian_nll": (
        lambda x, m, v: gaussian_nll(x, m, v).mean(),
        [g(23, 8, 64), g(24, 8, 64), g(25, 8, 64)],
    ),
    "gaussian_nll_fixed": (lambda x, m: gaussian_nll(x, m, -4.6).mean(), [g(26, 8, 64), g(27, 8, 64)]),
    "bernoulli_nll": (lambda x, z: bernoulli_nll(x, z).mean(), [g(28, 8, 64).sigmoid(), g(29, 8, 64)]),
    "discriminator": (discriminator_loss, [g(30, 16, 1, scale=3), g(31, 16, 1, scale=3)]),
    "generator_non_saturating": (lambda f: generator_loss(f, "non_saturating"), [g(32, 16, 1, scale=3)]),
    "generator_minimax": (lambda f: generator_loss(f, "minimax"), [g(33, 16, 1, scale=3)]),
    "hinge_discriminator": (hinge_discriminator_loss, [g(39, 16, 1, scale=3), g(40, 16, 1, scale=3)]),
    "hinge_generator": (hinge_generator_loss, [g(41, 16, 1, scale=3)]),
    "commitment": (commitment_loss, [g(42, 4, 8, 3, 3), g(43, 4, 8, 3, 3)]),
    # log-weights of images are thousands of nats: the bound's logsumexp must not round them
    "importance_weighted_bound": (lambda w: importance_weighted_bound(w).float(), [g(44, 5, 4, scale=2000)]),
    "squared_error_mean": (squared_error, [g(34, 4, 3, 8, 8), g(35, 4, 3, 8, 8)]),
    "squared_error_sum": (lambda p, t: squared_error(p, t, "sum"), [g(36, 4, 3, 8, 8), g(37, 4, 3, 8, 8)]),
    "labeled_cross_entropy": (
        lambda z: labeled_cross_entropy(z, torch.tensor([0, 1, -1, 3, -1, 2, 4, 0]))[0],
        [g(38, 8, 5)],
    ),
}


def value_and_grads(fn, inputs, dtype=None, autocast=False):
    leaves = [x.clone().to(dtype or x.dtype).requires_grad_(True) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    if not out.requires_grad:  # Sinkhorn-Knopp's codes carry no gradient by design
        return out.detach().float(), []
    out.sum().backward()
    return out.detach().float(), [
        x.grad.float() if x.grad is not None else torch.zeros(x.shape) for x in leaves
    ]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("name", list(CASES))
def test_loss_under_bf16_autocast_equals_float32(name):
    fn, inputs = CASES[name]
    value, grads = value_and_grads(fn, inputs)
    amp_value, amp_grads = value_and_grads(fn, inputs, autocast=True)
    assert relative(amp_value, value) <= 1e-6, (name, amp_value, value)
    for amp, exact in zip(amp_grads, grads):
        assert relative(amp, exact) <= 1e-6, name
    # bf16 inputs, as a bf16 network gives them: the float32 computation on the same values
    rounded = [x.to(torch.bfloat16).float() for x in inputs]
    value, grads = value_and_grads(fn, rounded)
    amp_value, amp_grads = value_and_grads(fn, inputs, dtype=torch.bfloat16, autocast=True)
    assert relative(amp_value, value) <= 1e-6, (name, amp_value, value)
    for amp, exact in zip(amp_grads, grads):
        assert relative(amp, exact) <= 2**-8, name  # the gradient itself arrives in bf16


def test_without_full_precision_autocast_changes_nt_xent():
    """What the guard prevents: the undecorated NT-Xent multiplies in bf16 under autocast."""
    z, index = g(0, 16, 32), torch.arange(8).repeat(2)
    exact = nt_xent.__wrapped__(z, index, 0.1, gather=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse = nt_xent.__wrapped__(z, index, 0.1, gather=False)
    assert relative(coarse.float(), exact) > 1e-4


def test_barlow_and_vicreg_matrices_stay_finite_where_float16_overflows():
    """Covariances of embeddings with std 8 over a batch of 2048: sums up to 2048 x 64 = 131072 > 65504,
    float16's largest value. Under float16 autocast the guarded losses are finite and equal float32."""
    z1, z2 = g(40, 2048, 16, scale=8), g(41, 2048, 16, scale=8)
    centred = (z1 - z1.mean(0)).half()
    assert torch.isinf(centred.T @ centred).any()  # the overflow the guard avoids
    for fn in (
        lambda a, b: first(vicreg_loss(a, b, gather=False)),
        lambda a, b: barlow_twins_loss(a, b, gather=False),
    ):
        exact = fn(z1.half().float(), z2.half().float())
        with torch.autocast("cpu", dtype=torch.float16):
            mixed = fn(z1.half(), z2.half())
        assert torch.isfinite(mixed) and relative(mixed, exact) <= 1e-6


def test_every_loss_in_the_package_is_guarded():
    unguarded = []
    for info in pkgutil.iter_modules(losses_package.__path__):
        module = importlib.import_module(f"lightning_gen.losses.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            key = f"{info.name}.{name}"
            if (
                inspect.isfunction(obj)
                and not getattr(obj, "full_precision", False)
                and key not in NOT_LOSSES
            ):
                unguarded.append(key)
            if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and key not in NOT_LOSSES:
                methods = [m for m in ("forward", "update_center") if m in vars(obj)]
                unguarded += [
                    f"{key}.{m}" for m in methods if not getattr(vars(obj)[m], "full_precision", False)
                ]
    assert not unguarded, f"losses without @full_precision: {unguarded}"
