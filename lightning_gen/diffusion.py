"""Noise schedules and samplers of diffusion and flow models, separate from any network. DDPM (Ho et al. 2020), DDIM (Song et al. 2021), rectified flow (Liu et al. 2023).

Everything here takes the network as a plain function, so the same trained model runs under any
sampler (DDPM ancestral, DDIM with any number of steps) and the maths is testable on closed forms.

Index convention: the paper's t = 1..T is index ``i = t - 1`` = 0..T-1 here, so ``alpha_bar[i]`` is
the paper's alpha-bar_t and ``alpha_bar_prev[i]`` is alpha-bar_{t-1} (1 for the first step).

    q(x_t | x_0)           = N(sqrt(ab_t) x_0, (1 - ab_t) I)
    q(x_{t-1} | x_t, x_0)  = N(mu~_t, beta~_t I)
    mu~_t   = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
    beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t
    mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps_theta)
                       (1/sqrt(alpha_t), *not* 1/sqrt(alpha-bar_t), a common slip)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_gen.device_constants import device_constant

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, step index (N,)) -> eps or velocity


class NoiseSchedule:
    """Variance schedule beta_1..beta_T and the quantities DDPM/DDIM derive from it (float64 on CPU).

    Per-sample lookups (``q_sample`` with a timestep per image) read a float64 copy of each table on
    the images' device, made once per device (``device_constant``): copying the table at every
    lookup would be a blocking host-to-device copy, some 6,000 of them per DDPM-1000 sample."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-d tensor with 0 < beta_t < 1")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([betas.new_ones(1), self.alpha_bar[:-1]])
        self.posterior_variance = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * betas

    @property
    def T(self) -> int:
        return len(self.betas)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Ho et al. 2020: beta linear from 1e-4 to 0.02 over T = 1000 steps."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal 2021: alpha-bar(t) = cos^2((t/T + s)/(1 + s) pi/2) / same at 0; betas clipped."""
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        return cls(betas)

    @classmethod
    def build(cls, name: str, T: int) -> NoiseSchedule:
        if name == "linear":
            return cls.linear(T)
        if name == "cosine":
            return cls.cosine(T)
        raise ValueError(f"unknown noise schedule {name!r}: use linear or cosine")

    @staticmethod
    def _at(values: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[i] shaped (N, 1, 1, ...) to broadcast against ``like``, in its dtype and device."""
        out = device_constant(values, like.device, torch.float64)[i.to(like.device)].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, a draw from q(x_t | x_0)."""
        ab = self._at(self.alpha_bar, i, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, xt: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alpha_bar, i, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def posterior(
        self, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        beta, ab = self._at(self.betas, i, xt), self._at(self.alpha_bar, i, xt)
        ab_prev, alpha = self._at(self.alpha_bar_prev, i, xt), self._at(self.alphas, i, xt)
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * xt
        return mean, self._at(self.posterior_variance, i, xt).expand_as(xt)

    def model_mean(self, xt: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps)  (Algorithm 2, line 4)."""
        beta, ab, alpha = (
            self._at(self.betas, i, xt),
            self._at(self.alpha_bar, i, xt),
            self._at(self.alphas, i, xt),
        )
        return (xt - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + w) f(x, y) - w f(x, null). w = 0 is the plain conditional model."""
    return (1.0 + w) * cond - w * uncond


def guided(fn: Callable, labels: torch.Tensor | None, null_label: int, w: float) -> EpsFn:
    """Wrap ``fn(x, t, y)`` into ``f(x, t)`` with CFG; the conditional and null passes run as one batch."""
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


def _noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device if generator else device).to(
        device
    )


@torch.no_grad()
def ddpm_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    device="cpu",
    generator: torch.Generator | None = None,
    variance: str = "beta",
    clip: float | None = None,
) -> torch.Tensor:
    """Algorithm 2 of Ho et al.: x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z, sigma_t^2 = beta_t.

    ``variance="posterior"`` uses sigma_t^2 = beta~_t instead (Ho et al. found both similar).
    ``clip`` clamps the implied x_0 (and recomputes the mean from the posterior), common for images.
    """
    x = _noise(shape, generator, device)
    sigma2 = schedule.betas if variance == "beta" else schedule.posterior_variance
    sigma = sigma2.sqrt().tolist()  # Python numbers from the host table: no step reads the device
    for step in reversed(range(schedule.T)):
        i = torch.full((shape[0],), step, device=device, dtype=torch.long)
        eps = eps_fn(x, i)
        if clip is not None:
            x0 = schedule.predict_x0(x, i, eps).clamp(-clip, clip)
            mean, _ = schedule.posterior(x0, x, i)
        else:
            mean = schedule.model_mean(x, i, eps)
        if step > 0:
            x = mean + sigma[step] * _noise(shape, generator, device)
        else:
            x = mean
    return x


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` indices from T-1 down to 0, evenly spaced (the last one always 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be between 1 and T={T}, got {steps}")
    return sorted({int(round(v)) for v in torch.linspace(0, T - 1, steps).tolist()}, reverse=True)


@torch.no_grad()
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
    """Song et al. 2021 (DDIM) on a subsequence of the training steps; eta = 0 is deterministic.

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps + s z,
    s = eta sqrt((1 - ab_prev)/(1 - ab) (1 - ab/ab_prev)).
    """
    x = _noise(shape, generator, device)
    seq = ddim_timesteps(schedule.T, steps)
    alpha_bar = schedule.alpha_bar.tolist()  # Python numbers from the host table: no step reads the device
    for k, step in enumerate(seq):
        i = torch.full((shape[0],), step, device=device, dtype=torch.long)
        eps = eps_fn(x, i)
        ab = alpha_bar[step]
        ab_prev = alpha_bar[seq[k + 1]] if k + 1 < len(seq) else 1.0
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        s = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - s * s, 0.0)) * eps
        if s > 0:
            x = x + s * _noise(shape, generator, device)
    return x


@torch.no_grad()
def euler_flow_sample(
    v_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    steps: int = 50,
    device="cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rectified flow: integrate dx/dt = v from t = 1 (noise) to t = 0 (data) with N Euler steps.

    Evaluates v at t_k = 1 - k/N for k = 0..N-1 and steps dt = 1/N: the exact Euler
    grid (a loop over linspace(1, 0, N) with step 1/N would be off by one).
    ``v_fn`` gets t as a float tensor (N,).
    """
    if steps < 1:
        raise ValueError(f"flow sampling needs at least 1 step, got {steps}")
    x = _noise(shape, generator, device)
    for k in range(steps):
        t = torch.full((shape[0],), 1.0 - k / steps, device=device)
        x = x - v_fn(x, t) / steps
    return x
