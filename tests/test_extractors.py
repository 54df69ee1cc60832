"""Feature extractors (``lightning_gen/eval/extractors.py``) against independent implementations.

- InceptionV3 with randomly initialised weights saved to a file: the project's pool3 features and
  IS logits of float images (its own 8-bit quantisation and ``legacy`` resize) equal torch-fidelity's
  ``FeatureExtractorInceptionV3`` loaded from the same file and given the 8-bit images.
- ``clean`` resizing equals PIL's bicubic filter with antialiasing (clean-fid's resize), up and down.
- DINOv2 in the official layout (random weights) equals timm's DINOv2 ViT loaded through timm's own
  converter of official checkpoints: with registers at another grid (resized position embeddings),
  without registers at the trained grid.
- ``timm:<name>@<file>`` (with and without classifier) and ``ckpt:<path>`` give the network's own features.
- A missing file names the path and where the weights come from; a file of another architecture is
  one ConfigError.
"""

from __future__ import annotations

import unittest.mock as mock

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gen.config import ConfigError
from lightning_gen.eval.extractors import ExtractorSettings, load_extractor, quantize, resize_images
from lightning_gen.methods.base import DataInfo
from lightning_gen.nets.dinov2 import DinoV2, DinoV2Config

CIFAR = DataInfo(name="cifar10", image_size=32, channels=3, num_classes=10)


def random_inception(path) -> None:
    """torch-fidelity's FID InceptionV3 with random weights (He-initialised convolutions, so that
    activations keep their scale through the 94 layers) saved as a state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    no_download = mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None)
    keep_init = mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
    with no_download, keep_init:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def test_inception_features_equal_torch_fidelity_in_legacy_mode(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path / "inception.pth"
    random_inception(path)
    settings = ExtractorSettings(inception_path=str(path), resize="legacy")
    ours, provenance = load_extractor("inception", CIFAR, settings)
    assert provenance["resize"] == "legacy" and provenance["input_size"] == 299
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # not on the 8-bit grid
    with torch.no_grad():
        features, logits = ours.features_and_logits(images)
        reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(path))
        their_features, their_logits = reference((images * 255).round().to(torch.uint8))
    assert torch.allclose(features, their_features, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits, their_logits, rtol=1e-5, atol=1e-6)
    assert features.std() > 0.05 and not torch.allclose(features[0], features[1])  # not a degenerate net


@pytest.mark.parametrize("size,out", [(32, 299), (64, 17)])
def test_clean_resize_equals_pil_bicubic_with_antialias(size, out):
    from PIL import Image

    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    ours = resize_images(quantize(images), out, "clean").numpy()
    pixels = quantize(images).to(torch.uint8).numpy()

    def pil(channel: np.ndarray) -> np.ndarray:  # clean-fid: each channel as a float image, then clipped
        return np.asarray(
            Image.fromarray(channel.astype(np.float32), mode="F").resize((out, out), Image.BICUBIC)
        )

    reference = np.stack([np.stack([pil(c) for c in image]) for image in pixels]).clip(0, 255)
    assert np.abs(ours - reference).max() < 1e-3  # of 255: float32 rounding
    bilinear = resize_images(quantize(images), out, "antialias").numpy()
    assert np.abs(bilinear - reference).max() > 1  # another filter is told apart


def official_dinov2(registers: int, grid: int) -> dict[str, torch.Tensor]:
    """A small DINOv2 ViT's state dict in the official layout, random weights (layer scale far from 1e-5)."""
    torch.manual_seed(registers)
    net = DinoV2(DinoV2Config(width=128, depth=2, mlp_hidden=256, registers=registers, grid=grid))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.endswith("gamma") else 0.2) + name.endswith("gamma"))
    return net.state_dict()


@pytest.mark.parametrize("registers,size", [(4, 42), (0, 56)])
def test_dinov2_equals_timm_loading_the_official_layout(tmp_path, registers, size):
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    state = official_dinov2(registers, grid=4)
    assert {"cls_token", "pos_embed", "mask_token", "blocks.1.ls2.gamma", "blocks.0.attn.qkv.weight"} <= set(
        state
    )
    assert ("register_tokens" in state) == bool(registers)
    timm_vit = VisionTransformer(
        img_size=56, patch_size=14, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2, init_values=1.0,
        num_classes=0, reg_tokens=registers, no_embed_class=bool(registers), dynamic_img_size=True,
    )  # fmt: skip
    timm_vit.load_state_dict(checkpoint_filter_fn(dict(state), timm_vit))  # timm's converter of DINOv2 files
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    info = DataInfo(name="fashion_mnist", image_size=28, channels=1)
    extractor, provenance = load_extractor("dinov2", info, ExtractorSettings(dinov2_path=str(path)))
    assert (
        provenance["arch"] == f"dinov2_vit128w2d14{'_reg' if registers else ''}"
        and provenance["name"] == "dinov2"
    )
    x = torch.randn(3, 3, size, size)  # 3 x 3 patches: position embeddings resized from the 4 x 4 grid
    with torch.no_grad():
        ours, theirs = extractor.backbone.net(x), timm_vit(x)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with torch.no_grad():
        assert extractor(torch.rand(2, 1, 28, 28)).shape == (2, 128)  # grey 28 px -> RGB 224 px


def test_timm_and_checkpoint_extractors_give_the_networks_own_features(tmp_path):
    import timm
    from safetensors.torch import save_file

    from lightning_gen.methods.ssl.simclr import SimCLR, SimCLRConfig

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False).eval()
    torch.save(model.state_dict(), tmp_path / "resnet10t.pth")
    headless = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    save_file(headless.state_dict(), str(tmp_path / "headless.safetensors"))
    images = torch.rand(2, 3, 32, 32)
    extractor, provenance = load_extractor(f"timm:resnet10t@{tmp_path / 'resnet10t.pth'}", CIFAR)
    assert provenance["name"] == "timm_resnet10t" and extractor.num_classes == 1000
    size = extractor.backbone.input_size
    x = extractor.backbone.normalise(resize_images(quantize(images), size, "clean"))
    with torch.no_grad():
        features, logits = extractor.features_and_logits(images)
        assert torch.allclose(
            features, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5
        )
        assert torch.allclose(logits, model(x), atol=1e-5)
    bare, _ = load_extractor(f"timm:resnet10t@{tmp_path / 'headless.safetensors'}", CIFAR)
    assert bare.num_classes == 0 and bare.num_features == 512

    method = SimCLR(SimCLRConfig(), DataInfo(name="cifar10", image_size=32, channels=3)).eval()
    ckpt = tmp_path / "simclr.ckpt"
    torch.save({"hyper_parameters": dict(method.hparams), "state_dict": method.state_dict()}, ckpt)
    from_ckpt, provenance = load_extractor(f"ckpt:{ckpt}", CIFAR)
    pixels = quantize(images).to(torch.uint8)
    with torch.no_grad():  # at the method's resolution: its own preprocessing of the 8-bit images
        assert torch.allclose(from_ckpt(images), method.embed_images(pixels), atol=1e-5)
    assert provenance["arch"] == "simclr" and provenance["extractor"] == f"ckpt:{ckpt}"


def test_missing_and_wrong_files_are_one_clear_error(tmp_path):
    import timm

    settings = ExtractorSettings(
        inception_path=str(tmp_path / "nope.pth"), dinov2_path=str(tmp_path / "dinov2_vits14_pretrain.pth")
    )
    with pytest.raises(ConfigError, match=r"nope\.pth: download .*weights-inception-2015-12-05"):
        load_extractor("inception", CIFAR, settings)
    with pytest.raises(ConfigError, match=r"dinov2_vits14_pretrain\.pth: download .*dl\.fbaipublicfiles"):
        load_extractor("dinov2", CIFAR, settings)
    with pytest.raises(ConfigError, match="did you mean 'inception'"):
        load_extractor("incepton", CIFAR, settings)
    resnet = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), resnet)
    with pytest.raises(ConfigError, match=r"does not hold the FID InceptionV3's weights: .*Missing key"):
        load_extractor("inception", CIFAR, ExtractorSettings(inception_path=str(resnet)))
    with pytest.raises(
        ConfigError, match="does not hold a DINOv2 ViT in the official layout: .*no 'cls_token'"
    ):
        load_extractor("dinov2", CIFAR, ExtractorSettings(dinov2_path=str(resnet)))
    with pytest.raises(ConfigError, match="does not hold weights of timm's resnet18"):
        load_extractor(f"timm:resnet18@{resnet}", CIFAR)
    with pytest.raises(ConfigError, match="does not hold a checkpoint written by lgen train"):
        load_extractor(f"ckpt:{resnet}", CIFAR)
    with pytest.raises(ConfigError, match="there is no domain feature extractor for 'cifar10'"):
        load_extractor("domain", CIFAR)
