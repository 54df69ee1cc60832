"""The papers' evaluation protocols beside the project's: RotNet's semi-frozen fine-tune and the augmented
linear evaluation of MoCo's main_lincls.py (the CLI runs them in tests/test_eval_cli.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_gen.eval import EvalError
from lightning_gen.eval.finetune import FinetuneConfig, freeze_stages, train_classifier
from lightning_gen.eval.probe import ProbeConfig, augmented_linear_probe
from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.ssl.simclr import SimCLR, SimCLRConfig
from lightning_gen.nets.backbones import BackboneConfig, encoder_stages

INFO = DataInfo(name="digits", channels=1, image_size=16, num_classes=3, batch_size=8)


def tiny_resnet_method() -> SimCLR:
    torch.manual_seed(0)
    backbone = BackboneConfig(name="resnet18", resnet_width=8, zero_init_residual=False)
    return SimCLR(SimCLRConfig(backbone=backbone, proj_hidden_dim=8, proj_dim=4, online_probe=False), INFO)


def labeled_images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 3


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_semi_frozen_finetune_keeps_the_first_stages_and_their_batchnorm_statistics():
    method = tiny_resnet_method()
    images, labels = labeled_images()
    cfg = FinetuneConfig(freeze=2, min_steps=3, batch_size=8, lr=0.5, translate=0.0)
    model, stats = train_classifier(method, images, labels, 3, epochs=1, cfg=cfg)
    before = method.backbone.net
    after = model.method.backbone.net
    assert stats["frozen_stages"] == 2
    for name in ("conv1", "bn1", "layer1"):  # stem and layer1: weights and running statistics unchanged
        for key, value in snapshot(getattr(before, name)).items():
            assert torch.equal(snapshot(getattr(after, name))[key], value), f"{name}.{key}"
    for name in ("layer2", "layer4"):  # the rest trains, and its BatchNorm statistics move
        moved = [
            k
            for k, v in snapshot(getattr(before, name)).items()
            if not torch.equal(snapshot(getattr(after, name))[k], v)
        ]
        assert any(k.endswith("weight") for k in moved) and any("running_mean" in k for k in moved), name


def test_freeze_counts_stages_and_rejects_more_than_there_are():
    method = tiny_resnet_method()
    assert len(encoder_stages(method.backbone)) == 5  # stem, layer1..layer4
    with pytest.raises(EvalError, match="has 5 stages"):
        freeze_stages(method, 6)
    layer4 = snapshot(method.backbone.net.layer4)
    frozen = freeze_stages(method, 4, reinit=True)  # RotNet's CIFAR-10 protocol: fresh later blocks
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in method.backbone.net.layer4.parameters())
    assert not torch.equal(snapshot(method.backbone.net.layer4)["0.conv1.weight"], layer4["0.conv1.weight"])


def test_full_finetune_trains_a_momentum_encoder_but_never_a_fixed_position_table():
    """DINO embeds with its teacher (a momentum copy without gradients): fine-tuning trains it all the
    same; a fixed sine-cosine table stays fixed."""
    from lightning_gen.methods.ssl.dino import DINO, DINOConfig

    vit = BackboneConfig(name="vit", patch_size=4, depth=2, width=16, heads=2, pos_embed="sincos")
    method = DINO(DINOConfig(backbone=vit, out_dim=8, hidden_dim=8, bottleneck_dim=4), INFO)
    assert not any(p.requires_grad for p in method.teacher_backbone.parameters())
    freeze_stages(
        method, 1
    )  # the patch embedding (with [CLS] and positions) frozen, blocks 1-2 and norm train
    teacher = method.teacher_backbone
    assert all(p.requires_grad for p in teacher.blocks.parameters()) and teacher.norm.weight.requires_grad
    assert not teacher.patch_embed.weight.requires_grad and not teacher.pos_embed.requires_grad


def test_augmented_probe_trains_on_fresh_crops_through_a_frozen_encoder_in_eval_mode():
    method = tiny_resnet_method()
    images, labels = labeled_images()
    train_set = [{"image": im, "label": int(y)} for im, y in zip(images, labels)]
    with torch.no_grad():
        method.eval()
        features = method.embed_images(images)
    method.train()
    seen = []
    real_embed = method.embed
    method.embed = lambda x: seen.append((x.clone(), method.training)) or real_embed(x)
    before = snapshot(method)
    cfg = ProbeConfig(epochs=2, batch_size=8, lr=0.5, seed=3)
    result = augmented_linear_probe(method, train_set, features, features, labels, 3, cfg)
    assert snapshot(method).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(method).items())  # weights and BN statistics
    assert method.training  # given back as it came
    assert len(seen) == 2 * 3 and not any(training for _, training in seen)  # 2 epochs x 3 batches, eval mode
    clean = method.to_float(images, method.embed_value_range)
    assert all(x.shape == (8, 1, 16, 16) for x, _ in seen)
    assert not any(torch.allclose(x, clean[: len(x)]) for x, _ in seen)  # crops, not the images
    method.embed = real_embed
    again = augmented_linear_probe(method, train_set, features, features, labels, 3, cfg)
    assert again["top1"] == result["top1"] and again["loss"] == pytest.approx(result["loss"], rel=1e-6)
    with pytest.raises(EvalError, match="probe.optimizer=sgd"):
        augmented_linear_probe(
            method, train_set, features, features, labels, 3, ProbeConfig(optimizer="lbfgs")
        )
