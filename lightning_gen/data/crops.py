"""Random resized crops of the whole original image, cut where the pixels are decoded.

The SSL recipes crop a random fraction ``scale`` of the *original* image's area with a random
aspect ratio in ``ratio`` (SimCLR, MoCo: 8-100 % / 20-100 %, ratio 3/4-4/3; DINO: global crops
40-100 %, local crops 5-40 %). Datasets that decode per item (``data=folder`` with
``in_memory=false``, ``data=shards``) therefore cut the crops of every view from the whole image:

- ``random_resized_crop_box`` follows torchvision's ``RandomResizedCrop.get_params``: up to 10 tries
  of (area ~ U(scale) x image area, log aspect ~ U(log ratio)) until the box fits, else the largest
  centred box with the aspect ratio clamped into ``ratio``.
- Every box is drawn from a generator seeded by (seed, epoch, sample index, view), never from a
  worker's RNG: the crops do not depend on the number of workers or processes, and a resumed run
  cuts the same crops as an uninterrupted one.
- A training item carries one uint8 tensor per view under ``"views"`` (global crops first, then
  local ones), which ``Views`` then flips and colours on the device; or, to decode on the GPU, the
  encoded bytes and the crop boxes (``"encoded"``, ``"boxes"``), which ``device_views`` turns into the
  same ``"views"`` after the batch is on the device.
- Evaluation uses ``center_box``: the centred square that "resize the short side to size x
  resize_scale, centre-crop size" keeps (256/224 for ImageNet), resized to ``size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

from lightning_gen.data import decode
from lightning_gen.data.decode import Box

CROP_STREAM = 0x63726F70  # separates crop seeds from any other use of (seed, epoch, index)


@dataclass(frozen=True)
class CropSpec:
    """One view's random resized crop: output side, area fraction and aspect-ratio ranges."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]


def crop_generator(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    """The generator of one view of one sample in one epoch (SeedSequence hashes the whole tuple)."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, CROP_STREAM, epoch, index, view]))
    )


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> Box:
    """torchvision's RandomResizedCrop box: 10 tries of a random area and aspect ratio, then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return Box(top, left, h, w)
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return Box((height - h) // 2, (width - w) // 2, h, w)


def center_box(height: int, width: int, size: int, resize_scale: float) -> Box:
    """The part of the image that "resize short side to round(size * resize_scale), centre-crop size" keeps."""
    resized_short = int(round(size * resize_scale))
    side = max(1, min(height, width, int(round(min(height, width) * size / resized_short))))
    return Box((height - side) // 2, (width - side) // 2, side, side)


def view_boxes(
    height: int, width: int, specs: Sequence[CropSpec], seed: int, epoch: int, index: int
) -> list[Box]:
    return [
        random_resized_crop_box(height, width, spec.scale, spec.ratio, crop_generator(seed, epoch, index, v))
        for v, spec in enumerate(specs)
    ]


class ItemMaker:
    """Turns one encoded image into a training or evaluation item (picklable, runs in workers).

    ``mode``: ``"views"`` decodes and cuts one crop per spec; ``"encoded"`` draws the boxes only and
    leaves decoding and cropping to the device (non-JPEG images are decoded here and travel as
    pixels); ``"image"`` is the evaluation view (centre crop), also used to train methods that make
    no crop-based views.
    """

    def __init__(
        self,
        mode: str,
        size: int,
        channels: int = 3,
        resize_scale: float = 1.143,
        specs: Sequence[CropSpec] = (),
        seed: int = 0,
    ):
        if mode not in ("views", "encoded", "image"):
            raise ValueError(f"unknown item mode {mode!r}")
        if mode != "image" and not specs:
            raise ValueError(f"mode {mode!r} needs crop specs")
        self.mode, self.size, self.channels, self.resize_scale = mode, size, channels, resize_scale
        self.specs, self.seed = tuple(specs), seed

    def __call__(self, data, label: int, index: int, epoch: int) -> dict:
        item: dict = {
            "label": torch.tensor(label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.mode == "image":
            image = decode.decode(data, self.channels)
            item["image"] = decode.resize_box(
                image, center_box(*image.shape[-2:], self.size, self.resize_scale), self.size
            )
            return item
        encoded = decode.as_byte_tensor(data)
        if self.mode == "encoded" and decode.is_jpeg(encoded):
            height, width = decode.image_size(encoded)
            source = encoded  # decoded on the device, with the other JPEGs of the batch
        else:
            source = decode.decode(encoded, self.channels)
            height, width = source.shape[-2:]
        boxes = view_boxes(height, width, self.specs, self.seed, epoch, index)
        if self.mode == "encoded":
            item["encoded"], item["boxes"] = source, torch.tensor(boxes, dtype=torch.long)
        else:
            item["views"] = [
                decode.resize_box(source, box, spec.size) for box, spec in zip(boxes, self.specs)
            ]
        return item


def collate(items: list[dict]) -> dict:
    """default_collate, except ``"encoded"`` (images of different byte lengths or sizes) stays a list."""
    encoded = [item.pop("encoded") for item in items] if "encoded" in items[0] else None
    batch = default_collate(items)
    if encoded is not None:
        batch["encoded"] = encoded
    return batch


def device_views(
    encoded: list[torch.Tensor],
    boxes: torch.Tensor,
    specs: Sequence[CropSpec],
    device: torch.device,
    channels: int = 3,
) -> list[torch.Tensor]:
    """Decode a batch on ``device`` and cut every view's crops there: one uint8 (N, C, S, S) per view."""
    images = decode.decode_on_device(encoded, torch.device(device), channels)
    boxes = boxes.tolist()
    return [
        torch.stack(
            [decode.resize_box(image, Box(*boxes[i][v]), spec.size) for i, image in enumerate(images)]
        )
        for v, spec in enumerate(specs)
    ]
