"""The published SSL recipes follow the authors' code: one test per difference found by reading it.

Each test names the official file it checks against and fails on the code before the fix. Values
from the official repositories are written here as numbers (with their source); formulas live in
``tests/official.py``. The parity tables of ``docs/methods/*.md`` are checked at the end: every key
of a method's ``conf/method/*.yaml`` has its row.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_gen import registry, schedules
from lightning_gen.config import compose, section_object
from lightning_gen.data.views import resolve
from lightning_gen.losses.noncontrastive import barlow_twins_loss, vicreg_loss
from lightning_gen.methods.base import DataInfo
from tests import official
from tests.test_parity_updates import build, fixed_views

ROOT = Path(__file__).resolve().parents[1]
DIGITS = DataInfo(name="digits", channels=1, image_size=16, num_classes=10, batch_size=16)


def method_of(args: list[str], info: DataInfo = DIGITS):
    cfg = compose(args)
    torch.manual_seed(0)
    return registry.build("method", section_object(cfg.method), data=info), cfg


def embeddings(n=32, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 2.0, d, dtype=torch.float64
    )
    return z1, z1 + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)


def global_crop(views, image_size: int):
    """The resolved settings of the global crops of a config's ``views`` section."""
    return resolve(OmegaConf.to_object(views), image_size)[0]


def param_groups(model) -> list[dict]:
    return model.configure_optimizers().param_groups


# ------------------------------------------------------------------------------------ VICReg, Barlow Twins


def test_vicreg_loss_by_default_and_the_shipped_recipe_are_main_vicreg_py():
    z1, z2 = embeddings()
    assert vicreg_loss(z1, z2)[0].item() == pytest.approx(official.vicreg_loss(z1, z2).item(), rel=1e-10)
    paper = vicreg_loss(z1, z2, variance_reduction="paper")[0].item()
    assert paper > official.vicreg_loss(z1, z2).item() + 1e-3  # the paper's sum weighs the hinges twice

    model = build("vicreg", "method.proj_hidden_dim=16", "method.proj_dim=12")  # conf/method/vicreg.yaml
    assert model.cfg.variance_reduction == "official"
    views = fixed_views(16, 16)
    loss, _ = model.ssl_loss(views, {})
    x = model.projector(model.backbone(views[0]))  # the same embeddings (training-mode BatchNorm)
    y = model.projector(model.backbone(views[1]))
    assert loss.item() == pytest.approx(official.vicreg_loss(x, y).item(), rel=1e-10)


def test_barlow_twins_defaults_are_main_py():
    z1, z2 = embeddings(seed=1)
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(
        official.barlow_twins_loss(z1, z2, 0.0051).item()
    )
    cfg = compose(["method=barlow_twins", "data=digits"]).method
    # main.py: --lambd 0.0051, --weight-decay 1e-6, --learning-rate-weights 0.2, --learning-rate-biases 0.0048
    assert (cfg.lambd, cfg.weight_decay, cfg.lr, cfg.bias_lr) == (0.0051, 1e-6, 0.2, 0.0048)
    assert cfg.grad_scale == "official"  # the 1 / world_size step: tests/test_ssl_distributed.py


# ------------------------------------------------------------------------------------ MoCo


def mocov3_sincos(grid: int, dim: int) -> torch.Tensor:
    """moco-v3 vits.py build_2d_sincos_position_embedding (l. 53-69), written out again."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def test_moco_v3_vit_recipe_is_vits_py_and_the_vit_small_command():
    args = ["experiment=moco_v3_vit_imagenet", "method.backbone.depth=1", "method.backbone.width=48"]
    model, cfg = method_of(args, DataInfo(name="folder", channels=3, image_size=64, batch_size=8))
    vit = model.backbone
    assert cfg.method.backbone.heads == 12  # vit_small(num_heads=12)
    torch.testing.assert_close(vit.pos_embed.detach(), mocov3_sincos(4, 48))  # fixed 2-D sine-cosine
    assert not vit.pos_embed.requires_grad
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 48))  # U(±sqrt(6 / (3 p² + D)))
    weight = vit.patch_embed.weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform, not PyTorch's
    assert torch.all(vit.patch_embed.bias == 0) and not weight.requires_grad  # --stop-grad-conv1
    assert vit.cls_token.std().item() < 1e-5  # normal(std=1e-6)
    assert all(m.eps == 1e-6 for m in vit.modules() if isinstance(m, torch.nn.LayerNorm))
    end = list(model.predictor.net)[-1]
    assert isinstance(end, torch.nn.BatchNorm1d) and not end.affine  # MoCo_ViT's predictor: last_bn=True
    groups = param_groups(model)  # torch.optim.AdamW(model.parameters(), weight_decay=.1)
    assert all(g["weight_decay"] == 0.1 for g in groups if not g.get("fixed_lr"))
    assert global_crop(cfg.method.views, 224).scale == (0.08, 1.0)  # no --crop-min in the ViT commands


def test_moco_v3_resnet_recipe_is_one_official_command():
    """CONFIG.md's 100-epoch ResNet-50 command: main_moco.py's defaults + --moco-m-cos --crop-min=.2."""
    for args in (["method=moco_v3", "data=folder"], ["experiment=moco_v3_imagenet"]):
        cfg = compose(args)
        m = cfg.method
        assert (m.lr, m.weight_decay, m.temperature, m.warmup_epochs) == (0.6, 1e-6, 1.0, 10)
        assert (m.momentum_start, m.momentum_end, m.proj_dim, m.proj_hidden_dim) == (0.99, 1.0, 256, 4096)
        assert global_crop(m.views, 224).scale == (0.2, 1.0)
    assert cfg.trainer.max_epochs == 100


def test_moco_v3_resnet_predictor_has_no_bias():
    model = build("moco_v3", "method.proj_hidden_dim=16", "method.proj_dim=8", "method.pred_hidden_dim=16")
    assert all(m.bias is None for m in model.predictor.modules() if isinstance(m, torch.nn.Linear))
    assert isinstance(list(model.predictor.net)[-1], torch.nn.Linear)  # MoCo_ResNet: last_bn=False


@pytest.mark.parametrize("version", ["moco_v1", "moco_v2"])
def test_moco_v1_v2_decay_every_parameter_of_a_torchvision_resnet(version):
    """main_moco.py: SGD(model.parameters(), weight_decay=1e-4) over models.resnet50(num_classes=128)."""
    model = build(version, "method.proj_hidden_dim=16", "method.queue_size=32")
    assert all(g["weight_decay"] == 1e-4 for g in param_groups(model))
    residual_bns = [m.bn2.weight for m in model.backbone.modules() if hasattr(m, "bn2")]
    assert residual_bns and all(torch.all(w == 1) for w in residual_bns)  # zero_init_residual=False


def test_moco_v1_steps_the_learning_rate_at_epochs_120_and_160_of_200():
    model = build("moco_v1", "method.queue_size=32")
    factors = [model.lr_factor(schedules.Progress(e, 200, 1)) for e in (0, 119, 120, 159, 160, 199)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


DEMO_CLAIM = re.compile(r"(following|as) the MoCo authors' CIFAR-10 demo")


def test_experiments_that_claim_the_moco_cifar10_demo_are_the_demo():
    """facebookresearch/moco colab/moco_cifar10_demo.ipynb (colab-notebook branch), its arguments."""
    claiming = [p.stem for p in (ROOT / "conf/experiment").glob("*.yaml") if DEMO_CLAIM.search(p.read_text())]
    assert claiming == ["moco_v1_cifar10"]
    cfg = compose(["experiment=moco_v1_cifar10"])
    m = cfg.method
    assert m.version == "v1" and m.proj_dim == 128  # resnet18(num_classes=128): a linear 128-d head
    assert m.backbone.name == "resnet18" and m.backbone.cifar_stem and not m.backbone.zero_init_residual
    assert (m.temperature, m.queue_size, m.momentum_start, m.momentum_end, m.bn_splits) == (
        0.1,
        4096,
        0.99,
        0.99,
        8,
    )
    assert m.optimizer == "sgd" and m.lr * cfg.data.batch_size / 256 == pytest.approx(0.06)
    assert (m.weight_decay, m.exclude_bias_norm, m.schedule, cfg.data.batch_size) == (
        5e-4,
        False,
        "cosine",
        512,
    )
    assert cfg.trainer.max_epochs == 200
    crop = global_crop(m.views, 32)  # RandomResizedCrop(32), flip, jitter (.4, .4, .4, .1) p .8, gray .2
    assert (crop.scale, crop.flip_p, crop.jitter, crop.jitter_p, crop.grayscale_p) == (
        (0.08, 1.0),
        0.5,
        (0.4, 0.4, 0.4, 0.1),
        0.8,
        0.2,
    )
    assert max(crop.blur_p) == 0 and max(crop.solarize_p) == 0


# ------------------------------------------------------------------------------------ SwAV, SimSiam


def test_swav_larc_decays_and_adapts_every_parameter_of_a_resnet_without_zero_init():
    """main_swav.py: LARC(SGD(model.parameters(), weight_decay=1e-6), 0.001, clip=False); src/resnet50.py."""
    from lightning_gen.optim import LARC

    model = build("swav", "method.proj_hidden_dim=16", "method.proj_dim=8", "method.num_prototypes=6")
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, LARC)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trained)
    assert all(g["weight_decay"] == 1e-6 and not g["exclude_lars"] for g in optimizer.param_groups)
    residual_bns = [m.bn2.weight for m in model.backbone.modules() if hasattr(m, "bn2")]
    assert residual_bns and all(torch.all(w == 1) for w in residual_bns)


def test_larc_is_apex_larc_over_sgd():
    from lightning_gen.optim import LARC

    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    zero = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # a zero-initialised bias: plain SGD
    w.grad, zero.grad = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
    expected = official.larc_sgd_first_step([w, zero], lr=0.5, weight_decay=0.1)
    LARC([w, zero], lr=0.5, weight_decay=0.1).step()
    torch.testing.assert_close(w.detach(), expected[0])
    torch.testing.assert_close(zero.detach(), expected[1])  # -lr x g, no trust ratio, no decay


def test_simsiam_decays_every_parameter():
    """main_simsiam.py: SGD(optim_params, weight_decay=1e-4) over the encoder and the predictor."""
    model = build("simsiam", "method.proj_hidden_dim=16", "method.proj_dim=16", "method.pred_hidden_dim=8")
    groups = param_groups(model)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


# ------------------------------------------------------------------------------------ BYOL, SimCLR


def test_byol_heads_end_in_a_linear_layer_without_bias():
    """byol/utils/networks.py MLP: hk.Linear(output_size, with_bias=False) after BN and ReLU."""
    model = build("byol", "method.proj_hidden_dim=16", "method.proj_dim=8", "method.pred_hidden_dim=16")
    for head in (model.projector, model.predictor, model.target_projector):
        last = list(head.net)[-1]
        assert isinstance(last, torch.nn.Linear) and last.bias is None


def test_simclr_loss_of_the_shipped_recipe_is_objective_py():
    model = build("simclr", "method.proj_hidden_dim=16", "method.proj_dim=8")
    views = fixed_views(16, 16)
    loss, _ = model.ssl_loss(views, {"index": torch.arange(16), "label": torch.zeros(16)})
    z = model.projector(model.backbone(torch.cat(views)))  # the two views in one forward, as run.py
    assert loss.item() == pytest.approx(official.simclr_loss(z[:16], z[16:], 0.1).item(), rel=1e-10)


def test_simclr_projection_ends_in_batchnorm_with_scale_and_no_shift():
    """google-research/simclr model_util.projection_head: linear_layer(..., use_bias=False, use_bn=True)
    ends in batch_norm_relu(relu=False, center=False): a scale γ, no β, no ReLU."""
    model = build("simclr", "method.proj_hidden_dim=16", "method.proj_dim=8")
    last = list(model.projector.net)[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and last.weight is not None and last.bias is None
    assert all(m.bias is None for m in model.projector.modules() if isinstance(m, torch.nn.Linear))
    z = model.projector(torch.randn(16, model.feature_dim, dtype=torch.float64))
    torch.testing.assert_close(z.mean(0), torch.zeros_like(z[0]), atol=1e-8, rtol=0)  # no shift after the BN


# ------------------------------------------------------------------------------------ DINO


def test_dino_student_drops_paths_and_the_teacher_does_not():
    """main_dino.py: vits.__dict__[arch](drop_path_rate=0.1) for the student, the teacher without; the
    rate rises linearly over the blocks (vision_transformer.py's stochastic depth decay rule)."""
    tiny = ["method.backbone.patch_size=4", "method.backbone.depth=3", "method.backbone.width=16"]
    tiny += ["method.backbone.heads=2", "method.out_dim=8", "method.hidden_dim=8", "method.bottleneck_dim=4"]
    model, cfg = method_of(["method=dino", "data=digits", *tiny])
    assert cfg.method.backbone.drop_path == 0.1
    rates = [block.drop_path.p for block in model.backbone.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])
    assert all(block.drop_path.p == 0 for block in model.teacher_backbone.blocks)
    model.train()
    x = torch.randn(64, 1, 16, 16)
    assert not torch.allclose(model.backbone(x), model.backbone(x))  # some samples skip a branch
    torch.testing.assert_close(model.teacher_backbone(x), model.teacher_backbone(x))


def test_dino_config_and_dataclass_are_main_dino_py_defaults():
    """main_dino.py: --warmup_teacher_temp 0.04 --teacher_temp 0.04 --warmup_teacher_temp_epochs 0."""
    from lightning_gen.methods.ssl.dino import DINOConfig

    shipped, default = compose(["method=dino", "data=digits"]).method, DINOConfig()
    for key, value in {
        "teacher_temp_start": 0.04,
        "teacher_temp": 0.04,
        "teacher_temp_warmup_epochs": 0,
    }.items():
        assert shipped[key] == getattr(default, key) == value, key
    imagenet = compose(["experiment=dino_imagenet"])  # the README's 100-epoch vanilla ViT-S/16 command
    assert imagenet.trainer.max_epochs == 100 and imagenet.data.batch_size == 64
    assert imagenet.method.teacher_temp == imagenet.method.teacher_temp_start == 0.04


# ------------------------------------------------------------------------------------ MAE, CPC


def test_mae_crops_and_flips_its_training_images_and_probes_the_cls_token():
    """mae main_pretrain.py: RandomResizedCrop(scale=(0.2, 1.0)) + RandomHorizontalFlip before masking;
    main_linprobe.py --cls_token; models_mae.py: Xavier linears, the patch projection as a linear map."""
    tiny = ["method.backbone.depth=1", "method.backbone.width=32", "method.backbone.heads=2"]
    model, cfg = method_of(["method=mae", "data=digits", *tiny, "method.online_probe=false"])
    assert tuple(cfg.method.crop_scale) == (0.2, 1.0) and cfg.method.flip_p == 0.5
    assert cfg.method.embed_pool == "cls"
    seen = []
    model.forward_mae = lambda x: (
        seen.append(x) or (torch.zeros(len(x), 16, 16), torch.ones(len(x), 16), None)
    )
    x = torch.randn(4, 1, 16, 16)
    model.pretext_loss(x, "val")
    model.pretext_loss(x, "train")
    assert torch.equal(seen[0], x) and not torch.allclose(seen[1], x)
    bound = math.sqrt(6.0 / (1 * 4 * 4 + 32))
    assert model.encoder.patch_embed.weight.abs().max() <= bound
    qkv = model.encoder.blocks[0].attn.in_proj_weight
    assert qkv.abs().max() <= math.sqrt(6.0 / (32 + 3 * 32)) * 1.0001  # one Xavier over the fused QKV


def test_cpc_imagenet_is_cpc_v1s_layout():
    """van den Oord et al. 2018, Sec. 3.1: 256 px images, a 7x7 grid of 64 px crops with 32 px overlap,
    predictions up to five rows below."""
    cfg = compose(["experiment=cpc_imagenet", "method.backbone.name=conv"])
    info = DataInfo(name="folder", channels=3, image_size=cfg.data.image_size, batch_size=2)
    model = registry.build("method", section_object(cfg.method), data=info)
    assert (cfg.data.image_size, model.patch, model.stride, cfg.method.grid) == (256, 64, 32, 7)
    assert cfg.method.pred_steps == 5 == compose(["method=cpc", "data=digits"]).method.pred_steps


# ------------------------------------------------------------------------------------ parity tables

PARITY_PAGES = {
    "simclr": ["simclr"],
    "moco": ["moco_v1", "moco_v2", "moco_v3"],
    "byol": ["byol"],
    "simsiam": ["simsiam"],
    "barlow_twins": ["barlow_twins"],
    "vicreg": ["vicreg"],
    "swav": ["swav"],
    "dino": ["dino"],
    "mae": ["mae"],
}


def dotted_keys(node, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    return [
        k
        for key, value in node.items()
        for k in dotted_keys(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    ]


def parity_section(page: str) -> str:
    text = (ROOT / "docs/methods" / f"{page}.md").read_text(encoding="utf-8")
    match = re.search(r"^## .*[Pp]arity with the official code\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/methods/{page}.md has no section '## ... parity with the official code'"
    return match.group(1)


@pytest.mark.parametrize("page", sorted(PARITY_PAGES))
def test_every_config_key_has_a_row_in_its_pages_parity_table(page):
    section = parity_section(page)
    header = next(line for line in section.splitlines() if line.startswith("|"))
    assert all(word in header.lower() for word in ("official", "source", "here", "why")), header
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    assert len(rows) >= 15, f"{page}: {len(rows)} rows"
    for row in rows:  # every official value names the file it comes from
        assert len(row.strip("|").split("|")) >= 5, row
    missing = []
    for recipe in PARITY_PAGES[page]:
        keys = dotted_keys(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method" / f"{recipe}.yaml")))
        missing += [f"{recipe}: {k}" for k in keys if k != "name" and f"`{k}`" not in section]
    assert not missing, f"docs/methods/{page}.md's parity table lacks: {missing}"
