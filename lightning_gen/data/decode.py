"""Compressed image bytes -> uint8 tensors: libjpeg-turbo on CPU workers, nvjpeg on the GPU.

Images stay compressed until a worker (or the GPU) needs pixels. JPEGs decode with
``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU; nvjpeg, batched, with ``device="cuda"``);
other formats (PNG, WebP, BMP, ...) with ``torchvision.io.decode_image``, and PIL as the last resort
(TIFF, CMYK oddities). Only the image header is parsed to learn an image's size, so crop boxes can be
drawn before (or without) decoding on the CPU.

A crop becomes a view by slicing the box out of the decoded image and resizing it with torch's
antialiased bilinear interpolation, in uint8 and channels-last on the CPU (libjpeg-turbo hands out
HWC memory, so no copy is needed before the resize). Measured on 500x375 JPEGs
(``benchmarks/input_pipeline.py``): decode ~1 ms, each 224 px crop ~0.1 ms; DCT-domain
downscaling (PIL's ``draft``) only pays when a crop is at least twice the output size on both sides,
which random resized crops of ImageNet-sized images almost never are, so it is not used.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

JPEG_MAGIC = b"\xff\xd8\xff"


class Box(NamedTuple):
    """A crop in pixels of the original image: rows top..top+height, columns left..left+width."""

    top: int
    left: int
    height: int
    width: int


def _quiet_torchvision():
    # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are still the
    # libjpeg-turbo / nvjpeg decoders this module wants, and the warning would repeat in every worker.
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")
    import torchvision.io as tvio

    return tvio


def as_byte_tensor(data: bytes | memoryview | torch.Tensor) -> torch.Tensor:
    """Encoded bytes as the 1-D uint8 CPU tensor the torchvision decoders take (one copy of the bytes)."""
    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_jpeg(data: bytes | memoryview | torch.Tensor) -> bool:
    head = bytes(data[:3].tolist()) if isinstance(data, torch.Tensor) else bytes(data[:3])
    return head == JPEG_MAGIC


def image_size(data: bytes | memoryview | torch.Tensor) -> tuple[int, int]:
    """(height, width) from the header alone (PIL reads no pixel data until asked)."""
    from PIL import Image

    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else data
    with Image.open(io.BytesIO(raw)) as img:
        width, height = img.size
    return height, width


def decode(data: bytes | memoryview | torch.Tensor, channels: int = 3) -> torch.Tensor:
    """uint8 (C, H, W) on the CPU; C = ``channels`` (1: luma, 3: RGB). May be a non-contiguous (HWC) view."""
    tvio = _quiet_torchvision()
    mode = tvio.ImageReadMode.RGB if channels == 3 else tvio.ImageReadMode.GRAY
    encoded = as_byte_tensor(data)
    try:
        if is_jpeg(encoded):
            return tvio.decode_jpeg(encoded, mode=mode)
        return tvio.decode_image(encoded, mode=mode)
    except RuntimeError:
        return _decode_with_pil(encoded, channels)


def _decode_with_pil(encoded: torch.Tensor, channels: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as img:
        array = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0)


def decode_on_device(
    encoded: list[torch.Tensor], device: torch.device, channels: int = 3
) -> list[torch.Tensor]:
    """Decode a batch on ``device``: JPEGs in one batched nvjpeg call when it is a GPU.

    Entries that are already pixels (uint8 (C, H, W), decoded by a worker because they were not JPEG)
    are moved as they are. A batch nvjpeg refuses (e.g. CMYK JPEGs) falls back to the CPU decoder.
    """
    tvio = _quiet_torchvision()
    mode = tvio.ImageReadMode.RGB if channels == 3 else tvio.ImageReadMode.GRAY
    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg_at = [i for i, e in enumerate(encoded) if e.ndim == 1]
    if jpeg_at:
        batch = [encoded[i] for i in jpeg_at]
        try:
            decoded = (
                tvio.decode_jpeg(batch, mode=mode, device=device)
                if device.type == "cuda"
                else [decode(e, channels) for e in batch]
            )
        except RuntimeError:
            decoded = [decode(e, channels).to(device, non_blocking=True) for e in batch]
        for i, image in zip(jpeg_at, decoded):
            out[i] = image
    for i, e in enumerate(encoded):
        if out[i] is None:
            out[i] = e.to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def resize_box(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """The ``box`` of uint8 (C, H, W) ``image`` resized to (C, size, size), bilinear with antialiasing.

    uint8 in, uint8 out. On the CPU the resize runs in uint8 channels-last (torch's fast path); on
    other devices (where the antialiased kernel is float-only) in float32, rounded back.
    """
    crop = image[:, box.top : box.top + box.height, box.left : box.left + box.width].unsqueeze(0)
    if crop.shape[-2:] == (size, size):
        return crop[0].contiguous()
    if image.device.type == "cpu":
        crop = crop.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        out = F.interpolate(
            crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0].contiguous()
