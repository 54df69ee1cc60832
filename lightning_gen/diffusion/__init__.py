"""Diffusion and flow models, separate from any network: processes, predictions, samplers, likelihoods.

    processes.py    x_t = a(t) x + b(t) z for VP (DDPM's discrete chain or continuous time), VE, flow
    predictions.py  eps / x / v targets and the exact conversions between them
    samplers.py     ancestral DDPM, DDIM, Euler, Heun (Karras et al. 2022), DPM-Solver++(2M)
    likelihood.py   variational bounds (discrete and continuous time) and the probability-flow ODE

Everything takes the network as a plain function, so the same trained model runs under any sampler
and the maths is testable on closed forms. The names below the imports are the original DDPM/flow
API (``NoiseSchedule``, ``ddpm_sample``, ``ddim_sample``, ``euler_flow_sample``, ``guided``): thin
layers over the samplers, kept for code written against them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_gen.diffusion.processes import (
    PROCESSES,
    TIME_SCALE,
    DiscreteVP,
    FlowProcess,
    NoiseSchedule,
    Process,
    VEProcess,
    VPProcess,
    build_process,
)
from lightning_gen.diffusion.samplers import SAMPLERS, SamplerError, ddim_timesteps, nfe, sample

__all__ = [
    "PROCESSES",
    "SAMPLERS",
    "TIME_SCALE",
    "DiscreteVP",
    "FlowProcess",
    "NoiseSchedule",
    "Process",
    "SamplerError",
    "VEProcess",
    "VPProcess",
    "build_process",
    "cfg_combine",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "euler_flow_sample",
    "guided",
    "nfe",
    "sample",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, time input (N,)) -> prediction


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + w) f(x, y) - w f(x, null). w = 0 is the plain conditional model.

    Applied to the raw prediction, whatever it is: x_hat and eps_hat are affine in it with weights
    that sum to one, so guiding eps, x or v gives the same x_hat and eps_hat."""
    return (1.0 + w) * cond - w * uncond


def guided(fn: Callable, labels: torch.Tensor | None, null_label: int, w: float) -> EpsFn:
    """Wrap ``fn(x, t, y)`` into ``f(x, t)`` with CFG; the conditional and null passes run as one batch
    (one network evaluation of 2n images)."""
    if labels is None:
        return lambda x, t: fn(x, t, None)
    if w == 0:
        return lambda x, t: fn(x, t, labels)
    null = torch.full_like(labels, null_label)

    def combined(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return cfg_combine(cond, uncond, w)

    return combined


def _by_step_index(eps_fn: EpsFn) -> EpsFn:
    return lambda x, t: eps_fn(x, t.round().long())  # the original API passed integer step indices


def ddpm_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    device="cpu",
    generator: torch.Generator | None = None,
    variance: str = "beta",
    clip: float | None = None,
) -> torch.Tensor:
    """Algorithm 2 of Ho et al. on all T steps of an eps-model ``eps_fn(x_t, step index)``."""
    x, _ = sample(
        _by_step_index(eps_fn), DiscreteVP(schedule), "eps", shape, "ddpm", schedule.T, clip=clip,
        generator=generator, device=device, variance=variance,
    )  # fmt: skip
    return x


def ddim_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    steps: int = 50,
    eta: float = 0.0,
    device="cpu",
    generator: torch.Generator | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on ``steps`` of the chain's steps for an eps-model ``eps_fn(x_t, step index)``."""
    x, _ = sample(
        _by_step_index(eps_fn), DiscreteVP(schedule), "eps", shape, "ddim", steps, eta=eta, clip=clip,
        generator=generator, device=device,
    )  # fmt: skip
    return x


def euler_flow_sample(
    v_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    steps: int = 50,
    device="cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rectified flow: Euler from t = 1 to 0 in ``steps`` steps of a velocity model ``v_fn(x_t, t)``, t in [0, 1]."""
    x, _ = sample(
        lambda x, t: v_fn(x, t / TIME_SCALE), FlowProcess(), "v", shape, "euler", steps,
        generator=generator, device=device,
    )  # fmt: skip
    return x
