"""Negative log-likelihoods of diffusion models, per image in nats: two variational bounds and the ODE.

All three take the network as ``model(x_in, t_net) -> prediction`` like the samplers (called here with
float64 inputs, which it casts to its own precision), images x in [-1, 1] (8-bit values 2k/255 - 1
for the bounds), and a ``torch.Generator`` for their noise.

**DDPM's chain** (``vlb_discrete``; Ho et al. 2020, Eq. 5 and 13):

    -log p(x) <= L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x) || N(0, I))                                      (closed form)
    L_{t-1} = KL(q(x_{t-1} | x_t, x) || N(mu~(x_t, x_hat), beta~_t I))
            = |mu~(x_t, x) - mu~(x_t, x_hat)|^2 / (2 beta~_t)                 (reverse variance beta~_t)
    L_0     = -log of the discretised Gaussian N(x_hat(x_1), beta_1) over each value's bin
              [x - 1/255, x + 1/255] (the end bins reach to -inf and +inf)

The sum over t is estimated by Monte Carlo: each draw takes one t ~ U{2..T} per image and one x_t,
and counts (T - 1) L_{t-1}, plus L_0 with its own x_1.

**Continuous time** (``vlb_continuous``; Kingma et al. 2021, VDM). With x~ = x_t / a = x + sigma z,
sigma = b / a, every process is the same variance-exploding one, and

    -log p(x) <= KL(N(x, s_hi^2) || N(0, s_hi^2)) + int_{s_lo}^{s_hi} |x - x_hat(x~_s)|^2 / s^2 dlog s
                 + E[-log p(x | x~_{s_lo})]

for the model that starts at N(0, s_hi^2 I) (x~ at sigma_max), follows the reverse process of its
denoiser and decodes at s_lo. The integral is Monte-Carlo estimated with log sigma uniform on
[log s_lo, log s_hi] (one draw per image per draw), where its integrand |x - x_hat|^2 / sigma^2 (the
eps-prediction error) varies least. Decoder: ``discretised`` (8-bit data): the Gaussian N(x~_lo, s_lo^2)
integrated over each value's bin as above, no network needed at that noise level; ``gaussian``
(continuous data, e.g. latents): the density N(x; x~_lo, s_lo^2).

**Probability-flow ODE** (``ode_nll``; Song et al. 2021, Grathwohl et al. 2019). In x~, the ODE is
dx~/dsigma = eps_hat(x~, sigma), and along it d log p / dsigma = -div eps_hat, so

    log p_{s_lo}(x) = log N(x~(s_hi); 0, s_hi^2 I) + int_{s_lo}^{s_hi} div eps_hat dsigma

integrated from x~(s_lo) = x with the classic 4th-order Runge-Kutta method in log sigma on an evenly
spaced grid (4 network evaluations and 4 vector-Jacobian products per step). The divergence is Hutchinson's estimate
v^T (d eps_hat / d x~) v with one Rademacher v per image kept for the whole path (FFJORD), or exact
(one backward pass per dimension, for small data). The result is the density of x smoothed by
N(0, s_lo^2), an approximation of the model's density at the data for small s_lo.
"""

from __future__ import annotations

import math

import torch

from lightning_gen.diffusion.predictions import to_x_and_eps
from lightning_gen.diffusion.processes import Coefficients, DiscreteVP, Process

LOG_2PI = math.log(2 * math.pi)
BIN_HALF_WIDTH = 1 / 255  # 8-bit values 2k/255 - 1 in [-1, 1]


def discretised_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """-log P(bin of x) under N(mean, std^2) per image (nats), bins of width 2/255 centred on the 8-bit
    values of [-1, 1], the lowest and highest bins extended to -inf and +inf (Ho et al. 2020, Eq. 13)."""
    x, mean = x.double(), mean.double()
    std = torch.as_tensor(std, dtype=torch.float64, device=x.device)
    upper = (x - mean + BIN_HALF_WIDTH) / std
    lower = (x - mean - BIN_HALF_WIDTH) / std
    # log(Phi(u) - Phi(l)), computed on the side of the mean where it does not cancel
    flip = lower > 0
    hi, lo = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_mid = torch.special.log_ndtr(hi) + torch.log(
        -torch.expm1(torch.special.log_ndtr(lo) - torch.special.log_ndtr(hi))
    )
    log_p = torch.where(
        x < -1 + BIN_HALF_WIDTH,
        torch.special.log_ndtr(upper),  # the lowest value's bin reaches -inf
        torch.where(x > 1 - BIN_HALF_WIDTH, torch.special.log_ndtr(-lower), log_mid),
    )
    return -log_p.flatten(1).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """-log N(x; mean, std^2 I) per sample (nats)."""
    var = torch.as_tensor(std, dtype=torch.float64, device=x.device) ** 2
    err = (x.double() - mean.double()) ** 2
    return 0.5 * (LOG_2PI + torch.log(var) + err / var).flatten(1).sum(1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def denoise(model, process: Process, prediction: str, x_scaled: torch.Tensor, sigma: torch.Tensor):
    """(x_hat, eps_hat) at x~ = x_t / a for per-sample noise levels sigma (N,)."""
    t = process.t_of_sigma(sigma).clamp(0, 1)
    c = process.coefficients(t)
    coef = Coefficients(*(_view(v, x_scaled) for v in (c.a, c.b, c.da, c.db)))
    xt = coef.a * x_scaled
    scale = process.input_scale(coef)
    y = model(xt if isinstance(scale, float) else xt * scale, process.network_time(t))
    return to_x_and_eps(prediction, y.to(xt.dtype), xt, coef)


@torch.no_grad()
def vlb_discrete(model, process: DiscreteVP, prediction: str, x: torch.Tensor, draws: int, generator=None):
    """Ho et al.'s bound per image: (estimate (N,), variance of the estimate over its draws (N,))."""
    schedule, T = process.schedule, process.T
    device = x.device
    ab_T = float(schedule.alpha_bar[-1])
    prior = 0.5 * (ab_T * x.double() ** 2 + (1 - ab_T) - 1 - math.log(1 - ab_T)).flatten(1).sum(1)
    beta_1 = float(schedule.betas[0])
    # mu~(x_t, x) - mu~(x_t, x_hat) = c0 (x - x_hat): c0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t)
    c0 = (schedule.alpha_bar_prev.sqrt() * schedule.betas / (1 - schedule.alpha_bar)).to(device)
    post_var = schedule.posterior_variance.to(device)
    first = torch.zeros(len(x), dtype=torch.long, device=device)

    def x_hat(i: torch.Tensor) -> torch.Tensor:
        c = process.at_step(i, torch.float64)
        coef = Coefficients(*(_view(v, x) for v in (c.a, c.b, c.da, c.db)))
        z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float64)
        xt = coef.a * x.double() + coef.b * z
        y = model(xt, i.double())  # the network time of step i is i itself
        return to_x_and_eps(prediction, y.double(), xt, coef)[0]

    terms = []
    for _ in range(draws):
        decoder = discretised_gaussian_nll(x, x_hat(first), math.sqrt(beta_1))  # L_0 at t = 1
        i = torch.randint(1, T, (len(x),), generator=generator, device=device)  # t = i + 1 in 2..T
        err = ((x.double() - x_hat(i)) ** 2).flatten(1).sum(1)
        terms.append(decoder + (T - 1) * c0[i] ** 2 * err / (2 * post_var[i]))
    terms = torch.stack(terms)
    return prior + terms.mean(0), _mean_variance(terms)


@torch.no_grad()
def vlb_continuous(
    model,
    process: Process,
    prediction: str,
    x: torch.Tensor,
    draws: int,
    sigma_lo: float,
    sigma_hi: float,
    decoder: str = "discretised",
    generator=None,
):
    """VDM's continuous-time bound per image: (estimate (N,), variance of the estimate (N,))."""
    device, n = x.device, len(x)
    x64 = x.double()
    prior = (x64**2).flatten(1).sum(1) / (2 * sigma_hi**2)
    log_lo, log_hi = math.log(sigma_lo), math.log(sigma_hi)
    terms = []
    for _ in range(draws):
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float64)
        noisy = x64 + sigma_lo * noise
        if decoder == "discretised":
            dec = discretised_gaussian_nll(x64, noisy, sigma_lo)
        elif decoder == "gaussian":
            dec = gaussian_nll(x64, noisy, sigma_lo)
        else:
            raise ValueError(f"unknown decoder {decoder!r}: use discretised or gaussian")
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        sigma = torch.exp(log_lo + u * (log_hi - log_lo))
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float64)
        x_hat = denoise(model, process, prediction, x64 + _view(sigma, x64) * eps, sigma)[0]
        err = ((x64 - x_hat) ** 2).flatten(1).sum(1) / sigma**2
        terms.append(dec + (log_hi - log_lo) * err)
    terms = torch.stack(terms)
    return prior + terms.mean(0), _mean_variance(terms)


def _mean_variance(terms: torch.Tensor) -> torch.Tensor:
    """Variance of the mean of i.i.d. draws (rows) per image; 0 with a single draw (unknown)."""
    if len(terms) < 2:
        return torch.zeros_like(terms[0])
    return terms.var(0) / len(terms)


def ode_nll(
    model,
    process: Process,
    prediction: str,
    x: torch.Tensor,
    steps: int,
    sigma_lo: float,
    sigma_hi: float,
    trace: str = "hutchinson",
    generator=None,
) -> torch.Tensor:
    """-log p_{sigma_lo}(x) per sample (nats) by the probability-flow ODE (see the module docstring)."""
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"unknown trace estimator {trace!r}: use hutchinson or exact")
    log_sigmas = torch.linspace(math.log(sigma_lo), math.log(sigma_hi), steps + 1, dtype=torch.float64)
    device, n = x.device, len(x)
    probe = None
    if trace == "hutchinson":
        bits = torch.randint(0, 2, x.shape, generator=generator, device=device)
        probe = (2 * bits - 1).to(torch.float64)

    def field(y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """dy/dlog sigma = sigma eps_hat and the divergence of that field in y."""
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            level = torch.full((n,), sigma, dtype=torch.float64, device=device)
            drift = sigma * denoise(model, process, prediction, y, level)[1].double()
            if probe is not None:
                (grad,) = torch.autograd.grad((drift * probe).sum(), y)
                div = (grad * probe).flatten(1).sum(1)
            else:
                flat = drift.flatten(1)
                div = torch.zeros(n, dtype=torch.float64, device=device)
                for j in range(flat.shape[1]):
                    (grad,) = torch.autograd.grad(flat[:, j].sum(), y, retain_graph=True)
                    div = div + grad.flatten(1)[:, j]
        return drift.detach(), div.detach()

    y, log_density_change = x.double(), torch.zeros(n, dtype=torch.float64, device=device)
    for j in range(steps):  # classic Runge-Kutta (4th order) in u = log sigma, on (y, log density)
        h, u = float(log_sigmas[j + 1] - log_sigmas[j]), float(log_sigmas[j])
        k1, g1 = field(y, math.exp(u))
        k2, g2 = field(y + 0.5 * h * k1, math.exp(u + 0.5 * h))
        k3, g3 = field(y + 0.5 * h * k2, math.exp(u + 0.5 * h))
        k4, g4 = field(y + h * k3, math.exp(u + h))
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        log_density_change = log_density_change + h / 6 * (g1 + 2 * g2 + 2 * g3 + g4)
    dims = x[0].numel()
    prior = -0.5 * (y**2).flatten(1).sum(1) / sigma_hi**2 - 0.5 * dims * (LOG_2PI + 2 * math.log(sigma_hi))
    return -(prior + log_density_change)
