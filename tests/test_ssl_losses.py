"""SSL losses, heads, views and schedules against closed forms and independent numpy/scipy computations."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_gen.data import views as V
from lightning_gen.losses.contrastive import KeyQueue, info_nce, moco_loss, nt_xent
from lightning_gen.losses.dino import DINOLoss


def _np_log_softmax(a, axis=-1):
    a = a - a.max(axis=axis, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=axis, keepdims=True))


def simclr_algorithm1(z: np.ndarray, tau: float) -> float:
    """SimCLR's Algorithm 1 literally: rows 2k and 2k+1 are the two views of sample k."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T
    n2 = len(z)

    def ell(i, j):
        denom = sum(math.exp(s[i, k] / tau) for k in range(n2) if k != i)
        return -math.log(math.exp(s[i, j] / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


def test_nt_xent_equals_simclr_algorithm_1():
    torch.manual_seed(0)
    n, d, tau = 6, 5, 0.3
    v1, v2 = torch.randn(n, d), torch.randn(n, d)
    interleaved = torch.stack([v1, v2], 1).reshape(2 * n, d).double().numpy()
    # Our layout: views concatenated, positives found by index.
    loss = nt_xent(torch.cat([v1, v2]), torch.arange(n).repeat(2), tau)
    assert loss.item() == pytest.approx(simclr_algorithm1(interleaved, tau), rel=1e-5)


def test_nt_xent_multiple_positives_is_supervised_contrastive():
    """Labels as index: SupCon's L_out averaged over anchors (independent numpy loop)."""
    torch.manual_seed(1)
    z, labels, tau = torch.randn(10, 4), torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2, 9]), 0.5
    loss = nt_xent(z, labels, tau).item()
    zn = F.normalize(z, dim=1).double().numpy()
    s = zn @ zn.T / tau
    y = labels.numpy()
    per_anchor = []
    for i in range(len(y)):
        positives = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not positives:  # label 3 and 9 have no partner: skipped
            continue
        log_denom = np.log(sum(np.exp(s[i, k]) for k in range(len(y)) if k != i))
        per_anchor.append(-np.mean([s[i, p] - log_denom for p in positives]))
    assert loss == pytest.approx(np.mean(per_anchor), rel=1e-5)


def test_moco_loss_matches_numpy_and_normalises():
    torch.manual_seed(2)
    q, k, queue, t = torch.randn(4, 3) * 5, torch.randn(4, 3) * 3, F.normalize(torch.randn(7, 3), dim=1), 0.07
    loss, logits = moco_loss(q, k, queue, t)
    qn, kn = F.normalize(q, dim=1).numpy(), F.normalize(k, dim=1).numpy()
    table = np.concatenate([(qn * kn).sum(1, keepdims=True), qn @ queue.numpy().T], 1) / t
    assert loss.item() == pytest.approx(-_np_log_softmax(table)[:, 0].mean(), rel=1e-5)
    assert logits.shape == (4, 8)


def test_info_nce_matches_numpy_with_own_key_positive():
    torch.manual_seed(3)
    q, k, t = torch.randn(5, 4), torch.randn(5, 4), 0.5
    table = q.numpy() @ k.numpy().T / t
    assert info_nce(q, k, t).item() == pytest.approx(-np.diag(_np_log_softmax(table)).mean(), rel=1e-5)


def test_key_queue_fifo_wraps_and_lives_in_state_dict():
    queue = KeyQueue(5, 2)
    assert set(queue.state_dict()) == {"keys", "ptr"}
    batches = [F.normalize(torch.randn(3, 2), dim=1) for _ in range(3)]
    for b in batches:
        queue.enqueue(b)
    written = torch.cat(batches)  # 9 keys into 5 slots: slots hold keys 5..8 then 4
    expected = torch.stack([written[i] for i in (5, 6, 7, 8, 4)])
    assert torch.allclose(queue.keys, expected) and int(queue.ptr) == 9 % 5


def test_dino_loss_and_center_match_numpy():
    torch.manual_seed(3)
    loss_fn = DINOLoss(out_dim=6, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 6))
    student = [torch.randn(4, 6) for _ in range(4)]  # 2 global + 2 local views
    teacher = [torch.randn(4, 6) for _ in range(2)]
    tau_t = 0.05
    got = loss_fn(student, teacher, tau_t).item()
    c = loss_fn.center.clone().numpy()
    terms = []
    for ti, t in enumerate(teacher):
        p_t = np.exp(_np_log_softmax((t.numpy() - c) / tau_t))
        for si, s in enumerate(student):
            if si != ti:
                terms.append(-(p_t * _np_log_softmax(s.numpy() / 0.1)).sum(1).mean())
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    loss_fn.update_center(teacher)
    expected = 0.9 * c + 0.1 * torch.cat(teacher).numpy().mean(0, keepdims=True)
    assert np.allclose(loss_fn.center.numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------ views


def test_full_crop_with_flip_is_exact_mirror():
    x = torch.rand(3, 3, 8, 8)
    out = V.random_resized_crop(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(out, x.flip(-1), atol=1e-5)
    assert torch.allclose(V.random_resized_crop(x, 8, (1.0, 1.0), (1.0, 1.0), 0.0), x, atol=1e-5)


def test_crop_parameters_are_per_sample():
    x = torch.rand(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    out = V.random_resized_crop(x, 16, scale=(0.1, 0.5), ratio=(0.75, 1.33))
    assert out.shape == (8, 3, 16, 16)
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) == 8


def test_grayscale_and_hsv_roundtrip_match_colorsys():
    x = torch.rand(2, 3, 4, 4)
    gray = V.grayscale(x)
    assert torch.allclose(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)
    hsv = V.rgb_to_hsv(x)
    r, g, b = x[1, :, 2, 3].tolist()
    assert hsv[1, :, 2, 3].tolist() == pytest.approx(list(colorsys.rgb_to_hsv(r, g, b)), abs=1e-5)
    assert torch.allclose(V.hsv_to_rgb(hsv), x, atol=1e-5)


def test_gaussian_blur_per_sample_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    sigmas = torch.tensor([0.7, 1.5], dtype=torch.float64)
    out = V.gaussian_blur(x, sigmas, kernel_size=7)
    for i, s in enumerate(sigmas.tolist()):
        # torch 'reflect' padding is scipy's 'mirror'; truncate so both use a 7-tap kernel.
        ref = gaussian_filter(x[i, 0].numpy(), s, mode="mirror", truncate=3 / s)
        assert np.allclose(out[i, 0].numpy(), ref, atol=1e-10)


def test_color_jitter_brightness_only_scales_pixels():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 5, 5) * 0.5
    out = V.color_jitter(x, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    ratio = out / x
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-5)  # one factor each
    assert ((per_sample[:, 0] >= 0.6 - 1e-6) & (per_sample[:, 0] <= 1.4 + 1e-6)).all()


def test_views_recipes_shapes_and_standardisation():
    from lightning_gen.data.views import Views, ViewsConfig

    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    dino = Views(ViewsConfig(recipe="dino"), (0.5,) * 3, (0.25,) * 3, 32)
    out = dino(images)
    assert len(out) == 2 + 6 and out[0].shape == (4, 3, 32, 32) and out[-1].shape == (4, 3, 16, 16)
    ident = Views(ViewsConfig(recipe="none"), (0.5,) * 3, (0.25,) * 3, 32)(images)
    assert torch.allclose(ident[0], (images.float() / 255 - 0.5) / 0.25, atol=1e-4)


# ------------------------------------------------------------------------------ optimisation pieces


def test_simclr_lars_excludes_bias_and_norm_and_scales_lr_by_global_batch():
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.ssl.simclr import SimCLR, SimCLRConfig
    from lightning_gen.nets.backbones import BackboneConfig
    from lightning_gen.optim import LARS

    cfg = SimCLRConfig(
        name="simclr", backbone=BackboneConfig(name="resnet18"), proj_hidden_dim=32, proj_dim=8
    )
    method = SimCLR(cfg, DataInfo(channels=3, image_size=16, batch_size=64))
    groups = method.configure_optimizers().param_groups
    assert isinstance(method.configure_optimizers(), LARS)
    excluded = {id(p) for g in groups if g.get("exclude_lars") for p in g["params"]}
    for name, p in method.named_parameters():
        if name.startswith("online_probe"):
            continue
        is_bias_or_norm = p.ndim == 1
        assert (id(p) in excluded) == is_bias_or_norm, name
    for g in groups:
        if g.get("exclude_lars"):
            assert g["weight_decay"] == 0.0
    assert method.scaled_lr() == pytest.approx(0.3 * 64 / 256)  # 1 process here; DDP test covers world size


def test_excluded_group_takes_plain_sgd_step():
    from lightning_gen.optim import LARS

    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "exclude_lars": True}],
        lr=0.5,
        momentum=0.9,
    )
    w.grad, b.grad = torch.full((3, 3), 2.0), torch.full((3,), 2.0)
    opt.step()
    assert torch.allclose(b, torch.full((3,), 1 - 0.5 * 2.0))  # no trust ratio
    g = torch.full((3, 3), 2.0) + 0.1
    trust = 0.001 * 3.0 / g.norm()
    assert torch.allclose(w, 1 - 0.5 * trust * g, atol=1e-6)


def test_dino_head_last_layer_has_unit_norm_rows():
    from lightning_gen.nets.heads import DINOHead, MLPHead

    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    weight = head.last_layer.weight
    assert torch.allclose(weight.norm(dim=1), torch.ones(32), atol=1e-5)
    assert head(torch.randn(5, 16)).shape == (5, 32)
    proj = MLPHead(16, 24, 8, layers=3, last_bn=True)
    assert proj(torch.randn(5, 16)).shape == (5, 8)
    assert [type(m).__name__ for m in proj.net][-1] == "BatchNorm1d"
