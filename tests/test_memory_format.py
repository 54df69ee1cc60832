"""Every custom layer hands back the memory format it was given (trainer.channels_last=true, the
default, runs conv nets in NHWC): a layer that returns NCHW into a channels_last network makes every
convolution after it convert back and forth. Each layer gets a channels_last input and must return
a channels_last output with the same values as for the NCHW input; 2-D outputs (features, logits)
only need the same values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gen.methods.ssl.cpc import CausalRowConv
from lightning_gen.methods.ssl.pretext import EncoderDecoder
from lightning_gen.nets import norm
from lightning_gen.nets.backbones import BackboneConfig, build_backbone
from lightning_gen.nets.conv import ConvDecoder, ConvEncoder
from lightning_gen.nets.dcgan import Discriminator, Generator
from lightning_gen.nets.gated_pixelcnn import GatedLayer, GatedPixelCNN
from lightning_gen.nets.norm import GlobalBatchNorm, SplitBatchNorm
from lightning_gen.nets.pixelcnn import GatedBlock, MaskedConv2d, PixelCNN
from lightning_gen.nets.unet import Attention, ResBlock, UNet

CL = torch.channels_last


def image(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def split_bn() -> nn.Module:
    layer = SplitBatchNorm(6)
    layer.num_splits = 4
    return layer


def run_both(layer: nn.Module, x: torch.Tensor, *rest):
    """(output for an NCHW input, output for the same values in channels_last, the layer's weights
    converted as `trainer.channels_last` converts the method); a latent (2-D) input stays as it is."""
    torch.manual_seed(0)
    plain = layer(x.contiguous(), *rest)
    torch.manual_seed(0)
    nhwc = [t.contiguous(memory_format=CL) if t.ndim == 4 else t for t in (x, *rest)]
    last = layer.to(memory_format=CL)(*nhwc)
    return plain, last


def outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


LAYERS = {
    "SplitBatchNorm": (split_bn, lambda: [image(0, 8, 6, 5, 5)]),
    "MaskedConv2d": (lambda: MaskedConv2d(3, 6, 3, "A", 3), lambda: [image(2, 2, 3, 6, 6)]),
    "GatedBlock": (lambda: GatedBlock(6, 3, 3), lambda: [image(3, 2, 6, 6, 6)]),
    "GatedLayer": (
        lambda: GatedLayer(6, 6, 3, 3, first=False),
        lambda: [image(4, 2, 6, 6, 6), image(5, 2, 6, 6, 6)],
    ),
    "ResBlock": (lambda: ResBlock(8, 16, 32, 0.0), lambda: [image(6, 2, 8, 8, 8), image(7, 2, 32)]),
    "Attention": (lambda: _nonzero_out(Attention(8)), lambda: [image(8, 2, 8, 4, 4)]),
    "UNet": (
        lambda: _nonzero_out(UNet(3, 8, 8, (1, 2), 1, (4,), 0.0, 0)),
        lambda: [image(9, 2, 3, 8, 8), torch.tensor([3.0, 500.0])],
    ),
    # 2-D (latent) inputs, 2-D or 5-D outputs: the values must not depend on the format
    "ConvDecoder": (lambda: ConvDecoder(8, 3, 16, width=8), lambda: [image(10, 2, 8)]),
    "Generator": (lambda: Generator(8, 3, 16, 8, 0), lambda: [image(11, 2, 8)]),
    "CausalRowConv": (lambda: CausalRowConv(6, 8), lambda: [image(12, 2, 6, 4, 4)]),
    "EncoderDecoder": (
        lambda: EncoderDecoder(BackboneConfig(name="conv", conv_width=8, conv_dim=16), 1, 2, 16, 8),
        lambda: [image(13, 2, 1, 16, 16)],
    ),
    "PixelCNN": (lambda: PixelCNN(3, 6, 1, 3), lambda: [image(14, 2, 3, 6, 6)]),
    "GatedPixelCNN": (lambda: GatedPixelCNN(3, 6, 2, 3, 0), lambda: [image(15, 2, 3, 6, 6)]),
    "ConvEncoder": (lambda: ConvEncoder(3, 16, 8, width=8), lambda: [image(16, 2, 3, 16, 16)]),
    "Discriminator": (lambda: Discriminator(3, 16, 8, 0), lambda: [image(17, 2, 3, 16, 16)]),
    "conv backbone (local crop)": (
        lambda: build_backbone(BackboneConfig(name="conv", conv_width=8, conv_dim=16), 3, 16),
        lambda: [image(18, 2, 3, 8, 8)],
    ),
    "resnet18 backbone": (
        lambda: build_backbone(BackboneConfig(name="resnet18", cifar_stem=True, resnet_width=8), 3, 16),
        lambda: [image(19, 2, 3, 16, 16)],
    ),
}


def _nonzero_out(module: nn.Module) -> nn.Module:
    """The U-Net zero-initialises its output convolutions; give them weights so the check sees something."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.abs().sum():
            nn.init.normal_(m.weight, std=0.1)
    return module


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_preserves_channels_last(name):
    build, inputs = LAYERS[name]
    x, *rest = inputs()
    plain, last = run_both(build(), x, *rest)
    for a, b in zip(outputs(plain), outputs(last)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        if b.ndim == 4 and x.ndim == 4:
            assert b.is_contiguous(memory_format=CL), f"{name} returned NCHW for a channels_last input"


def test_split_batchnorm_statistics_are_those_of_each_sub_batch_in_either_format():
    x = image(20, 8, 6, 5, 5).contiguous(memory_format=CL)
    y = split_bn()(x)
    for g in range(4):  # sub-batch g = samples g, g + 4: normalised with their own statistics
        part = x[g::4]
        expected = (part - part.mean((0, 2, 3), keepdim=True)) / (
            part.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
        ).sqrt()
        torch.testing.assert_close(y[g::4], expected, rtol=1e-4, atol=1e-5)


def test_global_batchnorm_preserves_channels_last(monkeypatch):
    """The all-rank path (a one-rank gather is the identity; the 2-process equality is tests/test_ssl_distributed.py)."""
    monkeypatch.setattr(norm, "is_distributed", lambda: True)
    monkeypatch.setattr(norm, "gather_with_grad", lambda t: t)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    layer = GlobalBatchNorm(6)
    x = image(21, 4, 6, 5, 5)
    plain, last = run_both(layer, x)
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        plain, nn.functional.batch_norm(x, None, None, training=True), rtol=1e-4, atol=1e-5
    )
    assert last.is_contiguous(memory_format=CL)
