"""Gaussian noising processes x_t = a(t) x + b(t) z on t in [0, 1] (t = 0: data, t = 1: noise).

Every process here is a pair of functions (a, b) of t with their derivatives (a', b'):

    flow (rectified flow; Liu et al. 2023):   a = 1 - t,                 b = t
    vp   (variance preserving; Ho et al. 2020, Song et al. 2021):
                                                a = sqrt(abar(t)),        b = sqrt(1 - abar(t))
    ve   (variance exploding; Song et al. 2021): a = 1,                    b = s_min (s_max / s_min)^t

The prediction targets y = c(t) x + d(t) z live in ``predictions.py``; the velocity of x_t is
v = a'(t) x + b'(t) z. Samplers and likelihoods also use sigma(t) = b / a: dividing x_t by a turns
every process into a variance-exploding one with noise level sigma (Karras et al. 2022), so one
sampler implementation in sigma serves all of them.

DDPM's discrete chain (``DiscreteVP``) keeps its T steps exactly: step index i = 0..T-1 is the paper's
t = i + 1, at time t = (i + 1) / T, and training draws the integer index as Algorithm 1 does. Between
the steps, log abar is interpolated linearly in t, which is the continuous VP process whose beta(t) is
constant on each step; the sigma-grid samplers (Heun, DPM-Solver++) evaluate the network at the
fractional step index that this gives, as is usual for discrete-time models.

The network sees 1000 t for continuous-time processes and the step index t T - 1 for the discrete
chain: the time inputs the ``flow`` and ``ddpm`` methods used, so their checkpoints keep working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

TIME_SCALE = 1000.0  # continuous t in [0, 1] is embedded as 1000 t, the range the U-Net's embedding suits


class NoiseSchedule:
    """Variance schedule beta_1..beta_T of DDPM's discrete chain and what derives from it (float64, CPU).

    Index convention: the paper's t = 1..T is index ``i = t - 1`` here, so ``alpha_bar[i]`` is
    alpha-bar_t and ``alpha_bar_prev[i]`` is alpha-bar_{t-1} (1 for the first step).

        q(x_t | x_0)           = N(sqrt(ab_t) x_0, (1 - ab_t) I)
        q(x_{t-1} | x_t, x_0)  = N(mu~_t, beta~_t I)
        mu~_t   = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
        beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t
        mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps_theta)
                           (1/sqrt(alpha_t), *not* 1/sqrt(alpha-bar_t), a common slip)
    """

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
        out = values.to(like.device)[i.to(like.device)].to(like.dtype)
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


@dataclass
class Coefficients:
    """a, b and their time derivatives at some times (tensors, or floats for one time)."""

    a: torch.Tensor
    b: torch.Tensor
    da: torch.Tensor
    db: torch.Tensor


class Process(nn.Module):
    """x_t = a(t) x + b(t) z. Subclasses define ``coefficients`` (a, b, a', b' of a float tensor t) and
    ``t_of_sigma`` (the inverse of sigma(t) = b/a). Buffers, if any, are schedule tables that move with
    the method to its device (not saved: they are rebuilt from the config)."""

    name = ""
    discrete = False  # DDPM's chain: training draws integer steps, samplers may use its exact steps
    prior_std = 1.0  # x at t = 1 is drawn from N(0, prior_std^2 I)
    pure_noise_at_end = False  # a(1) = 0: x_1 holds nothing of x (an eps-prediction cannot give x there)
    # Where the network may be evaluated, as noise levels sigma = b/a (the ends of the trained range).
    sigma_lo = 0.0
    sigma_hi = math.inf

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network sees for continuous t."""
        return t * TIME_SCALE

    def input_scale(self, coef: Coefficients):
        """Factor applied to x_t before the network; 1 where x_t already has unit scale."""
        return 1.0

    def at(self, t: float) -> Coefficients:
        """Coefficients at one time as Python floats (float64 maths on the host)."""
        c = self.coefficients(torch.tensor([t], dtype=torch.float64))
        return Coefficients(*(v.tolist()[0] for v in (c.a, c.b, c.da, c.db)))


class FlowProcess(Process):
    """Rectified flow: the straight line from data (t = 0) to noise (t = 1); sigma = t / (1 - t)."""

    name = "flow"
    pure_noise_at_end = True

    def coefficients(self, t):
        one = torch.ones_like(t)
        return Coefficients(1 - t, t, -one, one)

    def t_of_sigma(self, sigma):
        return sigma / (1 + sigma)


class VPProcess(Process):
    """Variance preserving in continuous time: a^2 + b^2 = 1, a = sqrt(abar(t)).

    ``linear``: the VP SDE of Song et al. 2021 with beta(t) = 0.1 + 19.9 t, the continuous limit of
    DDPM's linear betas (T beta from 0.1 to 20): log abar(t) = -(0.1 t + 9.95 t^2).
    ``cosine``: Nichol & Dhariwal 2021, abar(t) = cos^2(phi(t)) / cos^2(phi(0)),
    phi(t) = (t + s)/(1 + s) pi/2, s = 0.008; abar(1) = 0, so x_1 is pure noise (sigma(1) = inf).
    """

    name = "vp"
    beta_min, beta_max, cosine_s = 0.1, 20.0, 0.008

    def __init__(self, schedule: str = "cosine"):
        super().__init__()
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown VP schedule {schedule!r}: use linear or cosine")
        self.schedule = schedule
        self.pure_noise_at_end = schedule == "cosine"
        if schedule == "linear":
            self.sigma_hi = math.sqrt(math.expm1(self.beta_min + (self.beta_max - self.beta_min) / 2))

    def _phi(self, t):
        return (t + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2

    def log_alpha_bar(self, t):
        """log abar(t) and its derivative in t."""
        if self.schedule == "linear":
            spread = self.beta_max - self.beta_min
            return -(self.beta_min * t + 0.5 * spread * t * t), -(self.beta_min + spread * t)
        phi, cos0 = self._phi(t), math.cos(self._phi(0.0))
        dphi = math.pi / 2 / (1 + self.cosine_s)
        return 2 * (torch.log(torch.cos(phi)) - math.log(cos0)), -2 * torch.tan(phi) * dphi

    def coefficients(self, t):
        if self.schedule == "cosine":  # closed form, exact at t = 1 where abar = 0
            phi, cos0 = self._phi(t), math.cos(self._phi(0.0))
            dphi = math.pi / 2 / (1 + self.cosine_s)
            a = torch.cos(phi) / cos0
            b = (1 - a * a).clamp(min=0).sqrt()
            da = -torch.sin(phi) * dphi / cos0
            return Coefficients(a, b, da, -a * da / b)
        log_ab, dlog_ab = self.log_alpha_bar(t)
        a = (0.5 * log_ab).exp()
        b = (-torch.expm1(log_ab)).sqrt()  # 1 - abar without cancellation near t = 0
        da = 0.5 * a * dlog_ab
        return Coefficients(a, b, da, -a * da / b)

    def t_of_sigma(self, sigma):
        log_ab = -torch.log1p(sigma * sigma)  # abar = 1 / (1 + sigma^2)
        if self.schedule == "linear":  # solve 9.95 t^2 + 0.1 t + log_ab = 0 for t >= 0
            half_spread = 0.5 * (self.beta_max - self.beta_min)
            disc = self.beta_min**2 - 4 * half_spread * log_ab
            return (disc.sqrt() - self.beta_min) / (2 * half_spread)
        phi = torch.arccos((0.5 * log_ab).exp() * math.cos(self._phi(0.0)))
        return phi * 2 * (1 + self.cosine_s) / math.pi - self.cosine_s


class VEProcess(Process):
    """Variance exploding (Song et al. 2021): x_t = x + sigma(t) z, sigma geometric from s_min to s_max.

    The prior is N(0, s_max^2 I). The network sees x_t / sqrt(1 + sigma^2) (the VP-scaled input, as
    in Karras et al.'s preconditioning), since x_t itself reaches a standard deviation of s_max.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)
        self.prior_std, self.sigma_lo, self.sigma_hi = sigma_max, sigma_min, sigma_max

    def coefficients(self, t):
        sigma = self.sigma_min * torch.exp(t * self.log_ratio)
        return Coefficients(torch.ones_like(t), sigma, torch.zeros_like(t), sigma * self.log_ratio)

    def t_of_sigma(self, sigma):
        return torch.log(sigma / self.sigma_min) / self.log_ratio

    def input_scale(self, coef):
        return 1 / (1 + coef.b * coef.b) ** 0.5


class DiscreteVP(Process):
    """DDPM's chain of T steps (Ho et al. 2020) as a VP process; see the module docstring.

    ``at_step(i)`` gives exactly the quantities of the discrete chain at integer steps i = 0..T-1 (as
    DDPM computes them, in the dtype of the caller); ``coefficients(t)`` is the continuous extension.
    """

    name = "vp"
    discrete = True

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.schedule = schedule
        T = schedule.T
        # On the host (the samplers' grids, computed once per sampling call without touching the device)
        # and, as buffers, on the method's device (training's per-sample lookups); float64 either way.
        # log abar at t = k / T for k = 0..T (0 at the data); d log abar / dt on the step ending at i.
        self._host = {
            "alpha_bar": schedule.alpha_bar,
            "knots": torch.cat([torch.zeros(1, dtype=torch.float64), schedule.alpha_bar.log()]),
            "slope": T * schedule.alphas.log(),
        }
        self.register_buffer("alpha_bar", self._host["alpha_bar"].clone(), persistent=False)
        self.register_buffer("log_alpha_bar_knots", self._host["knots"].clone(), persistent=False)
        self.register_buffer("log_alpha_slope", self._host["slope"].clone(), persistent=False)
        sigma = (1 / schedule.alpha_bar - 1).sqrt()
        self.sigma_lo, self.sigma_hi = float(sigma[0]), float(sigma[-1])

    @property
    def T(self) -> int:
        return self.schedule.T

    def at_step(self, i: torch.Tensor, dtype=torch.float32) -> Coefficients:
        """The chain at integer steps i (N,): a = sqrt(abar_i), b = sqrt(1 - abar_i) in ``dtype``
        (from the buffers on the device, or the host tables for steps on the CPU)."""
        on_host = i.device.type == "cpu"
        ab = (self._host["alpha_bar"] if on_host else self.alpha_bar)[i].to(dtype)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        slope = (self._host["slope"] if on_host else self.log_alpha_slope)[i].to(dtype)
        da = 0.5 * a * slope
        return Coefficients(a, b, da, -a * da / b)

    def network_time(self, t):
        return t * self.T - 1  # the step index, fractional between the steps

    def _segment(self, t):
        """The step k = 1..T whose interval ((k-1)/T, k/T] holds t, and the fraction of it covered."""
        # a time within rounding of a step's end belongs to that step (where its derivative is the step's)
        k = torch.ceil(t * self.T - 1e-9).clamp(1, self.T).long()
        return k, t * self.T - (k - 1)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self._host["knots"], self._host["slope"]
        return self.log_alpha_bar_knots, self.log_alpha_slope

    def coefficients(self, t):
        knots, slopes = self._tables(t.device)
        k, frac = self._segment(t)
        log_ab = knots[k - 1] + frac.to(knots.dtype) * (knots[k] - knots[k - 1])
        slope = slopes[k - 1]
        log_ab, slope = log_ab.to(t.dtype), slope.to(t.dtype)
        a, b = (0.5 * log_ab).exp(), (-torch.expm1(log_ab)).sqrt()
        da = 0.5 * a * slope
        return Coefficients(a, b, da, -a * da / b)

    def t_of_sigma(self, sigma):
        target = -torch.log1p(sigma.double() * sigma.double())  # log abar at that sigma
        knots = self._tables(sigma.device)[0]
        # knots decrease with k: search the increasing sequence -knots
        k = torch.searchsorted(-knots, -target).clamp(1, self.T)
        frac = (target - knots[k - 1]) / (knots[k] - knots[k - 1])
        return (((k - 1) + frac) / self.T).clamp(1 / self.T, 1)  # within the trained steps


PROCESSES = ("vp", "ve", "flow")


def build_process(
    name: str,
    schedule: str = "linear",
    timesteps: int = 0,
    sigma_min: float = 0.01,
    sigma_max: float = 50.0,
) -> Process:
    """``vp`` with ``timesteps`` > 0 is DDPM's discrete chain of that many steps; 0 is continuous time."""
    if name == "flow":
        return FlowProcess()
    if name == "ve":
        return VEProcess(sigma_min, sigma_max)
    if name == "vp":
        return DiscreteVP(NoiseSchedule.build(schedule, timesteps)) if timesteps > 0 else VPProcess(schedule)
    raise ValueError(f"unknown process {name!r}: use one of {', '.join(PROCESSES)}")
