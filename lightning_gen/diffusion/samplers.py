"""Samplers for every process and prediction: ancestral DDPM, DDIM, Euler, Heun (EDM), DPM-Solver++(2M).

Each takes the network as ``model(x_in, t_net) -> prediction`` (classifier-free guidance already folded
in, so a guided call is one network evaluation on a doubled batch) and converts the prediction to what
it needs (``predictions.to_x_and_eps``). Two families of time grids:

- ``ddpm``, ``ddim``, ``euler`` start at t = 1 from x ~ N(0, prior_std^2 I) and visit ``steps`` times
  evenly spaced in t (DDPM's chain: its own steps, DDIM's subsequence of them), ending at t = 0.
  They work on x_t itself, with a(t), b(t) of each visited time.
- ``heun`` and ``dpm++2m`` work on x / a, a variance-exploding variable with noise level
  sigma = b / a, on the sigma grid of Karras et al. 2022 (rho = 7) from sigma_max to sigma_min and
  then 0, starting from N(0, sigma_max^2 I). sigma_max = min(80, the process's largest),
  sigma_min = max(0.002, the process's smallest): the grid of Karras et al. inside the trained range.

Updates, with x_hat and eps_hat the predicted data and noise at the current time t, and s the next:

    ddim:  x_s = a_s x_hat + sqrt(b_s^2 - c^2) eps_hat + c z,  c = eta b_s sqrt(1 - (sigma_s/sigma_t)^2)
           (Song et al. 2021; eta = 0 is Euler's method on dx/dsigma = eps in the sigma variable)
    ddpm:  the posterior mean of q(x_s | x_t, x = x_hat) plus noise of the posterior variance (= ddim
           with eta = 1); on DDPM's full chain of T steps Algorithm 2 of Ho et al.: variance beta_t
    euler: x_s = x_t + (s - t) v_hat,  v_hat = a'(t) x_hat + b'(t) eps_hat  (the velocity of x_t)
    heun:  Algorithm 1 of Karras et al. 2022 (deterministic): Euler in sigma, then the trapezoidal
           correction with the slope at the new point; the last step (to sigma = 0) stays Euler
    dpm++2m: Lu et al. 2022, the multistep second-order solver with the data prediction, in
           lambda = -log sigma; the first step is first order, the last step (to sigma = 0) returns x_hat

Network evaluations (NFE): ``steps`` for all but Heun, which takes 2 steps - 1.

No host synchronisation: the grid's coefficients are Python floats computed once per call on the host,
the network's time input is filled on the device from one of them, and nothing is read back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_gen.diffusion.predictions import to_x_and_eps
from lightning_gen.diffusion.processes import Coefficients, DiscreteVP, Process

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_in, network time (N,)) -> prediction

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm++2m")
STARTS_AT_ONE = ("ddpm", "ddim", "euler")  # grid evenly spaced in t from t = 1
DETERMINISTIC = (
    "ddim",
    "euler",
    "heun",
    "dpm++2m",
)  # the sample is a function of the initial noise (ddim: eta = 0)
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0  # Karras et al. 2022, Table 1


class SamplerError(ValueError):
    """A sampler asked for something it cannot do (unknown name, steps < 1, an unusable prediction)."""


def check(sampler: str, steps: int, process: Process, prediction: str) -> None:
    """Refuse, before any work, what ``sample`` could not do."""
    if sampler not in SAMPLERS:
        raise SamplerError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise SamplerError(f"steps must be at least 1 (the number of solver steps), got {steps}")
    if sampler in STARTS_AT_ONE and isinstance(process, DiscreteVP) and steps > process.T:
        raise SamplerError(
            f"sampler={sampler} visits the chain's own steps: steps must be at most T={process.T}, got {steps}"
        )
    if sampler in STARTS_AT_ONE and prediction == "eps" and process.pure_noise_at_end:
        raise SamplerError(
            f"sampler={sampler} starts at t = 1, where process={process.name} is pure noise (a(1) = 0): "
            "an eps-prediction says nothing about the data there. Use sampler=heun or sampler=dpm++2m "
            "(they start at sigma_max < inf), or train with prediction=v or x"
        )


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of one sampling call (a guided evaluation of both halves counts once)."""
    return 2 * steps - 1 if sampler == "heun" else steps


@dataclass
class Point:
    """One time of a sampler's grid: t, its coefficients (floats), the network time and input scale."""

    t: float
    coef: Coefficients
    net_time: float
    scale: float = 1.0

    @property
    def sigma(self) -> float:
        return self.coef.b / self.coef.a if self.coef.a > 0 else math.inf


def shift_time(t: float, shift: float) -> float:
    """Esser et al. 2024's resolution shift t' = shift t / (1 + (shift - 1) t): toward noise for shift > 1."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` indices from T-1 down to 0, evenly spaced (the last one always 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be between 1 and T={T}, got {steps}")
    return sorted({int(round(v)) for v in torch.linspace(0, T - 1, steps).tolist()}, reverse=True)


def grid_points(
    process: Process, times: list[float], coef: Coefficients | None = None, net=None
) -> list[Point]:
    """Points at ``times``: coefficients, network times and input scales computed in one float64 pass
    on the host (``coef`` / ``net``: given instead, as for DDPM's own steps)."""
    t = torch.tensor(times, dtype=torch.float64)
    coef = process.coefficients(t) if coef is None else coef
    scale = process.input_scale(coef)
    scales = scale.tolist() if torch.is_tensor(scale) else [scale] * len(times)
    nets = process.network_time(t).tolist() if net is None else net
    a, b, da, db = (v.tolist() for v in (coef.a, coef.b, coef.da, coef.db))
    return [
        Point(times[k], Coefficients(a[k], b[k], da[k], db[k]), nets[k], scales[k]) for k in range(len(times))
    ]


def uniform_grid(process: Process, steps: int, shift: float = 1.0) -> list[Point]:
    """``steps`` times from t = 1 evenly spaced in t (shifted), then the end t = 0: steps + 1 points."""
    if isinstance(process, DiscreteVP):  # the chain's own steps, with its exact coefficients
        visited = ddim_timesteps(process.T, steps)
        index = torch.tensor(visited)
        times = [(i + 1) / process.T for i in visited]
        points = grid_points(
            process, times, process.at_step(index, torch.float64), [float(i) for i in visited]
        )
    else:
        points = grid_points(process, [shift_time(1 - k / steps, shift) for k in range(steps)])
    return [*points, *grid_points(process, [0.0], net=[math.nan])]


def edm_sigmas(process: Process, steps: int) -> list[float]:
    """Karras et al.'s grid: sigma_i = (hi^(1/rho) + i/(N-1) (lo^(1/rho) - hi^(1/rho)))^rho, then 0."""
    hi, lo = min(EDM_SIGMA_MAX, process.sigma_hi), max(EDM_SIGMA_MIN, process.sigma_lo)
    if steps == 1:
        return [hi, 0.0]
    inv = 1 / EDM_RHO
    return [(hi**inv + i / (steps - 1) * (lo**inv - hi**inv)) ** EDM_RHO for i in range(steps)] + [0.0]


def sigma_points(process: Process, sigmas: list[float]) -> list[Point]:
    """Grid points at the given noise levels (all > 0), the network evaluated at t(sigma)."""
    times = process.t_of_sigma(torch.tensor(sigmas, dtype=torch.float64)).clamp(0, 1)
    return grid_points(process, times.tolist())


class Denoiser:
    """The network at the grid's points, as (x_hat, eps_hat), velocity or raw prediction; counts NFE."""

    def __init__(self, model: Model, prediction: str, points: list[Point], n: int, device, clip):
        self.model, self.prediction, self.points, self.n, self.clip = model, prediction, points, n, clip
        self.device, self.nfe = device, 0

    def raw(self, x: torch.Tensor, k: int) -> torch.Tensor:
        self.nfe += 1
        point = self.points[k]
        # the time input is filled on the device from a Python float: no host-to-device copy
        t_net = torch.full((self.n,), point.net_time, dtype=torch.float32, device=self.device)
        return self.model(x if point.scale == 1.0 else x * point.scale, t_net)

    def x_eps(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        coef = self.points[k].coef
        x_hat, eps = to_x_and_eps(self.prediction, self.raw(x, k), x, coef)
        if self.clip is not None:  # keep x_hat in the data range; eps follows so that x_t is unchanged
            x_hat = x_hat.clamp(-self.clip, self.clip)
            eps = (x - coef.a * x_hat) / coef.b
        return x_hat, eps

    def velocity(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.prediction == "v" and self.clip is None:  # already what Euler needs: no conversion
            return self.raw(x, k)
        coef = self.points[k].coef
        x_hat, eps = self.x_eps(x, k)
        return coef.da * x_hat + coef.db * eps


def _noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device if generator else device).to(
        device
    )


def _ratio(t: Coefficients, s: Coefficients) -> float:
    """sigma_s / sigma_t, written without dividing by a_t (0 at pure noise)."""
    return s.b * t.a / (s.a * t.b)


def ddim_loop(den: Denoiser, x, eta: float, noise) -> torch.Tensor:
    grid = den.points
    for k in range(len(grid) - 1):
        t, s = grid[k].coef, grid[k + 1].coef
        x_hat, eps = den.x_eps(x, k)
        c = eta * s.b * math.sqrt(max(1 - _ratio(t, s) ** 2, 0.0))
        x = s.a * x_hat + math.sqrt(max(s.b * s.b - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * noise()
    return x


def ancestral_loop(den: Denoiser, x, variance: str, noise) -> torch.Tensor:
    grid = den.points
    last = len(grid) - 2
    for k in range(last + 1):
        t, s = grid[k].coef, grid[k + 1].coef
        x_hat, eps = den.x_eps(x, k)
        posterior_var = s.b * s.b * max(1 - _ratio(t, s) ** 2, 0.0)
        x = s.a * x_hat + math.sqrt(max(s.b * s.b - posterior_var, 0.0)) * eps  # posterior mean
        if k < last:
            # Ho et al.'s sigma_t^2 = beta_t: the forward variance from s to t; or the posterior's
            var = t.b * t.b - (t.a * s.b / s.a) ** 2 if variance == "beta" else posterior_var
            x = x + math.sqrt(max(var, 0.0)) * noise()
    return x


def euler_loop(den: Denoiser, x) -> torch.Tensor:
    grid = den.points
    for k in range(len(grid) - 1):
        x = x + (grid[k + 1].t - grid[k].t) * den.velocity(x, k)
    return x


def heun_loop(den: Denoiser, x, sigmas: list[float]) -> torch.Tensor:
    """x here is x / a (noise level sigma); returns the data at sigma = 0."""
    for i in range(len(sigmas) - 1):
        a, h = den.points[i].coef.a, sigmas[i + 1] - sigmas[i]
        d = den.x_eps(a * x, i)[1]  # dx/dsigma = eps_hat
        x_next = x + h * d
        if sigmas[i + 1] > 0:
            d_next = den.x_eps(den.points[i + 1].coef.a * x_next, i + 1)[1]
            x_next = x + h * 0.5 * (d + d_next)
        x = x_next
    return x


def dpmpp_2m_loop(den: Denoiser, x, sigmas: list[float]) -> torch.Tensor:
    """x here is x / a (noise level sigma); returns the data at sigma = 0."""
    previous, h_previous = None, None
    for i in range(len(sigmas) - 1):
        x_hat = den.x_eps(den.points[i].coef.a * x, i)[0]
        if sigmas[i + 1] == 0:
            return x_hat
        h = math.log(sigmas[i] / sigmas[i + 1])  # step in lambda = -log sigma
        if previous is None:
            d = x_hat
        else:
            r = h_previous / h
            d = (1 + 1 / (2 * r)) * x_hat - (1 / (2 * r)) * previous
        x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        previous, h_previous = x_hat, h
    return x


@torch.no_grad()
def sample(
    model: Model,
    process: Process,
    prediction: str,
    shape: tuple[int, ...],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    clip: float | None = None,
    generator: torch.Generator | None = None,
    device="cpu",
    shift: float = 1.0,
    variance: str | None = None,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Draw ``shape[0]`` samples; returns them (x at t = 0, or sigma = 0) and the number of network
    evaluations. ``shift``: the resolution shift applied to the t-grid of ddpm/ddim/euler on
    continuous-time processes. ``variance`` (ddpm): ``beta`` or ``posterior``; default beta on
    DDPM's full chain (Algorithm 2), posterior otherwise. ``initial``: the standard normal noise
    (``shape``) to start from instead of a fresh draw, scaled here like a drawn one (by the prior's std,
    or sigma_max): with a deterministic sampler the sample is then a function of it (interpolation in
    noise space)."""
    check(sampler, steps, process, prediction)
    noise = lambda: _noise(shape, generator, device)  # noqa: E731
    start = noise if initial is None else (lambda: initial.to(device))  # noqa: E731
    if sampler in STARTS_AT_ONE:
        den = Denoiser(model, prediction, uniform_grid(process, steps, shift), shape[0], device, clip)
        x = process.prior_std * start() if process.prior_std != 1.0 else start()
        if sampler == "ddim":
            x = ddim_loop(den, x, eta, noise)
        elif sampler == "euler":
            x = euler_loop(den, x)
        else:
            full_chain = isinstance(process, DiscreteVP) and steps == process.T
            x = ancestral_loop(den, x, variance or ("beta" if full_chain else "posterior"), noise)
    else:
        sigmas = edm_sigmas(process, steps)
        den = Denoiser(model, prediction, sigma_points(process, sigmas[:-1]), shape[0], device, clip)
        x = sigmas[0] * start()
        x = heun_loop(den, x, sigmas) if sampler == "heun" else dpmpp_2m_loop(den, x, sigmas)
    return x, den.nfe
