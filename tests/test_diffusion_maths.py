"""Closed-form checks of the generalised diffusion maths (lightning_gen.diffusion).

- processes: a, b and their derivatives against the formulas (and autograd), sigma(t) inverted;
  DDPM's chain and rectified flow give exactly the training inputs and targets of those methods.
- predictions: eps / x / v conversions are exact (round trips, hand-derived formulas, Salimans & Ho's v).
- samplers: with the optimal denoiser of Gaussian data N(mu, s^2) plugged in as the network, the
  deterministic samplers' error against the exact probability-flow ODE solution (closed form for
  Gaussian data) falls with the number of steps at the rate of their order: slope 1 (Euler, DDIM) or
  2 (Heun, DPM-Solver++(2M)) on a log-log plot, for every process and prediction.
- likelihoods: on a 1-d Gaussian mixture with its optimal denoiser, the continuous-time bound equals
  the entropy plus the gap that the closed form predicts; the probability-flow ODE likelihood of a
  linear-Gaussian model equals the change of variables; DDPM's discrete bound against its pieces.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gen import diffusion
from lightning_gen.diffusion import likelihood, predictions, processes, samplers
from lightning_gen.diffusion.processes import Coefficients

CONTINUOUS = {
    "vp_cosine": lambda: processes.VPProcess("cosine"),
    "vp_linear": lambda: processes.VPProcess("linear"),
    "ve": lambda: processes.VEProcess(0.01, 50.0),
    "flow": lambda: processes.FlowProcess(),
}
ALL = {**CONTINUOUS, "ddpm": lambda: processes.build_process("vp", "linear", 1000)}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: on a loaded 2-core machine torch's thread pool costs more than the maths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def time_of(process, t_net: torch.Tensor) -> torch.Tensor:
    """Invert the network's time input (1000 t, or DDPM's step index t T - 1)."""
    t_net = t_net.double()
    return (t_net + 1) / process.T if process.discrete else t_net / processes.TIME_SCALE


def oracle(process, prediction: str, posterior):
    """A 'network' that returns the exact prediction: ``posterior(x_t, a, b)`` gives E[x | x_t]."""

    def model(x_in: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        c = process.coefficients(time_of(process, t_net))
        shape = (-1, *([1] * (x_in.ndim - 1)))
        coef = Coefficients(*(v.view(shape) for v in (c.a, c.b, c.da, c.db)))
        xt = x_in.double() / process.input_scale(coef)
        x_hat = posterior(xt, coef.a, coef.b)
        return predictions.from_x_and_eps(prediction, x_hat, (xt - coef.a * x_hat) / coef.b, coef)

    return model


# ----------------------------------------------------------------------------------- processes


def test_process_coefficients_follow_their_formulas_and_derivatives():
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    flow = processes.FlowProcess().coefficients(t)
    assert torch.equal(flow.a, 1 - t) and torch.equal(flow.b, t)
    ve = processes.VEProcess(0.01, 50.0).coefficients(t)
    assert torch.allclose(ve.b, 0.01 * (50 / 0.01) ** t, rtol=1e-12) and torch.equal(ve.a, torch.ones_like(t))
    phi = lambda u: (u + 0.008) / 1.008 * math.pi / 2  # noqa: E731
    cos = processes.VPProcess("cosine").coefficients(t)
    assert torch.allclose(cos.a**2, torch.cos(phi(t)) ** 2 / math.cos(phi(0.0)) ** 2, rtol=1e-12)
    lin = processes.VPProcess("linear").coefficients(t)
    assert torch.allclose(lin.a**2, torch.exp(-(0.1 * t + 9.95 * t**2)), rtol=1e-12)  # Song et al.'s VP SDE
    for name, make in ALL.items():
        process = make()
        c = process.coefficients(t)
        if name != "ve":
            assert torch.allclose(c.a**2 + c.b**2, torch.ones_like(t), atol=1e-12) or name == "flow"
        # derivatives against central differences (inside one step of DDPM's chain: t on a step's interior)
        tt = t + 0.0004 if name == "ddpm" else t
        h = 1e-6
        up, down = process.coefficients(tt + h), process.coefficients(tt - h)
        c = process.coefficients(tt)
        assert torch.allclose(c.da, (up.a - down.a) / (2 * h), rtol=1e-5, atol=1e-8), name
        assert torch.allclose(c.db, (up.b - down.b) / (2 * h), rtol=1e-5, atol=1e-8), name
        sigma = c.b / c.a
        assert torch.allclose(process.t_of_sigma(sigma), tt, atol=1e-10), name


def test_ddpm_chain_gives_the_discrete_schedule_at_its_steps():
    process = processes.build_process("vp", "linear", 1000)
    schedule = diffusion.NoiseSchedule.linear(1000)
    steps = torch.tensor([0, 1, 499, 999])
    c = process.at_step(steps, torch.float64)
    assert torch.equal(c.a, schedule.alpha_bar[steps].sqrt()) and torch.equal(
        c.b, (1 - schedule.alpha_bar[steps]).sqrt()
    )
    cont = process.coefficients((steps + 1).double() / 1000)  # the continuous extension meets the steps
    assert torch.allclose(cont.a, c.a, rtol=1e-12) and torch.allclose(cont.da, c.da, rtol=1e-9)
    assert process.network_time(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(499.0)
    # between steps beta is constant: log abar is linear in t
    mid = process.coefficients(torch.tensor([0.5005], dtype=torch.float64)).a ** 2
    expected = math.exp(0.5 * (math.log(schedule.alpha_bar[499]) + math.log(schedule.alpha_bar[500])))
    assert mid.item() == pytest.approx(expected, rel=1e-12)


def test_abcd_reproduce_the_ddpm_and_rectified_flow_training_inputs_and_targets_exactly():
    """The (a, b, c, d) of vp-chain/eps and flow/v give bit for bit what Algorithm 1 of Ho et al. and the
    rectified-flow recipe compute: x_t and the regression target."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    schedule = diffusion.NoiseSchedule.linear(1000)
    process = processes.DiscreteVP(schedule)
    i = torch.randint(0, 1000, (16,), generator=g)
    c = process.at_step(i)
    c = Coefficients(*(v.view(-1, 1, 1, 1) for v in (c.a, c.b, c.da, c.db)))
    assert torch.equal(c.a * x + c.b * z, schedule.q_sample(x, i, z))  # sqrt(ab) x0 + sqrt(1 - ab) eps
    assert torch.equal(predictions.training_target("eps", x, z, c), z)
    t = torch.rand(16, generator=g)
    c = processes.FlowProcess().coefficients(t)
    c = Coefficients(*(v.view(-1, 1, 1, 1) for v in (c.a, c.b, c.da, c.db)))
    tv = t.view(-1, 1, 1, 1)
    assert torch.equal(c.a * x + c.b * z, (1 - tv) * x + tv * z)
    assert torch.equal(predictions.training_target("v", x, z, c), z - x)
    assert predictions.target_coefficients("v", c)[0].unique().tolist() == [-1.0]  # c = -1, d = 1


# ----------------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("name", list(ALL))
def test_conversions_between_predictions_are_exact(name):
    process = ALL[name]()
    g = torch.Generator().manual_seed(1)
    x, z = (
        torch.randn(64, 3, generator=g, dtype=torch.float64),
        torch.randn(64, 3, generator=g, dtype=torch.float64),
    )
    t = torch.rand(64, generator=g, dtype=torch.float64).clamp(0.01, 0.99)
    c = process.coefficients(t)
    coef = Coefficients(*(v.view(-1, 1) for v in (c.a, c.b, c.da, c.db)))
    xt = coef.a * x + coef.b * z
    for kind in predictions.PREDICTIONS:
        y = predictions.training_target(kind, x, z, coef)
        x_hat, eps = predictions.to_x_and_eps(kind, y, xt, coef)
        assert torch.allclose(x_hat, x, atol=1e-10) and torch.allclose(eps, z, atol=1e-10), kind
        for other in predictions.PREDICTIONS:
            there = predictions.convert(kind, other, y, xt, coef)
            assert torch.allclose(there, predictions.training_target(other, x, z, coef), atol=1e-10)
            assert torch.allclose(predictions.convert(other, kind, there, xt, coef), y, atol=1e-10)
    # hand-derived formulas
    assert torch.allclose(predictions.to_x_and_eps("eps", z, xt, coef)[0], (xt - coef.b * z) / coef.a)
    v = predictions.training_target("v", x, z, coef)
    assert torch.allclose(v, coef.da * x + coef.db * z)  # the velocity of x_t
    if name.startswith("vp") or name == "ddpm":
        # a = cos(phi), b = sin(phi): v = phi' (a z - b x) = phi' v_SH (Salimans & Ho 2022), phi' = a b' - b a'
        phi_dot = coef.a * coef.db - coef.b * coef.da
        v_sh = coef.a * z - coef.b * x
        assert torch.allclose(v, phi_dot * v_sh, atol=1e-10)
        assert torch.allclose(
            predictions.to_x_and_eps("v", v, xt, coef)[0], coef.a * xt - coef.b * v_sh, atol=1e-10
        )
    if name == "flow":
        assert torch.allclose(v, z - x, atol=1e-15)


def test_guidance_is_the_same_whatever_the_network_predicts():
    """CFG on the raw output: x_hat and eps_hat are affine in it with weights summing to one."""
    process = processes.VPProcess("cosine")
    g = torch.Generator().manual_seed(2)
    xt, y_cond_eps, y_null_eps = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    c = process.at(0.6)
    guided_eps = diffusion.cfg_combine(y_cond_eps, y_null_eps, 2.5)
    as_v = [predictions.convert("eps", "v", y, xt, c) for y in (y_cond_eps, y_null_eps)]
    guided_v = diffusion.cfg_combine(*as_v, 2.5)
    assert torch.allclose(predictions.convert("v", "eps", guided_v, xt, c), guided_eps, atol=1e-12)


# ----------------------------------------------------------------------------------- samplers

MU, STD = 0.5, 0.7  # data N(MU, STD^2)


def gaussian_posterior(xt, a, b):
    return MU + a * STD**2 * (xt - a * MU) / (a * a * STD**2 + b * b)


def exact_flow_map(process, sampler: str, steps: int, z: torch.Tensor) -> torch.Tensor:
    """The exact probability-flow ODE solution from the sampler's start to its end, for Gaussian data.

    In x / a with noise level sigma: x(sigma) - mu = (x(sigma_0) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2).
    The Karras grid's last step from sigma_min to 0 returns the denoiser's output there (also exact here).
    """
    if sampler in samplers.STARTS_AT_ONE:
        start, end = process.at(1.0), process.at(0.0)
        unit = (process.prior_std * z - start.a * MU) / math.sqrt(start.a**2 * STD**2 + start.b**2)
        return end.a * MU + unit * math.sqrt(end.a**2 * STD**2 + end.b**2)
    sigmas = samplers.edm_sigmas(process, steps)
    first, last = sigmas[0], sigmas[-2]
    at_last = MU + (first * z - MU) * math.sqrt(STD**2 + last**2) / math.sqrt(STD**2 + first**2)
    return gaussian_posterior(at_last, 1.0, last)


ORDERS = {
    "euler": (1, [32, 64, 128]),
    "ddim": (1, [16, 32, 64]),
    "heun": (2, [16, 32, 64]),
    "dpm++2m": (2, [16, 32, 64]),
}


@pytest.mark.parametrize("sampler", list(ORDERS))
def test_samplers_converge_at_the_rate_of_their_order(sampler):
    order, step_counts = ORDERS[sampler]
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(1)).double()  # the samplers' own draw
    checked = 0
    for name, make in ALL.items():
        process = make()
        if sampler == "euler" and name == "ddpm":
            continue  # Euler in t on the chain's piecewise beta(t) needs more steps than T to be asymptotic
        for prediction in predictions.PREDICTIONS:
            model = oracle(process, prediction, gaussian_posterior)
            try:
                samplers.check(sampler, step_counts[0], process, prediction)
            except samplers.SamplerError:
                assert prediction == "eps" and process.pure_noise_at_end and sampler in samplers.STARTS_AT_ONE
                continue
            errors = []
            for steps in step_counts:
                g = torch.Generator().manual_seed(1)
                x, nfe = samplers.sample(model, process, prediction, (64, 1), sampler, steps, generator=g)
                assert nfe == (2 * steps - 1 if sampler == "heun" else steps)
                errors.append((x.double() - exact_flow_map(process, sampler, steps, z)).abs().max().item())
            slope = -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
            assert order - 0.2 <= slope <= order + 0.5, (
                f"{sampler} on {name}/{prediction}: slope {slope:.2f}, errors {errors}"
            )
            checked += 1
    assert checked >= 10


def test_a_sampler_refuses_what_it_cannot_do():
    flow = processes.FlowProcess()
    for sampler in ("ddpm", "ddim", "euler"):
        with pytest.raises(samplers.SamplerError, match="pure noise"):
            samplers.check(sampler, 10, flow, "eps")  # x is unknowable from eps at t = 1
    samplers.check("heun", 10, flow, "eps")  # starts at sigma_max < inf
    with pytest.raises(samplers.SamplerError, match="at least 1"):
        samplers.check("heun", 0, flow, "v")
    with pytest.raises(samplers.SamplerError, match="at most T=20"):
        samplers.check("ddim", 21, processes.build_process("vp", "linear", 20), "eps")
    with pytest.raises(samplers.SamplerError, match="unknown sampler"):
        samplers.check("dpm++3m", 10, flow, "v")
    assert samplers.nfe("heun", 18) == 35 and samplers.nfe("dpm++2m", 18) == 18


def test_edm_grid_is_karras_rho_7_inside_the_trained_range():
    ddpm = processes.build_process("vp", "linear", 1000)
    sigmas = samplers.edm_sigmas(ddpm, 18)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0.0 and len(sigmas) == 19
    assert sigmas[-2] == pytest.approx(ddpm.sigma_lo)  # 0.01 at DDPM's first step, above EDM's 0.002
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (ddpm.sigma_lo ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert np.allclose(sigmas[:-1], expected, rtol=1e-12)
    points = samplers.sigma_points(ddpm, sigmas[:-1])
    assert all(0 <= p.net_time <= 999 for p in points)  # fractional step indices within the chain


# ----------------------------------------------------------------------------------- likelihood

W = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-1.0, 0.8], dtype=torch.float64)
STDS = torch.tensor([0.25, 0.4], dtype=torch.float64)


def mixture_posterior(xt, a, b):
    """E[x | x_t] for the Gaussian mixture: responsibilities times each component's posterior mean."""
    var = a * a * STDS**2 + b * b
    log_w = torch.log(W) - 0.5 * torch.log(var) - 0.5 * (xt - a * MEANS) ** 2 / var
    return (torch.softmax(log_w, -1) * (MEANS + a * STDS**2 * (xt - a * MEANS) / var)).sum(-1, keepdim=True)


def mixture_log_pdf(x: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
    var = STDS**2 + extra_var
    return torch.logsumexp(
        torch.log(W) - 0.5 * torch.log(2 * math.pi * var) - 0.5 * (x - MEANS) ** 2 / var, -1
    )


def entropy(extra_var: float = 0.0, half_width: float = 12.0) -> float:
    """Differential entropy of the mixture convolved with N(0, extra_var), by quadrature."""
    grid = torch.linspace(-half_width, half_width, 200_001, dtype=torch.float64).unsqueeze(1)
    log_p = mixture_log_pdf(grid, extra_var)
    return float(-(log_p.exp() * log_p).sum() * (2 * half_width / 200_000))


def prior_kl(sigma_hi: float) -> float:
    """KL(mixture * N(0, sigma_hi^2) || N(0, sigma_hi^2)), by quadrature."""
    half = 12 * sigma_hi
    grid = torch.linspace(-half, half, 200_001, dtype=torch.float64).unsqueeze(1)
    log_q = mixture_log_pdf(grid, sigma_hi**2)
    log_p = -0.5 * math.log(2 * math.pi * sigma_hi**2) - 0.5 * grid.squeeze(1) ** 2 / sigma_hi**2
    return float((log_q.exp() * (log_q - log_p)).sum() * (2 * half / 200_000))


def test_continuous_bound_on_a_gaussian_mixture_is_its_entropy_plus_the_closed_form_gap():
    """E[bound] = h(x + s_lo n) + KL(q(x~_hi) || N(0, s_hi^2)) >= h(x) for the optimal denoiser: the
    diffusion term is I(x; x~_lo) - I(x; x~_hi) (I-MMSE), the decoder's cross-entropy h(s_lo n), the
    prior's the rest. The same for every process and prediction (the bound depends on sigma only)."""
    g = torch.Generator().manual_seed(0)
    n = 50_000
    component = torch.multinomial(W, n, replacement=True, generator=g)
    x = (MEANS[component] + STDS[component] * torch.randn(n, generator=g, dtype=torch.float64)).unsqueeze(1)
    sigma_lo, sigma_hi = 0.3, 2.0  # both ends far enough in that the decoder and the prior terms show
    exact_nll = entropy()
    expected = entropy(sigma_lo**2) + prior_kl(sigma_hi)
    assert expected - exact_nll > 0.2  # a gap the test can resolve
    estimates = []
    for process, prediction in [
        (processes.FlowProcess(), "v"),
        (processes.VPProcess("cosine"), "eps"),
        (processes.VEProcess(), "x"),
    ]:
        model = oracle(process, prediction, mixture_posterior)
        bound, var = likelihood.vlb_continuous(
            model,
            process,
            prediction,
            x,
            2,
            sigma_lo,
            sigma_hi,
            decoder="gaussian",
            generator=torch.Generator().manual_seed(1),
        )
        mean, stderr = bound.mean().item(), (bound.std() / math.sqrt(n)).item()
        assert mean > exact_nll + 10 * stderr  # a bound above the exact negative log-likelihood
        assert abs(mean - expected) < 4 * stderr, (
            f"{process.name}: {mean:.4f} +- {stderr:.4f} vs {expected:.4f}"
        )
        assert var.shape == (n,) and (var > 0).all()
        estimates.append(bound)
    assert torch.allclose(estimates[0], estimates[1]) and torch.allclose(estimates[0], estimates[2])
    # pointwise: above -log p_model(x) = -log (p * N(0, 2 s_lo^2))(x) when the prior matches (s_hi large)
    points = torch.tensor([[-1.0], [0.0], [0.8], [2.0]], dtype=torch.float64)
    process = processes.FlowProcess()
    bound, var = likelihood.vlb_continuous(
        oracle(process, "v", mixture_posterior), process, "v", points.repeat(4000, 1), 1, sigma_lo, 200.0,
        decoder="gaussian", generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    per_point = bound.view(4000, 4)
    model_nll = -mixture_log_pdf(points, 2 * sigma_lo**2)
    assert (per_point.mean(0) > model_nll - 4 * per_point.std(0) / math.sqrt(4000)).all()


def test_ode_likelihood_of_a_linear_gaussian_model_is_the_change_of_variables():
    """Data N(m, S) with the exact denoiser: the ODE map is linear and -log p_{s_lo}(x) is
    -log N(x; m, S + s_lo^2 I). Exact trace (every process gives the same), and Hutchinson's estimate
    agrees on average."""
    m = torch.tensor([0.3, -0.6], dtype=torch.float64)
    S = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)

    def posterior(xt, a, b):
        a3, b3 = a.view(-1, 1, 1), b.view(-1, 1, 1)
        gain = a3 * S @ torch.linalg.inv(a3 * a3 * S + b3 * b3 * torch.eye(2, dtype=torch.float64))
        return m + (gain @ (xt - a * m).unsqueeze(-1)).squeeze(-1)

    xs = torch.tensor([[0.3, -0.6], [1.2, 0.1], [-0.5, -1.5]], dtype=torch.float64)
    lo, hi = 1e-3, 1e3
    exact = -torch.distributions.MultivariateNormal(
        m, S + lo**2 * torch.eye(2, dtype=torch.float64)
    ).log_prob(xs)
    for process, prediction in [
        (processes.FlowProcess(), "v"),
        (processes.VPProcess("cosine"), "eps"),
        (processes.VEProcess(1e-3, 1e3), "x"),
    ]:
        model = oracle(process, prediction, posterior)
        coarse = likelihood.ode_nll(model, process, prediction, xs, 10, lo, hi, trace="exact")
        fine = likelihood.ode_nll(model, process, prediction, xs, 40, lo, hi, trace="exact")
        assert (fine - exact).abs().max() < 3e-3, process.name
        assert (fine - exact).abs().max() < (coarse - exact).abs().max() / 20  # 4th order: ~2^4 per doubling
    process = processes.FlowProcess()
    many = likelihood.ode_nll(
        oracle(process, "v", posterior),
        process,
        "v",
        xs.repeat(200, 1),
        20,
        lo,
        hi,
        generator=torch.Generator().manual_seed(0),
    ).view(200, 3)
    assert ((many.mean(0) - exact).abs() < 4 * many.std(0) / math.sqrt(200) + 0.02).all()


def test_discretised_decoder_is_a_distribution_over_the_256_values():
    values = (torch.arange(256, dtype=torch.float64) * 2 / 255 - 1).view(256, 1)
    for mean, std in [(0.1, 0.01), (-0.98, 0.3), (0.999, 0.002), (3.0, 0.5)]:
        nll = likelihood.discretised_gaussian_nll(values, torch.full_like(values, mean), std)
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_ddpm_bound_with_an_oracle_is_its_prior_and_decoder_and_with_a_wrong_model_adds_the_kl_sum():
    """With x_hat = x every KL term vanishes: the bound is L_T + L_0 (closed forms). With x_hat = 0 each
    L_{t-1} is c0_t^2 |x|^2 / (2 beta~_t): the Monte Carlo estimate matches the sum over all t."""
    schedule = diffusion.NoiseSchedule.linear(10, 1e-3, 0.3)  # few steps: a wrong count (T vs T - 1) shows
    process = processes.DiscreteVP(schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (400, 3), generator=g).double() * 2 / 255 - 1
    ab_T = schedule.alpha_bar[-1].item()
    prior = 0.5 * (ab_T * x**2 + (1 - ab_T) - 1 - math.log(1 - ab_T)).sum(1)
    decoder = likelihood.discretised_gaussian_nll(x, x, math.sqrt(schedule.betas[0].item()))
    knows_x = lambda x_in, t_net: x_in * 0 + x  # noqa: E731  (an x-prediction that is always right)
    bound, var = likelihood.vlb_discrete(knows_x, process, "x", x, 3, generator=g)
    assert torch.allclose(bound, prior + decoder, rtol=1e-12) and torch.allclose(var, torch.zeros_like(var))
    knows_nothing = lambda x_in, t_net: torch.zeros_like(x_in)  # noqa: E731
    bound, var = likelihood.vlb_discrete(knows_nothing, process, "x", x, 200, generator=g)
    c0 = schedule.alpha_bar_prev.sqrt() * schedule.betas / (1 - schedule.alpha_bar)
    kl_sum = sum((c0[i] ** 2 / (2 * schedule.posterior_variance[i])).item() for i in range(1, 10)) * (
        x**2
    ).sum(1)
    zero_decoder = likelihood.discretised_gaussian_nll(
        x, torch.zeros_like(x), math.sqrt(schedule.betas[0].item())
    )
    total, stderr, expected = bound.sum(), var.sum().sqrt(), (prior + zero_decoder + kl_sum).sum()
    assert abs(total - expected) < 4 * stderr and stderr < 0.01 * expected
