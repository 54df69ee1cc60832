"""Backbones for representation learning, built by name: ResNet-18/50 (optional CIFAR stem), ViT, small conv.

Every backbone maps float images (N, C, H, W) to features (N, out_dim) and exposes ``out_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from lightning_gen.config import bounded, choice
from lightning_gen.nets.conv import ConvEncoder
from lightning_gen.nets.deterministic import adaptive_avg_pool2d
from lightning_gen.nets.vit import VisionTransformer


@dataclass
class BackboneConfig:
    name: str = choice("resnet18", "resnet18", "resnet50", "vit", "conv")
    cifar_stem: bool | None = None  # 3x3 stride-1 first conv, no max-pool; None: on for images <= 64 px
    zero_init_residual: bool = True
    # ResNet normalisation. "layer" (GroupNorm with one group: statistics over C, H, W of each sample)
    # keeps samples from seeing each other through batch statistics; CPC v2 needs it, because with
    # BatchNorm the patches of one image can pass information to the patch codes they are asked to
    # predict (Hénaff et al. 2020, "layer normalization")
    norm: str = choice("batch", "batch", "layer")
    # Channels of the first ResNet stage (stages: w, 2w, 4w, 8w; features 8w, x4 for ResNet-50). 64 is
    # the paper's; 16 or 32 give narrow ResNets (1/16, 1/4 of the FLOPs) that train on a CPU.
    resnet_width: int = 64
    # ViT
    patch_size: int = 4
    depth: int = 6
    width: int = 192
    heads: int = 3
    mlp_ratio: float = bounded(4.0, 0, low_open=True)  # ViT MLP width / block width
    # learned; sincos: fixed 2-D sine-cosine embeddings, MAE's layout (column first); sincos_rows_first: MoCo v3's
    pos_embed: str = choice("learned", "learned", "sincos", "sincos_rows_first")
    # stochastic depth of the last block, rising linearly from 0 at the first (DINO's student: 0.1)
    drop_path: float = bounded(0.0, 0, 1)
    # 1e-6 as the timm ViTs of MoCo v3, DINO and MAE (PyTorch's default is 1e-5)
    layer_norm_eps: float = bounded(1e-6, 0)
    # weights as an official ViT initialises them (nets/vit.py): torch (PyTorch's), moco_v3, dino or mae
    vit_init: str = choice("torch", "torch", "moco_v3", "dino", "mae")
    # small conv encoder
    conv_width: int = 32
    conv_dim: int = 256


class ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet with ``width`` channels in the first stage instead of 64 (every stage scaled
    alike), built by torchvision's own layer code, so modules and initialisation are the paper's."""

    def __init__(self, block, layers: list[int], width: int, **kwargs):
        self.scale = width / 64
        super().__init__(block, layers, **kwargs)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = kwargs.get("norm_layer", nn.BatchNorm2d)(width)
        self.fc = nn.Linear(8 * width * block.expansion, self.fc.out_features)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False):
        if planes == 64:  # the first stage: the stem's output has `width` channels, not 64
            self.inplanes = round(64 * self.scale)
        return super()._make_layer(block, round(planes * self.scale), blocks, stride, dilate)


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier; the CIFAR stem keeps 32x32 inputs from collapsing."""

    def __init__(
        self,
        depth: int,
        in_channels: int,
        cifar_stem: bool,
        zero_init_residual: bool,
        norm: str = "batch",
        width: int = 64,
    ):
        super().__init__()
        norm_layer = {"batch": nn.BatchNorm2d, "layer": lambda channels: nn.GroupNorm(1, channels)}[norm]
        options = dict(zero_init_residual=zero_init_residual, norm_layer=norm_layer)
        if width == 64:
            factory = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
            net = factory(weights=None, **options)
        else:
            block, layers = {
                18: (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                50: (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
            }[depth]
            net = ScaledResNet(block, layers, width, **options)
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBackbone(nn.Module):
    """Small conv encoder; inputs of another size than ``image_size`` (multi-crop local views) are
    pooled to the 4x4 map its linear layer expects."""

    def __init__(self, in_channels: int, image_size: int, width: int, out_dim: int):
        super().__init__()
        self.encoder = ConvEncoder(in_channels, image_size, out_dim, width=width)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder.features(x)
        if h.shape[-2:] != (4, 4):
            h = adaptive_avg_pool2d(h, 4)  # deterministic under trainer.deterministic
        return self.encoder.head(h.flatten(1))


def encoder_stages(net: nn.Module) -> list[list[nn.Module | nn.Parameter]]:
    """The stages of an encoder, in the order its input goes through them (RotNet's "blocks").

    ResNet: the stem (first conv and norm), then layer1 .. layer4. ViT: the patch embedding with the
    [CLS] token and the position embedding, each transformer block, the final norm. The small conv
    encoder: each conv block (conv, norm, activation), then its linear map. ``lgen eval finetune
    freeze=k`` keeps the first k of them fixed (Gidaris et al. 2018's semi-frozen evaluation)."""
    if isinstance(net, ResNetBackbone):
        r = net.net
        return [[r.conv1, r.bn1], [r.layer1], [r.layer2], [r.layer3], [r.layer4]]
    if isinstance(net, VisionTransformer):
        return [[net.patch_embed, net.cls_token, net.pos_embed], *([b] for b in net.blocks), [net.norm]]
    if isinstance(net, ConvBackbone):
        net = net.encoder
    if isinstance(net, ConvEncoder):
        layers = list(net.features)
        return [layers[i : i + 3] for i in range(0, len(layers), 3)] + [[net.head]]
    raise ValueError(
        f"{type(net).__name__} has no known stages: freezing blocks needs a ResNet, ViT or conv encoder"
    )


def build_backbone(cfg: BackboneConfig, in_channels: int, image_size: int) -> nn.Module:
    if cfg.name in ("resnet18", "resnet50"):
        stem = cfg.cifar_stem if cfg.cifar_stem is not None else image_size <= 64
        return ResNetBackbone(
            int(cfg.name[6:]), in_channels, stem, cfg.zero_init_residual, cfg.norm, cfg.resnet_width
        )
    if cfg.name == "vit":
        return VisionTransformer(
            image_size=image_size,
            patch_size=cfg.patch_size,
            in_channels=in_channels,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            pos_embed=cfg.pos_embed,
            drop_path=cfg.drop_path,
            layer_norm_eps=cfg.layer_norm_eps,
            init=cfg.vit_init,
        )
    if cfg.name == "conv":
        return ConvBackbone(in_channels, image_size, cfg.conv_width, cfg.conv_dim)
    raise ValueError(f"unknown backbone {cfg.name!r}: resnet18, resnet50, vit or conv")
