"""PatchGAN discriminator (Isola et al. 2017, pix2pix, arXiv:1611.07004).

A fully convolutional classifier whose output is a map of logits, one per overlapping input patch:
it judges local texture and sharpness, which is what a reconstruction loss alone leaves blurry
(the autoencoders of VQGAN and latent diffusion use it for that). ``layers`` stride-2 4x4 convs
(the first without normalisation), one stride-1 4x4 conv, then a stride-1 4x4 conv to one channel;
LeakyReLU(0.2), BatchNorm, weights ~ N(0, 0.02). Each logit sees a patch of
``receptive_field(layers)`` pixels (70 for the paper's 3 layers; 34 for 2, 16 for 1).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_gen.nets.dcgan import dcgan_init


def receptive_field(layers: int) -> int:
    """Side in pixels of the input patch one output logit sees."""
    size = 1
    for stride in reversed([2] * layers + [1, 1]):  # every conv is 4x4
        size = (size - 1) * stride + 4
    return size


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(channels, out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> logits (N, 1, H', W'), one per patch."""
        return self.net(x)
