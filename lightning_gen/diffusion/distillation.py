"""Few-step students of a diffusion model: progressive distillation and consistency models, as maths on
tensors (the method is ``methods/generative/distill.py``).

Notation: x_t = a_t x + b_t z for any process (processes.py); x_hat(x_t, t) a model's prediction of the
data (predictions.to_x_and_eps); sigma = b / a and the variance-exploding variable x~ = x_t / a, in which
every process reads x~ = x + sigma z (as the samplers use it).

DDIM (Song et al. 2021) with eta = 0 moves from t to s along the line through x_hat:

    x_s = a_s x_hat + b_s (x_t - a_t x_hat) / b_t

Progressive distillation (Salimans & Ho 2022, arXiv:2202.00512, Algorithm 2). A student of N steps on
the grid t = i / N learns what its teacher does in 2N: from x_t, two teacher DDIM steps of 1/(2N),

    x_t'  = DDIM(x_hat_teacher(x_t, t),    t  -> t' = t - 1/(2N))
    x_t'' = DDIM(x_hat_teacher(x_t', t'),  t' -> t'' = t - 1/N)

and the student's target is the data prediction with which ONE DDIM step from t lands on x_t'':

    x~ = (x_t'' - (b_t'' / b_t) x_t) / (a_t'' - (b_t'' / b_t) a_t)       (= x_t'' where t'' = 0)

regressed with the truncated-SNR weight max(a_t^2 / b_t^2, 1) (their "truncated SNR" loss in x). The
student then teaches the next round of N / 2 steps. With a guided teacher, (1 + w) f(x, c) - w f(x, null)
with w drawn per example and given to the student as an input, the student learns the guided sampler
for every w at once (Meng et al. 2023, arXiv:2210.03142).

Consistency models (Song et al. 2023, arXiv:2303.01469). A function f(x~, sigma) that maps every point
of a probability-flow trajectory to its start, on sigma in [sigma_min, sigma_max], with the skip
parameterisation that makes f(x~, sigma_min) = x~ hold by construction:

    f(x~, sigma) = c_skip(sigma) x~ + (1 - c_skip(sigma)) x_hat_student(x~, sigma),
    c_skip(sigma) = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)

(Song et al. write c_out(sigma) F with the raw network F; with the student's data prediction in its
place, c_out = 1 - c_skip keeps the boundary condition and f is the teacher's denoiser at large sigma
where the student starts.) Consistency distillation on the grid sigma_1 = sigma_min < ... < sigma_N =
sigma_max (Karras et al.'s rho = 7): n ~ U{1..N-1}, x~_{n+1} = x + sigma_{n+1} z, one teacher ODE step
(Heun or Euler on dx~/dsigma = (x~ - x_hat) / sigma) to x~_n, and

    loss = d(f_theta(x~_{n+1}, sigma_{n+1}), f_theta-(x~_n, sigma_n))

with theta- = stop-gradient(theta) (Song & Dhariwal 2023) or an EMA of theta, d the squared error or the
pseudo-Huber metric sqrt(||.||^2 + c^2) - c, c = 0.00054 sqrt(dim) (Song & Dhariwal 2023).
Consistency training needs no teacher: x~_n = x + sigma_n z with the same x and z. Sampling (their
Algorithm 1): x = f(sigma_max z, sigma_max), then for each later tau of the schedule,
x = f(x + sqrt(tau^2 - sigma_min^2) z, tau).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_gen.diffusion.processes import Coefficients

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x~ or x_t, sigma or t per example) -> x_hat


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))) if torch.is_tensor(v) else v


def ddim_step(x_hat: torch.Tensor, xt: torch.Tensor, t: Coefficients, s: Coefficients) -> torch.Tensor:
    """x_s = a_s x_hat + b_s (x_t - a_t x_hat) / b_t (coefficients per example (N,) or floats)."""
    a_t, b_t, a_s, b_s = (_view(v, xt) for v in (t.a, t.b, s.a, s.b))
    return a_s * x_hat + b_s * (xt - a_t * x_hat) / b_t


def progressive_target(
    xt_two_steps: torch.Tensor, xt: torch.Tensor, t: Coefficients, s: Coefficients
) -> torch.Tensor:
    """The x_hat for which one DDIM step t -> s gives ``xt_two_steps`` (the teacher's two steps)."""
    a_t, b_t, a_s, b_s = (_view(v, xt) for v in (t.a, t.b, s.a, s.b))
    ratio = b_s / b_t
    return (xt_two_steps - ratio * xt) / (a_s - ratio * a_t)


def truncated_snr_weight(t: Coefficients) -> torch.Tensor:
    """max(a^2 / b^2, 1): Salimans & Ho's weighting of the x-space error (b = 0 never occurs at t > 0)."""
    return (t.a * t.a / (t.b * t.b)).clamp(min=1.0)


def consistency_skip(sigma: torch.Tensor, sigma_min: float, sigma_data: float) -> torch.Tensor:
    """c_skip(sigma) = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2); 1 at sigma_min exactly."""
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def consistency_function(
    x_tilde: torch.Tensor, sigma: torch.Tensor, x_hat: torch.Tensor, sigma_min: float, sigma_data: float
) -> torch.Tensor:
    """f(x~, sigma) = c_skip x~ + (1 - c_skip) x_hat."""
    skip = _view(consistency_skip(sigma, sigma_min, sigma_data), x_tilde)
    return skip * x_tilde + (1 - skip) * x_hat


def karras_sigmas(points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """sigma_1 = sigma_min < ... < sigma_N = sigma_max, evenly spaced in sigma^(1/rho) (increasing)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(lo + i / (points - 1) * (hi - lo)) ** rho for i in range(points)]


def ode_step(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, solver: str):
    """One step of dx~/dsigma = (x~ - x_hat(x~, sigma)) / sigma from sigma to sigma_next (per example):
    Euler, or Heun's trapezoidal correction with the slope at the Euler point (Karras et al. 2022)."""
    s, s_next = _view(sigma, x), _view(sigma_next, x)
    slope = (x - denoise(x, sigma)) / s
    euler = x + (s_next - s) * slope
    if solver == "euler":
        return euler
    slope_next = (euler - denoise(euler, sigma_next)) / s_next
    return x + (s_next - s) * 0.5 * (slope + slope_next)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per example, c = 0.00054 sqrt(dim) (Song & Dhariwal 2023)."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).flatten(1).square().sum(1) + c * c).sqrt() - c


def schedule_indices(points: int, steps: int) -> list[int]:
    """Grid indices (0-based, descending from sigma_max) of a k-step consistency sampler on N points:
    evenly spaced in index, starting at the top."""
    return [round((points - 1) * (1 - j / steps)) for j in range(steps)]


# ---------------------------------------------------------------------------- the training losses
# ``student`` and ``teacher`` below are data predictions: (x_t, t, coefficients at t) -> x_hat for
# progressive distillation, (x~, sigma) -> x_hat for consistency models; both per example.
XHat = Callable[[torch.Tensor, torch.Tensor, Coefficients], torch.Tensor]


def progressive_loss(
    student: XHat, teacher: XHat, process, x: torch.Tensor, z: torch.Tensor, i: torch.Tensor, steps: int
):
    """Per-example loss of a student of ``steps`` steps at grid points t = i / steps (i in 1..steps, (N,)),
    for data x and noise z: max(SNR, 1) * mean over dimensions of (x_hat_student(x_t, t) - x~)^2."""
    t = i.to(x.dtype) / steps
    mid, end = t - 0.5 / steps, t - 1.0 / steps
    at_t, at_mid, at_end = process.coefficients(t), process.coefficients(mid), process.coefficients(end)
    xt = _view(at_t.a, x) * x + _view(at_t.b, x) * z
    with torch.no_grad():
        x_mid = ddim_step(teacher(xt, t, at_t), xt, at_t, at_mid)
        x_end = ddim_step(teacher(x_mid, mid, at_mid), x_mid, at_mid, at_end)
        target = progressive_target(x_end, xt, at_t, at_end)
    error = (student(xt, t, at_t).float() - target.float()).square().flatten(1).mean(1)
    return truncated_snr_weight(at_t).float() * error


def consistency_loss(
    student: Denoise,
    target: Denoise,
    teacher: Denoise | None,
    x: torch.Tensor,
    z: torch.Tensor,
    n: torch.Tensor,
    sigmas: torch.Tensor,
    sigma_min: float,
    sigma_data: float,
    solver: str = "heun",
    metric: str = "pseudo_huber",
):
    """Per-example consistency loss between grid points n and n + 1 (0-based n in 0..N-2, (N,); ``sigmas``
    the increasing grid (N,) on the device). ``teacher``: its ODE step gives x~_n (distillation); None:
    x~_n = x + sigma_n z with the same z (consistency training). ``target``: theta-'s data prediction."""
    s_next, s = sigmas[n + 1], sigmas[n]
    x_next = x + _view(s_next, x) * z
    with torch.no_grad():
        x_here = x + _view(s, x) * z if teacher is None else ode_step(teacher, x_next, s_next, s, solver)
        aim = consistency_function(x_here, s, target(x_here, s), sigma_min, sigma_data)
    out = consistency_function(x_next, s_next, student(x_next, s_next), sigma_min, sigma_data)
    if metric == "l2":
        return (out.float() - aim.float()).square().flatten(1).mean(1)
    return pseudo_huber(out.float(), aim.float())


# ---------------------------------------------------------------------------- the students' samplers
def progressive_sample(student: XHat, process, steps: int, noise: torch.Tensor, clip: float | None = None):
    """DDIM with ``steps`` steps on t = 1, (steps - 1) / steps, ..., 0 from x_1 = ``noise`` (N(0, prior))."""
    x, n = noise, len(noise)
    for i in range(steps, 0, -1):
        t = torch.full((n,), i / steps, dtype=x.dtype, device=x.device)
        s = torch.full((n,), (i - 1) / steps, dtype=x.dtype, device=x.device)
        at_t, at_s = process.coefficients(t), process.coefficients(s)
        x_hat = student(x, t, at_t)
        if clip is not None:
            x_hat = x_hat.clamp(-clip, clip)
        x = ddim_step(x_hat, x, at_t, at_s)
    return x


def consistency_sample(
    student: Denoise, taus: list[float], sigma_min: float, sigma_data: float, noise: Callable
):
    """Song et al.'s multistep sampler: x = f(tau_1 z, tau_1), then x = f(x + sqrt(tau^2 - sigma_min^2) z, tau)
    for the later taus (decreasing). ``noise()`` draws z."""
    x = None
    for tau in taus:
        z = noise()
        x_tilde = tau * z if x is None else x + math.sqrt(max(tau * tau - sigma_min * sigma_min, 0.0)) * z
        sigma = torch.full((len(z),), tau, dtype=z.dtype, device=z.device)
        x = consistency_function(x_tilde, sigma, student(x_tilde, sigma), sigma_min, sigma_data)
    return x
