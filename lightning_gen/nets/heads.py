"""Projection / prediction MLP heads (SimCLR g(·), MoCo v2/v3) and DINO's head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Module):
    """``layers`` linear layers in -> hidden -> ... -> out, with BN + ReLU between them.

    ``layers=1`` is a linear projection (MoCo v1); ``last_bn`` adds an affine-free BN on the output
    (MoCo v3's projector and ViT predictor, SimSiam's projector); ``last_bn_scale`` gives that BN a
    learned scale but no shift (SimCLR's projection head: BN with ``center=False``); ``bn=False`` gives
    MoCo v2's plain MLP; ``last_bias=False`` drops the output bias (BYOL's and MoCo v3's heads have none;
    in Barlow Twins and VICReg the loss standardises each dimension over the batch anyway, so a bias
    would be a parameter without gradient). A linear layer followed by BN never has a bias.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        layers: int = 2,
        bn: bool = True,
        last_bn: bool = False,
        last_bias: bool = True,
        last_bn_scale: bool = False,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a head needs at least one layer, got layers={layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == layers - 1
            bias = not (bn and not last) and not (last and (last_bn or not last_bias))
            blocks.append(nn.Linear(a, b, bias=bias))
            if not last:
                blocks += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)] if bn else [nn.ReLU(inplace=True)]
            elif last_bn:
                norm = nn.BatchNorm1d(b, affine=last_bn_scale)
                if last_bn_scale:
                    norm.register_parameter("bias", None)  # a scale γ, no shift β
                blocks.append(norm)
        self.net = nn.Sequential(*blocks)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 normalisation -> weight-normalised linear to K prototypes.

    The last layer's direction is learned with its norm fixed to 1 (weight norm with g frozen), as
    in DINO; ``last_layer`` is exposed so the method can freeze it during the first epoch.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
