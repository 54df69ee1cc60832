"""Samplers on a case with a known answer: data from a known 2-d Gaussian N(m, S).

For that data the optimal predictors are closed forms (conditioning a joint Gaussian):
    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - ab) (ab S + (1 - ab) I)^-1 (x_t - sqrt(ab) m)
    v*(x_t, t)   = E[z - x | x_t] = -m + (t I - (1 - t) S) ((1 - t)^2 S + t^2 I)^-1 (x_t - (1 - t) m)
With them, DDPM (ancestral), DDIM and the rectified-flow Euler sampler must reproduce m and S:
any error in a sampler's update (a wrong coefficient, alpha-bar for alpha, a step off by one) shows.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gen import diffusion

M = torch.tensor([1.5, -0.5], dtype=torch.float64)
S = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)
I2 = torch.eye(2, dtype=torch.float64)
N = 10_000


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: on a loaded 2-core machine torch's thread pool costs 40x more than the maths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def optimal_eps(schedule: diffusion.NoiseSchedule):
    def eps(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar[i[0]].item()
        precision = torch.linalg.inv(ab * S + (1 - ab) * I2)
        return (1 - ab) ** 0.5 * (x - ab**0.5 * M) @ precision.T

    return eps


def optimal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t[0].item()
    cov_v_x = t * I2 - (1 - t) * S
    var_x = (1 - t) ** 2 * S + t**2 * I2
    return -M + (x - (1 - t) * M) @ (cov_v_x @ torch.linalg.inv(var_x)).T


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def assert_moments(x: torch.Tensor, tol_mean: float = 0.03, tol_cov: float = 0.03) -> None:
    mean, cov = moments(x)
    assert torch.allclose(mean, M, atol=tol_mean), f"mean {mean} != {M}"
    assert torch.allclose(cov, S, atol=tol_cov), f"cov {cov} != {S}"


def test_ddpm_ancestral_sampler_reproduces_the_data_gaussian():
    schedule = diffusion.NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    x = diffusion.ddpm_sample(optimal_eps(schedule), schedule, (N, 2), generator=g).double()
    assert_moments(x)


def test_ddim_reproduces_the_data_gaussian_deterministic_and_stochastic():
    # Coarse DDIM steps under-disperse (by Cauchy-Schwarz, each deterministic step shrinks the
    # variance unless steps are small), so the known answer is checked with fine steps; the
    # few-step behaviour is the benchmark's business.
    schedule = diffusion.NoiseSchedule.cosine(1000)
    for steps, eta in [(250, 0.0), (250, 1.0)]:
        g = torch.Generator().manual_seed(1)
        x = diffusion.ddim_sample(
            optimal_eps(schedule), schedule, (N, 2), steps=steps, eta=eta, generator=g
        ).double()
        assert_moments(x)


def test_ddim_with_eta_1_and_all_steps_is_ddpm_with_posterior_variance():
    schedule = diffusion.NoiseSchedule.linear(100, 1e-3, 0.2)
    eps = optimal_eps(schedule)
    a = diffusion.ddim_sample(
        eps, schedule, (50, 2), steps=100, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    b = diffusion.ddpm_sample(
        eps, schedule, (50, 2), generator=torch.Generator().manual_seed(3), variance="posterior"
    )
    assert torch.allclose(a.double(), b.double(), atol=1e-4)


def test_rectified_flow_euler_with_the_optimal_velocity_reproduces_the_data_gaussian():
    g = torch.Generator().manual_seed(2)
    x = diffusion.euler_flow_sample(optimal_velocity, (N, 2), steps=200, generator=g).double()
    assert_moments(x)


def test_a_wrong_posterior_coefficient_is_caught(monkeypatch):
    """The check above has teeth: a posterior mean that takes sigma_s/sigma_t as b_s/b_t (forgetting that
    sigma = b/a, a slip that is right only for VE) breaks the moments."""
    from lightning_gen.diffusion import samplers

    monkeypatch.setattr(samplers, "_ratio", lambda t, s: s.b / t.b)
    schedule = diffusion.NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    x = diffusion.ddpm_sample(optimal_eps(schedule), schedule, (2000, 2), generator=g).double()
    mean, cov = moments(x)
    assert not (torch.allclose(mean, M, atol=0.1) and torch.allclose(cov, S, atol=0.1))


def test_ddim_timesteps_cover_the_range():
    assert diffusion.ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    seq = diffusion.ddim_timesteps(1000, 50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0


def test_ddpm_sample_takes_ddim_eta_from_the_config_unless_given():
    """``method.sample_eta`` is what sample() (and so the FID and image-grid callbacks) use by default."""
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.diffusion import Diffusion, DiffusionConfig

    info = DataInfo(name="digits", channels=1, image_size=8, num_classes=0)
    ddpm = dict(process="vp", prediction="eps", timesteps=1000, noise_schedule="linear", sampler="ddim")
    small = dict(width=8, mults=(1, 2), attention_resolutions=())
    torch.manual_seed(0)
    stochastic = Diffusion(DiffusionConfig(**ddpm, **small, sample_eta=1.0), info)

    def draw(method, **options):
        return method.sample(4, generator=torch.Generator().manual_seed(1), steps=5, **options)

    assert torch.equal(draw(stochastic), draw(stochastic, eta=1.0))
    assert not torch.equal(draw(stochastic), draw(stochastic, eta=0.0))
    deterministic = Diffusion(DiffusionConfig(**ddpm, **small), info)
    deterministic.load_state_dict(stochastic.state_dict())
    assert torch.equal(draw(deterministic), draw(stochastic, eta=0.0))  # the paper's eta = 0 by default
