"""The first optimizer update of VICReg, Barlow Twins, SwAV and BYOL equals the official code's.

Each test builds the method from its shipped config (``conf/method/<m>.yaml``, only the network made
tiny: a narrow ResNet-18 on 16 px images, small heads), takes one step on a fixed batch, and compares
every parameter's update with the one the official code's formulas give (``tests/official.py``): its
loss reduction, its parameter groups (which parameters are decayed, which LARS/LARC-adapted, which
learning rate each group gets), its learning-rate scaling with the batch. The networks themselves are
the same modules on both sides (a deep copy taken before the step); the heads' architecture has its
own tests (tests/test_parity.py). Both sides skip the warm-up (the official schedules start at lr 0,
which would make every first update zero), and run on one process: the cross-rank gradient scale is
tests/test_ssl_distributed.py's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_gen import registry
from lightning_gen.config import compose, section_object
from lightning_gen.methods.base import DataInfo
from tests import official

BATCH = 16
INFO = DataInfo(name="digits", channels=1, image_size=16, num_classes=10, batch_size=BATCH)
TINY = [
    "data=digits",
    "method.backbone.name=resnet18",
    "method.backbone.resnet_width=8",
    "method.online_probe=false",
    "method.warmup_epochs=0",
]


def build(method: str, *overrides: str):
    torch.manual_seed(0)
    cfg = compose([f"method={method}", *TINY, *overrides])
    model = registry.build("method", section_object(cfg.method), data=INFO)
    return model.double().train()  # float64: updates of 1e-6 compare exactly, not at float32's resolution


def fixed_views(*sizes: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 1, s, s, generator=g, dtype=torch.float64) for s in sizes]


def project_step(model, views) -> None:
    """What a training step does with the gradient: the method's loss, its own optimizer, one step
    (at step 0 without warm-up the schedule's factor is 1: every group runs at its base lr)."""
    optimizer = model.configure_optimizers()
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss, _ = model.ssl_loss(views, {"index": torch.arange(BATCH), "label": torch.zeros(BATCH)})
    loss.backward()
    optimizer.step()


def assert_same_updates(model, before, expected, names) -> None:
    """Every trained parameter moved by the official update, within float64 round-off."""
    moved = 0
    for name, p in model.named_parameters():
        if name not in names:
            continue
        want = expected[names.index(name)] - before[name]
        got = p.detach() - before[name]
        scale = want.abs().max().item()
        moved += scale > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale + 1e-15, msg=name)
    assert moved > len(names) // 2  # most parameters take a nonzero step: the comparison has teeth


def trained(model) -> list[str]:
    frozen = model.frozen_module_names()
    return [n for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in frozen]


def test_vicreg_first_update_is_main_vicreg_py():
    model = build("vicreg", "method.proj_hidden_dim=32", "method.proj_dim=32")
    twin, views = copy.deepcopy(model), fixed_views(16, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    project_step(model, views)

    names = trained(twin)
    x = twin.projector(twin.backbone(views[0]))
    y = twin.projector(twin.backbone(views[1]))
    official.vicreg_loss(x, y).backward()
    params = [dict(twin.named_parameters())[n] for n in names]
    lr = 0.2 * BATCH / 256  # --base-lr 0.2, lr = base_lr x batch_size / 256
    expected = official.lars_first_step(
        params, [lr] * len(params), 1e-6, exclude=[p.ndim == 1 for p in params]
    )
    assert_same_updates(model, before, expected, names)


def test_barlow_twins_first_update_is_main_py():
    model = build("barlow_twins", "method.proj_hidden_dim=32", "method.proj_dim=32")
    twin, views = copy.deepcopy(model), fixed_views(16, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    project_step(model, views)

    names = trained(twin)
    z1 = twin.projector(twin.backbone(views[0]))
    z2 = twin.projector(twin.backbone(views[1]))
    official.barlow_twins_loss(z1, z2, lambd=0.0051).backward()
    params = [dict(twin.named_parameters())[n] for n in names]
    # two groups: weights at 0.2 x B/256, biases and BN (ndim == 1) at 0.0048 x B/256, the latter
    # neither decayed nor adapted; --weight-decay 1e-6
    lrs = [(0.0048 if p.ndim == 1 else 0.2) * BATCH / 256 for p in params]
    expected = official.lars_first_step(params, lrs, 1e-6, exclude=[p.ndim == 1 for p in params])
    assert_same_updates(model, before, expected, names)


def test_swav_first_update_is_main_swav_py():
    model = build(
        "swav",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
        "method.num_prototypes=12",
        "method.freeze_prototypes_epochs=0",  # let the prototypes move too (the script: 5005 iterations)
    )
    model.normalize_prototypes()  # unit rows in float64, as both codes start every step
    twin, views = copy.deepcopy(model), fixed_views(16, 16, 8, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    project_step(model, views)

    names = trained(twin)
    with torch.no_grad():  # main_swav.py normalises the prototypes before every forward
        twin.prototypes.weight.copy_(F.normalize(twin.prototypes.weight, dim=1))
    features = twin.backbone(torch.cat(views[:2])), twin.backbone(torch.cat(views[2:]))
    z = F.normalize(twin.projector(torch.cat(features)), dim=1)  # one projection head over every crop
    scores = list(twin.prototypes(z).chunk(4))
    official.swav_loss(scores, temperature=0.1, epsilon=0.05).backward()
    params = [dict(twin.named_parameters())[n] for n in names]
    expected = official.larc_sgd_first_step(params, 0.6 * BATCH / 256, 1e-6)
    assert_same_updates(model, before, expected, names)
    assert "prototypes.weight" in names


def test_byol_first_update_is_byol_experiment_py():
    model = build("byol", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32")
    twin, views = copy.deepcopy(model), fixed_views(16, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    project_step(model, views)

    names = trained(twin)
    p1 = twin.predictor(twin.projector(twin.backbone(views[0])))
    p2 = twin.predictor(twin.projector(twin.backbone(views[1])))
    with torch.no_grad():
        t1 = twin.target_projector(twin.target_backbone(views[0]))
        t2 = twin.target_projector(twin.target_backbone(views[1]))
    official.byol_loss(p1, p2, t1, t2).backward()
    params = [dict(twin.named_parameters())[n] for n in names]
    # optimizers.exclude_bias_and_norm: biases ('b') and normalisation parameters: the 1-D ones here
    expected = official.lars_first_step(
        params, [0.2 * BATCH / 256] * len(params), 1.5e-6, exclude=[p.ndim == 1 for p in params]
    )
    assert_same_updates(model, before, expected, names)


@pytest.mark.parametrize("method", ["vicreg", "barlow_twins", "byol"])
def test_lars_exclusion_is_what_the_official_filters_exclude(method):
    """ndim == 1 (the official filters) and the project's rule (ndim <= 1 or a name ending in .bias)
    pick the same parameters in these networks, so the group comparison above is the rule itself."""
    model = build(method, "method.proj_hidden_dim=32", "method.proj_dim=16")
    groups = model.configure_optimizers().param_groups
    excluded = {id(p) for g in groups if g.get("exclude_lars") for p in g["params"]}
    for name in trained(model):
        p = dict(model.named_parameters())[name]
        assert (id(p) in excluded) == (p.ndim == 1), name
