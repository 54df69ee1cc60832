"""Closed-form checks of the generative maths: schedules, q(x_t|x_0), posterior, CFG, ELBO pieces, GAN
losses, PixelCNN causality. Each reference is computed independently (numpy / scipy / autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_gen import diffusion
from lightning_gen.losses import elbo, gan
from lightning_gen.nets.pixelcnn import PixelCNN


def test_linear_alpha_bar_is_the_running_product():
    s = diffusion.NoiseSchedule.linear(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert s.betas.numpy() == pytest.approx(betas, rel=1e-12)
    expected = np.array([np.prod(1 - betas[: t + 1]) for t in range(1000)])
    assert s.alpha_bar.numpy() == pytest.approx(expected, rel=1e-10)
    assert s.alpha_bar_prev[0] == 1 and s.alpha_bar_prev[1:].numpy() == pytest.approx(
        expected[:-1], rel=1e-10
    )


def test_cosine_alpha_bar_follows_the_cosine_formula():
    s = diffusion.NoiseSchedule.cosine(200)
    t = np.arange(1, 201) / 200
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = f(t) / f(0)
    # betas are clipped at 0.999 at the very end only; elsewhere the product is the closed form
    assert s.alpha_bar.numpy()[:-1] == pytest.approx(expected[:-1], rel=1e-9)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()


def test_q_sample_matches_the_iterated_forward_chain():
    """Applying q(x_t|x_{t-1}) = N(sqrt(1-beta) x, beta) t times gives N(sqrt(ab_t) x0, 1-ab_t)."""
    torch.manual_seed(0)
    s = diffusion.NoiseSchedule.linear(100, 1e-3, 0.05)
    x0 = torch.full((50_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(30):
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn_like(x)
    ab = s.alpha_bar[29].item()
    assert x.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=1e-2)
    assert x.var().item() == pytest.approx(1 - ab, rel=2e-2)
    eps = torch.randn_like(x0)
    i = torch.full((len(x0),), 29)
    assert torch.allclose(s.q_sample(x0, i, eps), math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps)


def test_posterior_mean_and_variance_equal_gaussian_conditioning():
    """q(x_{t-1}|x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0, conditioned with numpy."""
    s = diffusion.NoiseSchedule.linear(50, 1e-3, 0.1)
    for step in (1, 10, 49):
        ab_prev, beta = s.alpha_bar[step - 1].item(), s.betas[step].item()
        x0, xt = 0.3, -1.2
        # x_{t-1} = sqrt(ab_prev) x0 + sqrt(1-ab_prev) e1;  x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) e2
        mean = np.array([math.sqrt(ab_prev) * x0, math.sqrt(1 - beta) * math.sqrt(ab_prev) * x0])
        var_prev = 1 - ab_prev
        cov = np.array(
            [
                [var_prev, math.sqrt(1 - beta) * var_prev],
                [math.sqrt(1 - beta) * var_prev, (1 - beta) * var_prev + beta],
            ]
        )
        cond_mean = mean[0] + cov[0, 1] / cov[1, 1] * (xt - mean[1])
        cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        i = torch.tensor([step])
        m, v = s.posterior(
            torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), i
        )
        assert m.item() == pytest.approx(cond_mean, rel=1e-10)
        assert v.item() == pytest.approx(cond_var, rel=1e-10)
        # with the true noise, Algorithm 2's mean (1/sqrt(alpha_t), not alpha-bar) is the posterior mean
        ab = s.alpha_bar[step].item()
        eps = (xt - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        mm = s.model_mean(
            torch.tensor([[xt]], dtype=torch.float64), i, torch.tensor([[eps]], dtype=torch.float64)
        )
        assert mm.item() == pytest.approx(cond_mean, rel=1e-10)


def test_cfg_combination_and_batched_guidance():
    cond, uncond = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(diffusion.cfg_combine(cond, uncond, 0.0), cond)
    assert torch.allclose(diffusion.cfg_combine(cond, uncond, 2.5), 3.5 * cond - 2.5 * uncond)
    calls = []

    def net(x, t, y):
        calls.append(len(x))
        return x * (y.float()[:, None] + 1) + t.float()[:, None]

    labels, null, x, t = torch.tensor([1, 2]), 10, torch.randn(2, 3), torch.tensor([5, 5])
    out = diffusion.guided(net, labels, null, 3.0)(x, t)
    expected = 4 * net(x, t, labels) - 3 * net(x, t, torch.full_like(labels, null))
    assert calls[0] == 4  # conditional and unconditional halves went through the network as one batch
    assert torch.allclose(out, expected)


def test_vae_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.2, -0.7, 1.1]])
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 3, dtype=torch.float64)
    q = stats.norm(mu.double().numpy(), np.exp(0.5 * logvar.double().numpy()))
    mc = (q.logpdf(z.numpy()) - stats.norm(0, 1).logpdf(z.numpy())).sum(1).mean()
    assert elbo.kl_standard_normal(mu, logvar).item() == pytest.approx(mc, abs=0.02)


def test_gaussian_nll_and_bits_per_dim():
    x, mean, logvar = torch.rand(2, 5), torch.rand(2, 5), torch.randn(2, 5) * 0.3
    ref = -stats.norm(mean.numpy(), np.exp(0.5 * logvar.numpy())).logpdf(x.numpy()).sum(1)
    assert elbo.gaussian_nll(x, mean, logvar).numpy() == pytest.approx(ref, rel=1e-5)
    # a uniform density on [0, 1]^D has nll 0 and must cost exactly 8 bits per 8-bit dimension
    assert elbo.bits_per_dim(torch.zeros(1), 10).item() == pytest.approx(8.0)
    assert elbo.discrete_bits_per_dim(torch.tensor([10 * math.log(256)]), 10).item() == pytest.approx(8.0)


def test_gan_losses_equal_their_log_formulas():
    real, fake = torch.randn(64), torch.randn(64)
    d_real, d_fake = torch.sigmoid(real).double(), torch.sigmoid(fake).double()
    d_loss = -(torch.log(d_real) + torch.log(1 - d_fake)).mean()
    assert gan.discriminator_loss(real, fake).item() == pytest.approx(d_loss.item(), rel=1e-5)
    assert gan.generator_loss(fake, "non_saturating").item() == pytest.approx(
        -torch.log(d_fake).mean().item(), rel=1e-5
    )
    assert gan.generator_loss(fake, "minimax").item() == pytest.approx(
        torch.log(1 - d_fake).mean().item(), rel=1e-5
    )
    # the non-saturating loss keeps its gradient where D confidently rejects the fakes
    saturated = torch.tensor([-12.0], requires_grad=True)
    gan.generator_loss(saturated, "minimax").backward()
    g_minimax = saturated.grad.abs().item()
    saturated.grad = None
    gan.generator_loss(saturated, "non_saturating").backward()
    assert saturated.grad.abs().item() > 1000 * g_minimax
    with pytest.raises(ValueError, match="non_saturating"):
        gan.generator_loss(fake, "hinge")


@pytest.mark.parametrize("channels", [1, 3])
def test_pixelcnn_is_causal_in_raster_and_channel_order(channels):
    torch.manual_seed(0)
    net = PixelCNN(channels, width=12, blocks=2, kernel_size=3)
    h = w = 5
    x = torch.randn(1, channels, h, w, requires_grad=True)
    logits = net(x)  # (1, C, 256, H, W)
    order = lambda c, r, col: (r * w + col) * channels + c  # raster order, channels within a pixel
    for r, col, c in [(0, 0, 0), (2, 3, 0), (2, 3, channels - 1), (4, 4, channels - 1)]:
        grad = torch.autograd.grad(logits[0, c, :, r, col].sum(), x, retain_graph=True)[0][0]
        i = order(c, r, col)
        for cc in range(channels):
            for rr in range(h):
                for cl in range(w):
                    if order(cc, rr, cl) >= i:
                        assert grad[cc, rr, cl] == 0, f"output {(c, r, col)} sees input {(cc, rr, cl)}"
        if i > 0:  # and it does see its predecessors (the mask is not all zeros)
            assert grad.abs().sum() > 0


def test_pixelcnn_rows_below_do_not_change_the_logits_of_a_row():
    """What sampling relies on to stop each pass at the current row."""
    torch.manual_seed(0)
    net = PixelCNN(3, width=12, blocks=2, kernel_size=3).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        full, cropped = net(x)[..., :3, :], net(x[:, :, :3])
    assert torch.allclose(full, cropped, atol=1e-6)
