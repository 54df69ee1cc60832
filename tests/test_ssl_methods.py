"""Every SSL method trains a few steps through `lgen train`, is interrupted, and resumes (resume=auto)
with the state an uninterrupted run has: momentum τ and teacher temperature at every step equal the
closed-form schedule of the full run, and MoCo's queue / DINO's center come back from the checkpoint.
Also: a real 2-process DDP run (gloo) and the multi-node code path (2 "nodes" x 1 device)."""

from __future__ import annotations

import csv
import math
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import lgen_env

TINY = [
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "trainer.log_every_n_steps=1",
    "callbacks.images.enabled=false",
]
TOTAL_STEPS = 4  # 2 epochs x 2 batches


def step_values(run_dir, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as handle:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(handle) if r.get(key)}


def cosine(step, total, start, end):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / total))


CASES = {
    "simclr_digits": [],
    "moco_v2_digits": ["method.momentum_start=0.99", "method.momentum_end=1.0", "method.queue_size=128"],
    "moco_v3_digits": ["method.momentum_start=0.99", "method.momentum_end=1.0"],
    "dino_digits": [
        "method.momentum_start=0.99",
        "method.momentum_end=1.0",
        "method.teacher_temp=0.07",
        "method.teacher_temp_warmup_epochs=2",
        "method.out_dim=256",
        "method.weight_decay=0.04",
        "method.weight_decay_end=0.4",
    ],
    "cpc_digits": [],
    "byol_digits": ["method.momentum_start=0.99", "method.momentum_end=1.0"],
    "simsiam_digits": [],
    "barlow_twins_digits": ["method.proj_hidden_dim=64", "method.proj_dim=64"],
    "vicreg_digits": ["method.proj_hidden_dim=64", "method.proj_dim=64"],
    # queue of 2 batches from epoch 0: full at the interruption, used only after the resume
    "swav_digits": ["method.queue_size=32", "method.queue_start_epoch=0", "method.num_prototypes=20"],
    # the same SimCLR test with the backbone compiled (trainer.compile): same behaviour, resume included
    "simclr_digits+compile": ["trainer.compile=true"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_interrupt_and_resume(lgen, case):
    experiment = case.split("+")[0]
    args = ["train", f"experiment={experiment}", *TINY, *CASES[case], "run_id=r"]
    run_dir = lgen.cwd / "runs" / experiment / "r"
    lgen(*args, "callbacks.stop_after.epochs=1")  # stops after epoch 1 of the planned 2, like a preemption
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    momentum = step_values(run_dir, "train/momentum") if "momentum_end=1.0" in " ".join(args) else {}
    temps = step_values(run_dir, "train/teacher_temp") if experiment.startswith("dino") else {}
    decays = step_values(run_dir, "train/weight_decay") if experiment.startswith("dino") else {}

    lgen(*args)  # resume=auto finds last.ckpt
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == TOTAL_STEPS
    if momentum:
        momentum.update(step_values(run_dir, "train/momentum"))
        assert sorted(momentum) == list(range(TOTAL_STEPS))
        for (
            step,
            value,
        ) in momentum.items():  # the uninterrupted run's τ at every step, before and after resume
            assert value == pytest.approx(cosine(step, TOTAL_STEPS, 0.99, 1.0), abs=1e-6), step
    if temps:
        temps.update(step_values(run_dir, "train/teacher_temp"))
        for step, value in temps.items():
            assert value == pytest.approx(0.04 + 0.03 * min(step / TOTAL_STEPS, 1.0), abs=1e-6), step
        assert not torch.equal(first["state_dict"]["loss_fn.center"], torch.zeros(1, 256))
        decays.update(step_values(run_dir, "train/weight_decay"))
        assert sorted(decays) == list(range(TOTAL_STEPS))
        for step, value in decays.items():  # cosine 0.04 -> 0.4, the same before and after the resume
            assert value == pytest.approx(cosine(step, TOTAL_STEPS, 0.04, 0.4), abs=1e-6), step
        decayed = [g for g in final["optimizer_states"][0]["param_groups"] if g.get("scheduled_decay")]
        assert decayed and all(g["weight_decay"] == pytest.approx(decays[TOTAL_STEPS - 1]) for g in decayed)
    if experiment.startswith("moco_v2"):
        q0, q1 = first["state_dict"]["queue.keys"], final["state_dict"]["queue.keys"]
        assert int(first["state_dict"]["queue.ptr"]) == 32 and int(final["state_dict"]["queue.ptr"]) == 64
        assert torch.equal(q0[:32], q1[:32])  # what the first run enqueued survived the restart
        assert not torch.equal(q0[32:64], q1[32:64])  # and the resumed run appended after it
        # key head momentum-updated too (not left at its initial copy): it moved with the key encoder
        sd = final["state_dict"]
        head_q = [k for k in sd if k.startswith("projector.") and k.endswith("weight")]
        assert head_q and any(
            not torch.equal(sd[k], sd[k.replace("projector.", "projector_k.", 1)]) for k in head_q
        )
    from lightning_gen.methods.base import load_method

    method = load_method(str(run_dir / "checkpoints" / "last.ckpt"))
    assert method.embed_images(torch.zeros(3, 1, 16, 16, dtype=torch.uint8)).shape[0] == 3
    if experiment in METHOD_CHECKS:
        METHOD_CHECKS[experiment](method, first, final, run_dir)


def optimizer_state_of(method, param, checkpoint) -> dict:
    """The checkpoint's optimizer state of ``param`` (indexed by position in the method's own groups)."""
    params = [p for g in method.configure_optimizers().param_groups for p in g["params"]]
    index = next(i for i, p in enumerate(params) if p is param)
    return checkpoint["optimizer_states"][0]["state"].get(index, {})


def check_byol(method, first, final, run_dir):
    sd = final[
        "state_dict"
    ]  # the target projector moved with the online one (momentum pair), not left at init
    weights = [k for k in sd if k.startswith("projector.") and k.endswith("weight")]
    assert weights and any(not torch.equal(sd[k], sd["target_" + k]) for k in weights)
    assert not torch.equal(
        first["state_dict"]["target_projector.net.0.weight"], sd["target_projector.net.0.weight"]
    )


def check_simsiam(method, first, final, run_dir):
    """The predictor keeps its base lr (not decayed) while the rest follows warm-up + cosine."""
    groups = final["optimizer_states"][0]["param_groups"]
    fixed = [g for g in groups if g.get("fixed_lr") and g["base_lr"] == pytest.approx(2e-3)]  # not the probe
    assert sum(len(g["params"]) for g in fixed) == len(list(method.predictor.parameters()))
    assert all(g["lr"] == pytest.approx(2e-3) for g in fixed)
    decayed = [g for g in groups if not g.get("fixed_lr")]
    assert decayed and all(g["lr"] < 2e-3 for g in decayed)


def check_swav(method, first, final, run_dir):
    assert int(first["state_dict"]["queue.filled"]) == 32  # the queue is in the checkpoint, full
    used = step_values(run_dir, "train/queue_used")
    assert used == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}  # used from the first step after the resume on
    prototypes = final["state_dict"]["prototypes.weight"]
    assert torch.allclose(prototypes.norm(dim=1), torch.ones(len(prototypes)), atol=1e-5)
    # frozen in epoch 0 (no gradient, so no optimizer state), trained in epoch 1
    assert not optimizer_state_of(method, method.prototypes.weight, first)
    assert optimizer_state_of(method, method.prototypes.weight, final)
    assert not torch.equal(first["state_dict"]["prototypes.weight"], prototypes)


METHOD_CHECKS = {"byol_digits": check_byol, "simsiam_digits": check_simsiam, "swav_digits": check_swav}


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches(lgen):
    """accumulate_grad_batches=2: τ follows global_step over estimated_stepping_batches (optimizer
    steps), the LR is scaled by the global batch including accumulation, and every micro-batch's
    keys reach the queue."""
    tiny = [a for a in TINY if not a.startswith("trainer.limit_train_batches=")]
    args = [*tiny, "trainer.limit_train_batches=4", "trainer.accumulate_grad_batches=2", "run_id=acc"]
    moco = ["method.momentum_start=0.99", "method.momentum_end=1.0", "method.queue_size=256"]
    lr = [
        "method.lr=0.002",
        "method.lr_scaling=linear",
        "method.base_batch_size=64",
        "method.schedule=constant",
    ]
    proc = lgen("train", "experiment=moco_v2_digits", *args, *moco, *lr, "method.warmup_epochs=0")
    assert "global batch 32 = 16 per device x 1 processes" in proc.stdout + proc.stderr
    assert "x 2 accumulation step(s)" in proc.stdout + proc.stderr
    run_dir = lgen.cwd / "runs" / "moco_v2_digits" / "acc"
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == TOTAL_STEPS  # 2 epochs x 4 micro-batches / 2
    momentum = step_values(run_dir, "train/momentum")
    assert sorted(momentum) == list(range(TOTAL_STEPS))
    for step, value in momentum.items():  # the schedule's length is optimizer steps, not batches
        assert value == pytest.approx(cosine(step, TOTAL_STEPS, 0.99, 1.0), abs=1e-6), step
    assert int(final["state_dict"]["queue.ptr"]) == 2 * 4 * 16  # 8 micro-batches of 16 keys
    lr = step_values(run_dir, "lr")
    assert lr and all(v == pytest.approx(0.002 * 32 / 64) for v in lr.values())


def test_moco_refuses_shuffle_bn_with_sync_bn(lgen):
    proc = lgen("train", "experiment=moco_v2_digits", *TINY, "trainer.sync_batchnorm=true", check=False)
    assert proc.returncode != 0 and "shuffle-BN" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MULTI = [
    "experiment=moco_v2_digits",
    "data.image_size=16",
    "data.batch_size=16",
    "data.max_train_samples=140",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "trainer.log_every_n_steps=1",
    "callbacks.images.enabled=false",
    "trainer.accelerator=cpu",
    "trainer.strategy=ddp",
    "method.queue_size=512",
    "method.lr_scaling=linear",
    "method.base_batch_size=64",
    "method.schedule=constant",
    "method.warmup_epochs=0",
    "method.lr=0.002",
]
# 140 samples, 15% held out for validation -> 119 train images; batch 16 per process.


def check_two_process_run(run_dir) -> None:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps = ckpt["global_step"]
    assert steps == (119 // 2) // 16 == 3  # the sampler shards the data over both processes
    assert int(ckpt["state_dict"]["queue.ptr"]) == steps * 2 * 16  # keys of both ranks were enqueued
    lr = step_values(run_dir, "lr")
    assert lr and all(v == pytest.approx(0.002 * (16 * 2) / 64) for v in lr.values())  # global batch 32


def test_ddp_two_cpu_processes(lgen):
    lgen("train", *MULTI, "trainer.devices=2", "run_id=ddp")
    check_two_process_run(lgen.cwd / "runs" / "moco_v2_digits" / "ddp")


def test_cpc_trains_with_two_ddp_processes_and_global_negatives(lgen):
    """CPC's InfoNCE gathers the codes of both ranks with gradient inside a real DDP backward (a
    collective inside autograd next to DDP's own all-reduce); the maths is checked in
    test_ssl_distributed, this checks the integration: both ranks train to the end with finite
    losses (collectives issued out of order would hang or fail)."""
    quick = [a for a in TINY if not a.startswith("trainer.max_epochs=")]
    args = ["experiment=cpc_digits", *quick, "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    lgen("train", *args, "trainer.devices=2", "trainer.strategy=ddp", "run_id=ddp")
    run_dir = lgen.cwd / "runs" / "cpc_digits" / "ddp"
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 2
    losses = step_values(run_dir, "train/loss_step")
    assert sorted(losses) == [0, 1] and all(math.isfinite(v) for v in losses.values())


def test_swav_trains_with_two_ddp_processes_queue_and_global_sinkhorn(lgen):
    """SwAV under real 2-process DDP: Sinkhorn-Knopp all-reduces its marginals inside every step, and
    the queue gathers both ranks' embeddings (its equality across ranks is checked at every epoch end,
    which raises on drift). The maths is checked in test_ssl_distributed; this checks the integration:
    3 steps of 16 images per rank, a queue of 64 rows full after 2 steps and used in the third."""
    quick = [a for a in TINY if not a.startswith(("trainer.max_epochs=", "trainer.limit_train_batches="))]
    swav = ["method.queue_size=64", "method.queue_start_epoch=0", "method.num_prototypes=20"]
    args = ["experiment=swav_digits", *quick, *swav, "trainer.max_epochs=1", "trainer.limit_train_batches=3"]
    lgen("train", *args, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "run_id=ddp")
    run_dir = lgen.cwd / "runs" / "swav_digits" / "ddp"
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 3
    assert int(final["state_dict"]["queue.filled"]) == 64  # 2 ranks x 16 rows per step
    assert step_values(run_dir, "train/queue_used") == {0: 0.0, 1: 0.0, 2: 1.0}
    losses = step_values(run_dir, "train/loss_step")
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())


def test_multi_node_two_nodes_one_device_each(tmp_path):
    """num_nodes=2, devices=1: two processes started by hand with the env a cluster launcher sets; they
    agree on the run through the store global rank 0 serves, which the process group then reuses."""
    port = _free_port()
    procs = []
    for node in range(2):
        env = lgen_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            NODE_RANK=str(node),
            WORLD_SIZE="2",
            LOCAL_RANK="0",
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lightning_gen",
                    "train",
                    *MULTI,
                    "trainer.num_nodes=2",
                    "trainer.devices=1",
                    "run_id=nodes",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert "2 node(s) x 1 device(s)" in outputs[0] and "global batch 32" in outputs[0]
    assert "global rank 1 of 2: run nodes as global rank 0 decided" in outputs[1]
    check_two_process_run(tmp_path / "runs" / "moco_v2_digits" / "nodes")


def test_every_ssl_experiment_composes_and_builds():
    """The published-recipe experiments (CIFAR-10, STL-10, image folders) validate and instantiate."""
    from lightning_gen import registry
    from lightning_gen.config import compose, options, section_object
    from lightning_gen.methods.base import DataInfo

    ssl = ("simclr", "moco", "dino", "cpc", "byol", "simsiam", "barlow", "vicreg", "swav")
    names = [n for n in options("experiment") if n.split("_")[0] in ssl]
    assert len(names) >= 44
    for name in names:
        cfg = compose([f"experiment={name}"])
        if cfg.data.name not in (
            "cifar10",
            "digits",
            "fashion_mnist",
        ):  # 96/224 px ResNet-50 / ViT-S: too slow
            continue
        size = cfg.data.image_size or 32
        channels = 1 if cfg.data.name in ("digits", "fashion_mnist") else 3
        info = DataInfo(name=cfg.data.name, channels=channels, image_size=size)
        method = registry.build("method", section_object(cfg.method), data=info)
        assert method.embed(torch.zeros(2, info.channels, size, size)).shape[0] == 2, name
        if name.startswith("cpc") and cfg.method.backbone.name.startswith("resnet"):  # CPC v2's layer norm
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in method.modules()), name


def test_resnet_layer_norm_makes_every_sample_independent_of_the_batch():
    """With BatchNorm (training mode) a sample's features depend on the other samples of the batch;
    with ``norm=layer`` they do not, so CPC's patches cannot talk through batch statistics."""
    from lightning_gen.nets.backbones import BackboneConfig, build_backbone

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    others = torch.cat([x[:1], torch.randn(3, 3, 32, 32)])  # same first sample, other batch mates
    for norm, independent in [("batch", False), ("layer", True)]:
        net = build_backbone(BackboneConfig(name="resnet18", norm=norm, zero_init_residual=False), 3, 32)
        net.train()
        same = torch.allclose(net(x)[0], net(others)[0], atol=1e-5)
        assert same == independent, norm


def test_narrow_resnet_is_torchvisions_layout_with_every_stage_scaled():
    """backbone.resnet_width: the same modules as torchvision's ResNet (names, blocks, strides), every
    channel count scaled by width / 64; 64 is torchvision's own network."""
    import torchvision

    from lightning_gen.nets.backbones import BackboneConfig, build_backbone

    reference = torchvision.models.resnet18(weights=None).state_dict()
    for width in (64, 16):
        net = build_backbone(BackboneConfig(name="resnet18", resnet_width=width, cifar_stem=False), 3, 64)
        state = net.net.state_dict()
        assert state.keys() == reference.keys() - {"fc.weight", "fc.bias"}
        for key, value in state.items():
            expected = tuple(
                d if d in (1, 3, 7) else d * width // 64 for d in reference[key].shape
            )  # kernel sizes stay, channels scale
            assert tuple(value.shape) == expected, (width, key)
        assert net.out_dim == 8 * width and net(torch.randn(2, 3, 64, 64)).shape == (2, 8 * width)
    wide50 = build_backbone(BackboneConfig(name="resnet50", resnet_width=16), 1, 32)
    assert wide50.out_dim == 512 and wide50(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_supervised_baseline_is_cross_entropy_of_its_classifier_on_the_view():
    """The supervised baseline's loss is the cross-entropy of classifier(backbone(view)); it trains the
    backbone, and the online probe (on detached features) does not."""
    import torch.nn.functional as F

    from lightning_gen import registry
    from lightning_gen.config import compose, section_object
    from lightning_gen.methods.base import DataInfo

    identity = ["method.views.recipe=none", "method.views.global_crops.scale=[1.0,1.0]"]
    cfg = compose(["experiment=supervised_fashion_mnist", *identity])
    info = DataInfo(name="fashion_mnist", channels=1, image_size=32, mean=(0.286,), std=(0.353,))
    torch.manual_seed(0)
    method = registry.build("method", section_object(cfg.method), data=info)
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    batch = {"image": images, "label": torch.arange(8) % 10, "index": torch.arange(8)}
    views = method.make_views(batch)
    loss, features = method.ssl_loss(views, batch)
    x = method.to_float(images, "standard")
    assert torch.allclose(views[0], x, atol=1e-5)  # recipe none: the view is the image
    assert torch.allclose(loss, F.cross_entropy(method.classify(x), batch["label"]), atol=1e-5)
    (loss + method.probe_loss(features, batch["label"], "train")).backward()
    assert method.backbone.encoder.head.weight.grad is not None
    probe_only = method.probe_loss(method.embed(x), batch["label"], "train")
    method.zero_grad()
    probe_only.backward()
    assert (
        method.backbone.encoder.head.weight.grad is None or not method.backbone.encoder.head.weight.grad.any()
    )


def test_moco_v3_vit_keeps_the_random_patch_projection_frozen():
    """MoCo v3's stability trick: with method.freeze_patch_embed the ViT patch projection gets no
    gradient and no optimizer slot; any other backbone is a clear error."""
    from lightning_gen import registry
    from lightning_gen.config import ConfigError, compose, section_object
    from lightning_gen.methods.base import DataInfo

    small_vit = ["method.backbone.depth=1", "method.backbone.width=32", "method.backbone.heads=2"]
    small_vit += ["method.backbone.patch_size=4", "method.proj_hidden_dim=32", "method.pred_hidden_dim=32"]
    cfg = compose(["experiment=moco_v3_vit_imagenet", *small_vit])
    info = DataInfo(name="folder", channels=3, image_size=16)
    method = registry.build("method", section_object(cfg.method), data=info)
    frozen = {id(p) for p in method.backbone.patch_embed.parameters()}
    trained = {
        id(p) for g in method.parameter_groups(method.trainable_modules(), 0.1, 0.1) for p in g["params"]
    }
    assert frozen and not frozen & trained
    assert {id(p) for p in method.backbone.blocks.parameters()} <= trained
    loss, _ = method.ssl_loss([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], {})
    loss.backward()
    assert all(p.grad is None for p in method.backbone.patch_embed.parameters())

    conv = compose(["experiment=moco_v3_digits", "method.freeze_patch_embed=true"])
    with pytest.raises((ValueError, ConfigError), match="needs a ViT backbone"):
        registry.build("method", section_object(conv.method), data=DataInfo(name="digits", image_size=16))


def test_cpc_patches_are_grid_crops_and_jitter_moves_each_patch_within_range():
    """CPC's patch grid read back from a coordinate image (channel 0 = row, 1 = column): without
    jitter patch (i, j) is the window at (i, j) * stride; with ``patch_jitter`` J every patch is a
    window of the edge-replicated image at its own offset in [-J, J], and the offsets differ."""
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.ssl.cpc import CPC, CPCConfig

    method = CPC(CPCConfig(name="cpc", grid=3, pred_steps=2), DataInfo(name="t", channels=2, image_size=16))
    size, p, s, g = 16, method.patch, method.stride, 3
    assert (p, s) == (8, 4)
    line = torch.arange(size, dtype=torch.float)
    image = torch.stack(torch.meshgrid(line, line, indexing="ij")).expand(5, 2, size, size)
    window = torch.arange(p, dtype=torch.float)
    seen = []
    method.backbone.forward = lambda patches: seen.append(patches) or patches.new_zeros(len(patches), 4)

    method.patch_codes(image)
    patches = seen[-1].view(5, g, g, 2, p, p)
    for i in range(g):
        for j in range(g):
            assert torch.equal(patches[:, i, j, 0, :, 0], (i * s + window).expand(5, p))
            assert torch.equal(patches[:, i, j, 1, 0, :], (j * s + window).expand(5, p))

    jitter = 2
    torch.manual_seed(0)
    method.patch_codes(image, jitter)
    patches = seen[-1].view(5, g, g, 2, p, p)
    offsets = set()
    for n in range(5):
        for i in range(g):
            for j in range(g):
                found = []
                for axis, base in ((0, i * s), (1, j * s)):
                    cut = patches[n, i, j, axis, :, 0] if axis == 0 else patches[n, i, j, axis, 0, :]
                    matches = [
                        d
                        for d in range(-jitter, jitter + 1)
                        if torch.equal(cut, (base + d + window).clamp(0, size - 1))
                    ]
                    assert matches, (n, i, j, axis, cut)
                    found.append(matches[0])
                offsets.add(tuple(found))
                # a crop, not a shuffle of pixels: row coordinates constant along rows, columns down columns
                assert torch.equal(patches[n, i, j, 0], patches[n, i, j, 0, :, :1].expand(p, p))
                assert torch.equal(patches[n, i, j, 1], patches[n, i, j, 1, :1, :].expand(p, p))
    assert len(offsets) > 5  # per-patch offsets, not one shift for the whole grid

    with pytest.raises(ValueError, match="patch_jitter"):
        CPC(CPCConfig(name="cpc", grid=3, pred_steps=2, patch_jitter=-1), DataInfo(name="t", image_size=16))


def test_split_shuffle_never_normalises_a_key_with_its_querys_sub_batch():
    """One-device shuffle-BN: query sub-batch of sample i is {j : j % G == i % G}; its key is normalised
    in the key sub-batch holding it after ``split_shuffle``, which must be a different set of samples
    (and mix several query sub-batches), for every sample, batch size and split count."""
    from lightning_gen.methods.ssl.moco import split_shuffle, usable_splits

    torch.manual_seed(0)
    for n, splits in [(16, 8), (32, 8), (256, 8), (24, 4), (12, 3), (64, 2)]:
        g = usable_splits(n, splits)
        position = split_shuffle(n, g)
        assert sorted(position.tolist()) == list(range(n))  # a permutation of the batch
        query_groups = [set(range(q, n, g)) for q in range(g)]
        key_group_of = position % g
        for i in range(n):
            key_group = set(torch.nonzero(key_group_of == key_group_of[i]).squeeze(1).tolist())
            assert len(key_group) == n // g and key_group != query_groups[i % g], (n, g, i)
            assert len({j % g for j in key_group}) == min(n // g, g)  # mixes that many query sub-batches
    assert usable_splits(20, 8) == 5 and usable_splits(7, 8) == 1  # sub-batches of >= 2 samples only


def test_moco_one_device_shuffle_bn_uses_sub_batch_statistics():
    """MoCo v2 with a ResNet on one device: BatchNorm runs over sub-batches in both encoders, and a key
    depends on exactly the samples of its own key sub-batch, which is not its query's sub-batch."""
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.ssl.moco import split_shuffle
    from lightning_gen.nets.norm import SplitBatchNorm
    from lightning_gen.randomness import isolated

    cfg = compose(
        [
            "method=moco_v2",
            "method.backbone.name=resnet18",
            "method.backbone.zero_init_residual=false",
            "method.bn_splits=4",
            "method.queue_size=64",
        ]
    )
    info = DataInfo(name="digits", channels=1, image_size=16, batch_size=16)
    method = registry.build("method", section_object(cfg.method), data=info)
    method.setup("fit")  # one process: BatchNorm becomes 4-way sub-batch BatchNorm, queue kept out of DDP
    assert method.split_bn and method._ddp_params_and_buffers_to_ignore == ["queue.keys", "queue.ptr"]
    for net in (method.backbone, method.backbone_k):
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, SplitBatchNorm) for m in bns)
    method.train()
    x = torch.randn(16, 1, 16, 16)

    def keys(images):
        with isolated(5):  # the same shuffle every call
            return method.keys(images)

    with isolated(5):
        position = split_shuffle(16, 4)
    base = keys(x)
    i = 0
    key_group = set(torch.nonzero(position % 4 == position[i] % 4).squeeze(1).tolist())
    assert key_group != set(range(0, 16, 4))  # sample 0's query sub-batch
    for j in range(1, 16):
        changed = x.clone()
        changed[j] += 3.0
        moved = not torch.allclose(keys(changed)[i], base[i], atol=1e-6)
        assert moved == (j in key_group), j  # only key sub-batch mates reach key 0 through BatchNorm


def test_moco_v3_heads_follow_the_official_code():
    """moco-v3 moco/builder.py: ResNet 2-layer projector, ViT 3-layer, both ending in an affine-free BN;
    the predictor ends in that BN for ViTs (MoCo_ViT keeps _build_mlp's last_bn=True) and in a plain
    linear layer for ResNets (last_bn=False); no linear layer of either head has a bias."""
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.ssl.moco import MoCo, MoCoConfig
    from lightning_gen.nets.backbones import BackboneConfig

    info = DataInfo(name="digits", channels=1, image_size=16)
    for backbone, layers in [
        (BackboneConfig(name="conv"), 2),
        (BackboneConfig(name="vit", depth=1, width=32, heads=2), 3),
    ]:
        method = MoCo(
            MoCoConfig(version="v3", backbone=backbone, proj_hidden_dim=32, pred_hidden_dim=32), info
        )
        linears = [m for m in method.projector.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == layers, backbone.name
        last = list(method.projector.net)[-1]
        assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
        predictor_end = list(method.predictor.net)[-1]
        if backbone.name == "vit":
            assert isinstance(predictor_end, torch.nn.BatchNorm1d) and not predictor_end.affine
        else:
            assert isinstance(predictor_end, torch.nn.Linear)
        for head in (method.projector, method.predictor):
            assert all(m.bias is None for m in head.modules() if isinstance(m, torch.nn.Linear)), (
                backbone.name
            )


def test_dino_clips_each_parameter_gradient_to_its_own_norm():
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.ssl.dino import DINO, DINOConfig
    from lightning_gen.nets.backbones import BackboneConfig

    cfg = DINOConfig(
        backbone=BackboneConfig(name="conv"),
        out_dim=16,
        hidden_dim=16,
        bottleneck_dim=8,
        freeze_last_layer_epochs=0,
    )
    method = DINO(cfg, DataInfo(name="digits", channels=1, image_size=16))
    params = [p for m in (method.backbone, method.head) for p in m.parameters() if p.requires_grad]
    for k, p in enumerate(params):
        p.grad = torch.full_like(p, 1.0 if k % 2 else 1e-3)  # some above the clip norm, some far below
    before = [p.grad.clone() for p in params]
    method.on_before_optimizer_step(None)
    for p, old in zip(params, before):
        if old.norm() > 3.0:  # rescaled to norm 3, direction kept
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
            torch.testing.assert_close(p.grad / p.grad.norm(), old / old.norm())
        else:  # untouched
            assert torch.equal(p.grad, old)
    assert any(old.norm() > 3.0 for old in before) and any(old.norm() < 3.0 for old in before)
