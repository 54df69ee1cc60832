"""BYOL, SimSiam, Barlow Twins, VICReg and SwAV losses against closed forms computed with numpy,
Sinkhorn-Knopp against the closed form of the entropic transport it solves, SwAV's queue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_gen.losses.noncontrastive import (
    barlow_twins_loss,
    byol_regression,
    negative_cosine,
    vicreg_loss,
)
from lightning_gen.losses.swav import FeatureQueue, assign_codes, sinkhorn_knopp, swapped_prediction_loss


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _np_log_softmax(a):
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def test_byol_and_simsiam_regressions_match_numpy_and_stop_the_target_gradient():
    torch.manual_seed(0)
    p = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    pn, zn = _unit(p.detach().numpy()), _unit(z.detach().numpy())
    assert byol_regression(p, z).item() == pytest.approx(((pn - zn) ** 2).sum(1).mean(), rel=1e-5)
    assert negative_cosine(p, z).item() == pytest.approx(-(pn * zn).sum(1).mean(), rel=1e-5)
    for loss in (byol_regression(p, z), negative_cosine(p, z)):
        p_grad, z_grad = torch.autograd.grad(loss, [p, z], allow_unused=True)
        assert z_grad is None and p_grad.abs().sum() > 0  # stop-gradient on the target side only


def barlow_numpy(a: np.ndarray, b: np.ndarray, lambd: float) -> float:
    """The paper's definition: C_ij = Σ_b a_bi b_bj / (sqrt(Σ_b a_bi²) sqrt(Σ_b b_bj²)), columns centred."""
    a, b = a - a.mean(0), b - b.mean(0)
    c = (a.T @ b) / np.outer(np.sqrt((a**2).sum(0)), np.sqrt((b**2).sum(0)))
    off = c[~np.eye(len(c), dtype=bool)]
    return float(((1 - np.diag(c)) ** 2).sum() + lambd * (off**2).sum())


def test_barlow_twins_loss_matches_the_normalised_cross_correlation():
    torch.manual_seed(1)
    z1, z2 = torch.randn(16, 6, dtype=torch.float64) * 3 + 1, torch.randn(16, 6, dtype=torch.float64)
    z2 = z2 + 0.8 * z1  # correlated views, so the diagonal is not near zero
    got = barlow_twins_loss(z1, z2, lambd=0.3).item()
    assert got == pytest.approx(barlow_numpy(z1.numpy(), z2.numpy(), 0.3), rel=1e-5)
    # identical, already decorrelated views (orthonormal centred columns): C = I and the loss vanishes
    raw = torch.randn(16, 4, dtype=torch.float64)
    white, _ = torch.linalg.qr(raw - raw.mean(0))
    assert barlow_twins_loss(white, white, lambd=1.0).item() == pytest.approx(0.0, abs=1e-4)


def vicreg_numpy(a, b, lam, mu, nu, gamma=1.0, eps=1e-4, views_averaged=True):
    """The paper's Eq. (6) sums the two views' variance hinges; the official code averages them."""
    n, d = a.shape
    inv = ((a - b) ** 2).mean()

    def var(z):
        return np.maximum(0, gamma - np.sqrt(z.var(0, ddof=1) + eps)).mean()

    def cov(z):
        c = np.cov(z, rowvar=False)  # unbiased, as the paper's C(Z)
        return (c[~np.eye(d, dtype=bool)] ** 2).sum() / d

    variance = (var(a) + var(b)) / (2 if views_averaged else 1)
    return lam * inv + mu * variance + nu * (cov(a) + cov(b)), (inv, variance, cov(a) + cov(b))


def test_vicreg_loss_and_terms_match_numpy():
    torch.manual_seed(2)
    z1 = torch.randn(12, 5, dtype=torch.float64) * torch.tensor(
        [0.2, 0.5, 1.0, 2.0, 0.1], dtype=torch.float64
    )
    z2 = z1 + 0.3 * torch.randn(12, 5, dtype=torch.float64)
    for reduction, averaged in [("official", True), ("paper", False)]:
        loss, terms = vicreg_loss(z1, z2, 25.0, 20.0, 3.0, variance_reduction=reduction)
        want, (inv, var, cov) = vicreg_numpy(z1.numpy(), z2.numpy(), 25.0, 20.0, 3.0, views_averaged=averaged)
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert terms["invariance"].item() == pytest.approx(inv, rel=1e-5)
        assert terms["variance"].item() == pytest.approx(var, rel=1e-5) and var > 0  # some stds are below 1
        assert terms["covariance"].item() == pytest.approx(cov, rel=1e-5)


def sinkhorn_numpy(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """SwAV's Algorithm: Q = exp(S/ε)ᵀ scaled to total 1, then rows (prototypes) to 1/K, columns to 1/B."""
    q = np.exp(scores / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_knopp_matches_numpy_and_converges_to_the_entropic_transport_plan():
    torch.manual_seed(3)
    scores = torch.nn.functional.normalize(torch.randn(20, 5, dtype=torch.float64), dim=1)
    scores = (
        scores @ torch.nn.functional.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1).T
    )  # B=20, K=4
    for iterations in (1, 3):
        got = sinkhorn_knopp(scores, 0.3, iterations).double().numpy()
        assert np.allclose(got, sinkhorn_numpy(scores.numpy(), 0.3, iterations), rtol=1e-5)
        assert np.allclose(got.sum(1), 1.0, atol=1e-6)  # each sample's code is a distribution
    q = sinkhorn_knopp(scores, 0.3, 200).double().numpy()
    # the closed form of  max Tr(QᵀS) + εH(Q)  s.t. Q1 = 1, Qᵀ1 = B/K:  Q = diag(u) exp(S/ε) diag(v) with
    # those marginals, i.e. log Q - S/ε is a row term plus a column term (its double-centred part is 0)
    assert np.allclose(q.sum(0), 20 / 4, rtol=1e-4) and np.allclose(q.sum(1), 1.0, atol=1e-6)
    residual = np.log(q) - scores.numpy() / 0.3
    residual = residual - residual.mean(0, keepdims=True) - residual.mean(1, keepdims=True) + residual.mean()
    assert np.abs(residual).max() < 1e-4
    # equal partition even where the scores all favour one prototype: no collapse
    skewed = scores.clone()
    skewed[:, 0] += 0.5
    assert np.allclose(sinkhorn_knopp(skewed, 0.3, 200).double().numpy().sum(0), 5.0, rtol=1e-3)


def test_sinkhorn_is_stable_for_small_epsilon():
    scores = torch.tensor([[1.0, -1.0], [0.9, 0.8], [-1.0, 1.0]])
    q = sinkhorn_knopp(scores, epsilon=0.005, iterations=3)  # exp(200) would overflow without the shift
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(3))


def test_assign_codes_uses_the_queue_rows_for_the_partition_only():
    torch.manual_seed(4)
    batch, queue = torch.randn(6, 3), torch.randn(10, 3)
    codes = assign_codes(batch, queue, epsilon=0.5, iterations=3)
    assert torch.allclose(codes, sinkhorn_knopp(torch.cat([queue, batch]), 0.5, 3)[-6:])
    assert not torch.allclose(codes, assign_codes(batch, None, 0.5, 3))


def test_swapped_prediction_loss_matches_numpy():
    torch.manual_seed(5)
    scores = [torch.randn(4, 6, dtype=torch.float64) for _ in range(4)]  # 2 code views + 2 local crops
    codes = [torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1) for _ in range(2)]
    got = swapped_prediction_loss(scores, codes, temperature=0.2).item()
    terms = []
    for a, q in enumerate(codes):
        per_view = [
            -(q.numpy() * _np_log_softmax(s.numpy() / 0.2)).sum(1).mean()
            for v, s in enumerate(scores)
            if v != a
        ]
        terms.append(np.mean(per_view))
    assert got == pytest.approx(np.mean(terms), rel=1e-5)


def test_feature_queue_is_fifo_newest_first_counts_its_rows_and_lives_in_state_dict():
    queue = FeatureQueue(views=2, size=5, dim=3)
    assert set(queue.state_dict()) == {"features", "filled"} and not queue.full
    pushes = [[torch.full((2, 3), float(10 * v + step)) for v in range(2)] for step in range(3)]
    for step, embeddings in enumerate(pushes):
        queue.push(embeddings)
        assert int(queue.filled) == min(2 * (step + 1), 5)
    assert queue.full
    for v in range(2):  # newest first: step 2 (2 rows), step 1 (2 rows), one row of step 0
        assert queue.features[v, :, 0].tolist() == [10 * v + s for s in (2, 2, 1, 1, 0)]
    assert torch.equal(queue.local_rows(1), queue.features[1])  # one process holds every row


def test_new_view_recipes_and_head_without_output_bias():
    from lightning_gen.data.views import Views, ViewsConfig, resolve
    from lightning_gen.nets.heads import MLPHead

    byol, _ = resolve(ViewsConfig(recipe="byol"), 32)
    assert byol.blur_p == [1.0, 0.1] and byol.solarize_p == [0.0, 0.2] and byol.jitter == (0.4, 0.4, 0.2, 0.1)
    images = (torch.rand(3, 3, 32, 32) * 255).to(torch.uint8)
    swav = Views(ViewsConfig(recipe="swav"), (0.5,) * 3, (0.25,) * 3, 32)(images)
    assert len(swav) == 2 + 6 and swav[0].shape == (3, 3, 32, 32) and swav[-1].shape == (3, 3, 16, 16)
    head = MLPHead(8, 16, 4, layers=3, last_bias=False)
    assert head.net[-1].bias is None and MLPHead(8, 16, 4, layers=3).net[-1].bias is not None
