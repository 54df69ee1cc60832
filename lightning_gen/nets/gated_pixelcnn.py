"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

A stack of masked k x k convolutions (``nets/pixelcnn.py``) cannot see part of the context: each
layer reaches at most one column further right per row up, so pixels far up and to the right of
the current one never influence it (the *blind spot*). The gated PixelCNN splits the network in two
stacks that together cover the whole causal context:

- the **vertical stack** v sees every pixel of the rows *strictly above* (a (k//2) x k convolution of
  the rows above in the first layer, then (k//2 + 1) x k convolutions of v's own rows up to the
  current one, which are themselves strictly above);
- the **horizontal stack** h sees the pixels to the left in the current row (1 x (k//2 + 1)
  convolutions), plus v at the same position through a 1 x 1 link, so nothing above is out of reach.

Both stacks use the gated activation y = tanh(W_f * x + V_f e_y) ⊙ σ(W_g * x + V_g e_y), where e_y
is a learned embedding of the class label (class-conditional model) added as a bias to every
layer; the horizontal stack is residual. Colour channels follow the order R, G, B within a pixel:
features are split into C groups, and at the current pixel the horizontal convolution lets group g
see input groups < g in the first layer (mask A) and <= g afterwards (mask B). The vertical stack
needs no channel masks: everything it sees is in earlier rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.nets.pixelcnn import MaskedConv2d, channel_groups


def gate(pre: torch.Tensor) -> torch.Tensor:
    a, b = pre.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks: (v, h, class bias) -> (v', h')."""

    def __init__(self, in_ch: int, width: int, kernel_size: int, data_channels: int, first: bool):
        super().__init__()
        half = kernel_size // 2
        self.first, self.half = first, half
        # first layer: rows r-half .. r-1 of the image; later: rows r-half .. r of v (already strictly above)
        self.v_height, self.v_shift = (half, 1) if first else (half + 1, 0)
        self.vertical = nn.Conv2d(in_ch, 2 * width, (self.v_height, kernel_size))
        self.v_to_h = nn.Conv2d(2 * width, 2 * width, 1)
        self.horizontal = nn.Conv2d(in_ch, 2 * width, (1, half + 1))  # columns c-half .. c
        # channel groups of the gate's two halves (tanh | sigmoid) line up with the feature groups
        out_groups = channel_groups(width, data_channels).repeat(2)
        in_groups = channel_groups(in_ch, data_channels)
        centre = (
            in_groups[None, :] < out_groups[:, None] if first else in_groups[None, :] <= out_groups[:, None]
        )
        mask = torch.ones(2 * width, in_ch, 1, half + 1)
        mask[:, :, 0, half] = (
            centre.float()
        )  # the current pixel: only earlier channels (mask A) / also own (B)
        self.register_buffer("h_mask", mask, persistent=False)
        self.h_out = MaskedConv2d(width, width, 1, "B", data_channels)

    def forward(self, v, h, v_bias=None, h_bias=None):
        height = v.shape[2]
        padded = F.pad(v, (self.half, self.half, self.v_height - 1 + self.v_shift, 0))
        v_pre = self.vertical(padded)[:, :, :height]
        h_pre = F.conv2d(
            F.pad(h, (self.half, 0, 0, 0)), self.horizontal.weight * self.h_mask, self.horizontal.bias
        )
        h_pre = h_pre + self.v_to_h(v_pre)  # v at (r, c) depends on rows above r only
        if v_bias is not None:
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        h_new = self.h_out(gate(h_pre))
        return gate(v_pre), (h_new if self.first else h + h_new)


class GatedPixelCNN(nn.Module):
    """x (N, C, H, W) in [-1, 1], labels (N,) -> logits (N, C, 256, H, W), with no blind spot.

    ``num_classes`` > 0 makes it class-conditional; label -1 (unlabeled) uses a learned null class.
    ``layers`` gated layers (the first reads the image), then ReLU, 1 x 1, ReLU, 1 x 1 to 256 logits.
    """

    def __init__(
        self, data_channels: int, width: int = 64, layers: int = 6, kernel_size: int = 5, num_classes: int = 0
    ):
        super().__init__()
        if width % data_channels:
            raise ValueError(
                f"width {width} must be divisible by the number of image channels {data_channels}"
            )
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"the gated PixelCNN needs an odd kernel_size >= 3, got {kernel_size}")
        self.data_channels, self.width, self.num_classes = data_channels, width, num_classes
        self.layers = nn.ModuleList(
            GatedLayer(data_channels if i == 0 else width, width, kernel_size, data_channels, first=i == 0)
            for i in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            MaskedConv2d(width, width, 1, "B", data_channels),
            nn.ReLU(),
            MaskedConv2d(width, 256 * data_channels, 1, "B", data_channels),
        )
        if num_classes > 0:  # one bias per layer for each stack's gate; row num_classes is the null class.
            # Created last, so the weights above are initialised alike with and without conditioning
            self.class_bias = nn.Embedding(num_classes + 1, layers * 4 * width)
            nn.init.zeros_(self.class_bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        biases = [(None, None)] * len(self.layers)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("this gated PixelCNN is class-conditional: pass the labels")
            labels = torch.where(labels >= 0, labels, torch.full_like(labels, self.num_classes))
            chunks = self.class_bias(labels).view(n, len(self.layers), 2, 2 * self.width, 1, 1).unbind(1)
            biases = [(b[:, 0], b[:, 1]) for b in chunks]
        v = hs = x
        for layer, (v_bias, h_bias) in zip(self.layers, biases):
            v, hs = layer(v, hs, v_bias, h_bias)
        return self.head(hs).view(n, c, 256, h, w)
