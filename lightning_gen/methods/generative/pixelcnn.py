"""PixelCNN (van den Oord et al. 2016): an autoregressive model of 8-bit subpixels.

    p(x) = prod_i p(x_i | x_<i),  i over pixels in raster order and channels R, G, B within a pixel

Masked convolutions (mask A, then B) make the logits of subpixel i depend on x_<i only, so one
forward pass gives every conditional and the exact NLL: a 256-way cross-entropy per subpixel,
reported in bits/dim. Sampling draws the subpixels one at a time (H x W x C network passes).

``net`` picks the network: ``pixelcnn`` (stacked masked convolutions, ``nets/pixelcnn.py``; its
receptive field has a blind spot up and to the right) or ``gated`` (the Gated PixelCNN of van den
Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders": vertical and horizontal
stacks that see the whole causal context, ``nets/gated_pixelcnn.py``). ``conditional=true`` (gated
only) models p(x | y) for the class label y, so ``bits_per_dim`` is then the conditional NLL and
``lgen sample class=...`` draws digits of one class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.losses.elbo import discrete_bits_per_dim
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.nets.gated_pixelcnn import GatedPixelCNN
from lightning_gen.nets.pixelcnn import PixelCNN as PixelCNNNet
from lightning_gen.registry import register_method


@dataclass
class PixelCNNConfig(GenerativeConfig):
    net: str = choice("pixelcnn", "pixelcnn", "gated")  # gated: vertical + horizontal stacks, no blind spot
    conditional: bool = False  # class-conditional p(x | y); needs net=gated
    width: int = 64
    blocks: int = 5  # pixelcnn: gated residual blocks after the 7x7 stem; gated: layers after the first
    kernel_size: int = 5
    temperature: float = bounded(1.0, 0, low_open=True)  # softmax temperature at sampling time
    lr: float = 1e-3
    ema_decay: float = 0.999


@register_method("pixelcnn", PixelCNNConfig)
class PixelCNN(GenerativeMethod):
    """PixelCNN: masked convolutions, gated blocks, 256-way softmax per subpixel, exact NLL in bits/dim."""

    config_class = PixelCNNConfig
    monitor = ("val/bits_per_dim", "min")
    sample_options = ("temperature",)

    def __init__(self, cfg: PixelCNNConfig, data=None):
        super().__init__(cfg, data)
        cfg, info = self.cfg, self.data_info  # cfg: a dataclass even when rebuilt from a checkpoint's dict
        if cfg.conditional and cfg.net != "gated":
            raise ConfigError(
                "method.conditional=true needs the gated network (set method.net=gated): "
                "the classic PixelCNN here is unconditional"
            )
        if cfg.width % info.channels:
            # the masks split the features into one group per colour channel (R, G, B within a pixel)
            lower = cfg.width - cfg.width % info.channels
            raise ConfigError(
                f"method.width={cfg.width} must be a multiple of the image channels ({info.channels}): "
                f"set method.width={lower} or {lower + info.channels}"
            )
        self.conditional = cfg.conditional and info.num_classes > 0
        if cfg.net == "gated":
            classes = info.num_classes if self.conditional else 0
            self.net = GatedPixelCNN(info.channels, cfg.width, cfg.blocks + 1, cfg.kernel_size, classes)
        else:
            self.net = PixelCNNNet(info.channels, cfg.width, cfg.blocks, cfg.kernel_size)
        self.setup_ema("net")

    @staticmethod
    def net_input(images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float() / 127.5 - 1.0

    def logits(self, net, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.net_input(images)
        return net(x, labels) if self.conditional else net(x)

    def nll(self, net, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact -log p(x) (or -log p(x | y) for a conditional model) per image in nats."""
        logits = self.logits(net, images, labels).float()  # (N, C, 256, H, W)
        return F.cross_entropy(logits.transpose(1, 2), images.long(), reduction="none").flatten(1).sum(1)

    def step(self, batch, stage: str) -> torch.Tensor:
        images = batch["image"]
        nll = self.nll(self.net, images, batch["label"] if self.conditional else None)
        dims = images[0].numel()
        loss = nll.mean() / dims
        sync, on_step = stage != "train", stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=sync)
        self.log(
            f"{stage}/bits_per_dim",
            discrete_bits_per_dim(nll, dims).mean(),
            on_step=on_step,
            on_epoch=True,
            prog_bar=stage == "val",
            sync_dist=sync,
        )
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, temperature=None):
        self.check_sample_options(cond, {})
        temperature = self.cfg.temperature if temperature is None else temperature
        info = self.data_info
        labels = self.sample_labels(n, cond)
        x = torch.zeros(
            n, info.channels, info.image_size, info.image_size, dtype=torch.uint8, device=self.device
        )
        with evaluating(self.sampling_net()) as net:
            for r in range(info.image_size):
                for c in range(info.image_size):
                    for ch in range(info.channels):
                        # rows below r cannot influence row r (masks), so the pass stops at row r:
                        # the same logits at half the average cost
                        logits = self.logits(net, x[:, :, : r + 1], labels)[:, ch, :, r, c]
                        probs = torch.softmax(logits.float() / temperature, dim=1)
                        if generator is not None:
                            draw = torch.multinomial(probs.to(generator.device), 1, generator=generator)
                        else:
                            draw = torch.multinomial(probs, 1)
                        x[:, ch, r, c] = draw.squeeze(1).to(x.device, torch.uint8)
        return x.float() / 255.0
