"""The convolutional VQ autoencoder of VQGAN (Esser et al. 2021, arXiv:2012.09841): images <-> code indices.

The encoder and decoder are those of the latent-diffusion autoencoder (``nets/kl_autoencoder.py``:
residual levels, stride-2 downsampling, attention in the middle block), the encoder with C output
channels instead of a mean and a log-variance. Between them: a 1x1 conv to the quantiser's dimension,
the quantiser (``nets/quantizers.py``: a codebook or FSQ), a 1x1 conv back to C channels.

    x (N, c, H, W) -> z_e (N, D, H/f, W/f) -> indices (N, H/f, W/f) -> z_q -> x^ (N, c, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_gen.nets.kl_autoencoder import Decoder, Encoder
from lightning_gen.nets.quantizers import Quantized


class VQAutoencoder(nn.Module):
    def __init__(
        self,
        channels: int,
        widths: tuple[int, ...],
        layers_per_block: int,
        latent_channels: int,
        groups: int,
        attention: bool,
        quantizer: nn.Module,
    ):
        super().__init__()
        bad = [w for w in widths if w % groups]
        if bad:
            raise ValueError(f"widths {bad} are not multiples of the {groups} GroupNorm groups")
        self.downsampling_factor = 2 ** (len(widths) - 1)
        args = (widths, layers_per_block, latent_channels, groups, attention)
        self.encoder = Encoder(channels, *args, double_z=False)
        self.quant_conv = nn.Conv2d(latent_channels, quantizer.dim, 1)
        self.quantizer = quantizer
        self.post_quant_conv = nn.Conv2d(quantizer.dim, latent_channels, 1)
        self.decoder = Decoder(channels, *args)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def quantize(self, x: torch.Tensor, seed: int = 0) -> Quantized:
        """Images in [-1, 1] -> the quantiser's output (codes, indices, commitment loss, statistics)."""
        return self.quantizer(self.quant_conv(self.encoder(x)), seed)

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, Quantized]:
        q = self.quantize(x, seed)
        return self.decode_quantized(q.quantized), q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> indices (N, H/f, W/f)."""
        return self.quantize(x).indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (N, h, w) -> images in [-1, 1] (not clamped)."""
        return self.decode_quantized(self.quantizer.embed(indices))

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight
