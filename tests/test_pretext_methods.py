"""Method-level properties: what MAE's encoder sees, where inpainting's losses flow, colorization's prior."""

from __future__ import annotations

import pytest
import torch

from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.ssl.colorization import Colorization, ColorizationConfig
from lightning_gen.methods.ssl.inpainting import Inpainting, InpaintingConfig
from lightning_gen.methods.ssl.mae import MAE, MAEConfig, patch_pixels, unpatch_pixels
from lightning_gen.methods.ssl.pretext import random_patch_mask
from lightning_gen.nets.backbones import BackboneConfig

TINY_VIT = BackboneConfig(name="vit", patch_size=4, depth=2, width=32, heads=2)
SMALL_CONV = BackboneConfig(name="conv", conv_width=8, conv_dim=16)


# ------------------------------------------------------------------------------------ MAE


def test_mae_mask_hides_exactly_the_stated_fraction_per_sample():
    keep, mask = random_patch_mask(6, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 48).all() and keep.shape == (6, 16)
    assert not mask.gather(1, keep).any()  # kept = exactly the unmasked ones
    assert not torch.equal(mask[0], mask[1])
    with pytest.raises(ValueError, match="mask ratio"):
        random_patch_mask(1, 4, 1.0)


def test_patch_pixels_follow_the_vit_token_order():
    x = (
        torch.arange(4).view(1, 1, 2, 2).float().repeat_interleave(4, 2).repeat_interleave(4, 3)
    )  # 8x8, 4 patches
    patches = patch_pixels(x, 4)
    assert torch.equal(patches[0].mean(1), torch.arange(4).float())  # raster order, like conv + flatten(2)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatch_pixels(patch_pixels(x, 4), 4, 3), x)


def test_mae_encoder_never_sees_masked_patches():
    torch.manual_seed(0)
    mae = MAE(
        MAEConfig(backbone=TINY_VIT, decoder_width=16, decoder_heads=2, decoder_depth=1),
        DataInfo(channels=1, image_size=16, num_classes=0),
    ).eval()
    seen = []
    original = mae.encoder.forward_tokens
    mae.encoder.forward_tokens = lambda tokens: (seen.append(tokens), original(tokens))[1]
    x = torch.randn(3, 1, 16, 16)
    torch.manual_seed(1)
    _, mask, keep = mae.forward_mae(x)
    assert seen[0].shape == (3, 4, 32)  # 16 patches, 75% masked: 4 tokens per image enter the encoder
    all_tokens = mae.encoder.patchify(x)
    assert torch.equal(seen[0], torch.gather(all_tokens, 1, keep[..., None].expand(-1, -1, 32)))
    # Scribble over every masked patch: what the encoder receives and returns must not change.
    pixels = patch_pixels(x, 4)
    scribbled = unpatch_pixels(torch.where(mask[..., None], torch.randn_like(pixels) * 100, pixels), 4, 1)
    torch.manual_seed(1)
    prediction_a, mask_b, _ = mae.forward_mae(x)
    torch.manual_seed(1)
    prediction_b, mask_c, _ = mae.forward_mae(scribbled)
    assert torch.equal(mask_b, mask_c)
    assert torch.allclose(seen[1], seen[2]) and torch.allclose(prediction_a, prediction_b, atol=1e-5)


def test_mae_loss_counts_only_masked_patches_with_normalised_targets():
    torch.manual_seed(0)
    mae = MAE(
        MAEConfig(backbone=TINY_VIT, decoder_width=16, decoder_heads=2, decoder_depth=1),
        DataInfo(channels=1, image_size=16, num_classes=0),
    )
    x = torch.randn(2, 1, 16, 16) * 3 + 1
    target = mae.targets(x)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    captured = {}
    real_forward = mae.forward_mae

    def perfect_on_masked(images):
        prediction, mask, keep = real_forward(images)
        captured["mask"] = mask
        return torch.where(mask[..., None], target, prediction + 10.0), mask, keep

    mae.forward_mae = perfect_on_masked
    loss, _ = mae.pretext_loss(x, "val")  # "train" would crop and flip x first (tests/test_parity.py)
    assert float(loss.detach()) == pytest.approx(
        0.0, abs=1e-10
    )  # visible patches are wrong by 10, and do not count


def test_mae_rejects_a_non_vit_backbone():
    with pytest.raises(ValueError, match="backbone.name=vit"):
        MAE(MAEConfig(backbone=SMALL_CONV), DataInfo(channels=1, image_size=16))


# ------------------------------------------------------------------------------------ inpainting


def test_inpainting_sees_no_hole_pixels_and_scores_only_the_hole():
    torch.manual_seed(0)
    method = Inpainting(
        InpaintingConfig(backbone=SMALL_CONV, decoder_width=8), DataInfo(channels=1, image_size=16)
    )
    x = torch.randn(2, 1, 16, 16)
    mask = method.masks(x)
    inputs = []
    method.context_encoder.forward = lambda inp: (inputs.append(inp), x + 5.0 * (1 - mask))[1]
    loss, _ = method.pretext_loss(x, "train")
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)  # exact in the hole, off by 5 outside it
    assert (inputs[0][mask.bool()] == 0).all() and torch.equal(inputs[0] * (1 - mask), x * (1 - mask))


def test_adversarial_gradients_reach_each_player_only_from_its_own_loss():
    torch.manual_seed(0)
    cfg = InpaintingConfig(
        backbone=SMALL_CONV, decoder_width=8, adversarial=True, adv_weight=0.5, disc_width=8
    )
    method = Inpainting(cfg, DataInfo(channels=1, image_size=16))
    x = torch.randn(4, 1, 16, 16)
    loss, parts = method.pretext_loss(x, "train")
    d_params = list(method.discriminator.parameters())
    g_params = list(method.context_encoder.parameters())
    total_d = torch.autograd.grad(loss, d_params, retain_graph=True)
    only_d = torch.autograd.grad(parts["d_loss"], d_params, retain_graph=True)
    for a, b in zip(total_d, only_d):
        assert torch.allclose(a, b, atol=1e-6)
    total_g = torch.autograd.grad(loss, g_params, retain_graph=True)
    g_objective = cfg.rec_weight * parts["rec_loss"] + cfg.adv_weight * parts["g_adv_loss"]
    only_g = torch.autograd.grad(g_objective, g_params, retain_graph=True)
    for a, b in zip(total_g, only_g):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in torch.autograd.grad(parts["g_adv_loss"], g_params))


# ------------------------------------------------------------------------------------ colorization


def test_colorization_needs_colour_and_says_which_data_to_use():
    with pytest.raises(ValueError, match="color_digits"):
        Colorization(ColorizationConfig(backbone=SMALL_CONV), DataInfo(channels=1, image_size=16))


@pytest.mark.parametrize("split_brain,loss", [(False, "classification"), (True, "regression")])
def test_colorization_counts_the_prior_and_embeds(split_brain, loss):
    torch.manual_seed(0)
    cfg = ColorizationConfig(backbone=SMALL_CONV, decoder_width=8, split_brain=split_brain, loss=loss)
    method = Colorization(cfg, DataInfo(channels=3, image_size=16, num_classes=0))
    x = torch.rand(3, 3, 16, 16)
    total, _ = method.pretext_loss(x, "train")
    total.backward()
    counted = 3 * 16 * 16 if loss == "classification" else 0  # one soft-encoded unit per training pixel
    assert float(method.ab_counts.sum()) == pytest.approx(counted, rel=1e-5)
    method.pretext_loss(x, "val")
    assert float(method.ab_counts.sum()) == pytest.approx(counted, rel=1e-5)  # validation does not count
    assert method.embed(x).shape == (3, 32 if split_brain else 16)
    shown = method.images_for_logging({"image": (x * 255).to(torch.uint8)})
    assert set(shown) >= {"input", "grey", "colorized"} and all(
        v.min() >= 0 and v.max() <= 1 for v in shown.values()
    )
    grey = shown["grey"]
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-3) and torch.allclose(
        grey[:, 1], grey[:, 2], atol=1e-3
    )


def test_colour_digits_hue_follows_the_class():
    from lightning_gen.data.color_digits import ColorDigitsConfig, ColorDigitsDataModule

    data = ColorDigitsDataModule(ColorDigitsConfig(image_size=8))
    train = data.load("train")
    assert train.images.shape[1:] == (3, 8, 8) and torch.equal(train.images, data.load("train").images)
    brightest = train.images.float().flatten(2).max(2).values / 255  # the ink colour of each image
    for digit in (0, 3, 6):
        ink = brightest[train.labels == digit].mean(0)
        other = brightest[train.labels == (digit + 5) % 10].mean(0)
        assert (ink - other).abs().max() > 0.2  # classes five hue-tenths apart have clearly different ink


def test_mae_runs_under_bf16_autocast():
    # bf16-mixed is the default precision on hardware with fast bf16: mask tokens must follow the dtype.
    mae = MAE(
        MAEConfig(backbone=TINY_VIT, decoder_width=16, decoder_heads=2, decoder_depth=1),
        DataInfo(channels=1, image_size=16, num_classes=0),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = mae.pretext_loss(torch.randn(2, 1, 16, 16), "train")
    loss.backward()
    assert torch.isfinite(loss.detach())


def test_checkpoint_hyperparameters_rebuild_the_nested_backbone_config():
    # load_method rebuilds a method from plain dicts; a nested section must come back as its dataclass.
    import dataclasses

    from lightning_gen.methods.ssl.jigsaw import Jigsaw, JigsawConfig

    cfg = JigsawConfig(backbone=SMALL_CONV, num_permutations=10, head_hidden=0)
    method = Jigsaw(cfg, DataInfo(channels=1, image_size=40, num_classes=10))
    rebuilt = Jigsaw(method.hparams["cfg"], method.hparams["data"])
    assert isinstance(rebuilt.cfg.backbone, BackboneConfig) and rebuilt.cfg == cfg
    assert dataclasses.asdict(rebuilt.cfg) == method.hparams["cfg"]


def test_mae_sincos_position_embeddings_are_the_closed_form_and_never_train():
    import math

    from lightning_gen.nets.vit import sincos_pos_embed

    grid, width = 3, 8
    table = sincos_pos_embed(grid, width)[0]
    assert table.shape == (1 + grid * grid, width) and not table[0].any()  # [CLS] position: zero

    def axis(p):  # width/4 = 2 frequencies: 1 and 10000^(-1/2)
        return [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]

    for row in range(grid):
        for col in range(grid):
            expected = torch.tensor(axis(col) + axis(row))
            torch.testing.assert_close(table[1 + row * grid + col], expected, rtol=0, atol=1e-6)

    backbone = BackboneConfig(name="vit", patch_size=4, depth=1, width=32, heads=2, pos_embed="sincos")
    mae = MAE(
        MAEConfig(backbone=backbone, decoder_width=16, decoder_depth=1, decoder_heads=2),
        DataInfo(channels=1, image_size=16, num_classes=10),
    )
    fixed = [mae.encoder.pos_embed, mae.decoder.pos_embed]
    torch.testing.assert_close(fixed[0].detach(), sincos_pos_embed(4, 32))
    torch.testing.assert_close(fixed[1].detach(), sincos_pos_embed(4, 16))
    optimized = {id(p) for group in mae.configure_optimizers().param_groups for p in group["params"]}
    assert all(not p.requires_grad and id(p) not in optimized for p in fixed)
    assert "encoder.pos_embed" in mae.state_dict()  # same checkpoint keys as the learned kind
