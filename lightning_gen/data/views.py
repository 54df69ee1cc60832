"""Batched augmentation views that run on the device, after the uint8 batch is transferred.

Every transform draws its random parameters *per sample* but runs as one tensor op over the whole
batch: the random resized crop and the horizontal flip are one ``affine_grid`` + ``grid_sample``;
colour jitter, grayscale and solarize are elementwise blends; Gaussian blur is a grouped separable
convolution with one kernel per sample. No PIL, no per-image Python loop, so a GPU is not starved
by the data loader and the CPU does only uint8 collation.

Recipes (``VIEW_RECIPES``) hold the published settings:

- ``simclr``   crop (0.08, 1) + flip, jitter (0.8s, 0.8s, 0.8s, 0.2s) p 0.8 with s = 1, gray p 0.2, blur p 0.5
- ``simclr_cifar``  as ``simclr`` with s = 0.5 and no blur (SimCLR's CIFAR-10 setting)
- ``moco_v1``  crop (0.2, 1) + flip, jitter (0.4, 0.4, 0.4, 0.4) always, gray p 0.2
- ``moco_v2``  "aug+": crop (0.2, 1) + flip, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray p 0.2, blur p 0.5
- ``dino``     2 global crops (0.4, 1) blur p (1.0, 0.1), solarize p (0, 0.2) + local crops (0.05, 0.4)
               of 96/224 of the image side with blur p 0.5; jitter (0.4, 0.4, 0.2, 0.1) p 0.8
- ``byol``     BYOL's asymmetric pair (Grill et al. 2020): crop (0.08, 1) + flip, jitter
               (0.4, 0.4, 0.2, 0.1) p 0.8, gray p 0.2, blur p (1.0, 0.1), solarize p (0, 0.2); also
               Barlow Twins' and VICReg's augmentation
- ``swav``     SwAV's multi-crop (Caron et al. 2020): 2 global crops (0.14, 1) + 6 local crops (0.05, 0.14)
               of 96/224 of the image side, jitter (0.8, 0.8, 0.8, 0.2) p 0.8, gray p 0.2, blur p 0.5

``Views(cfg, data_info)`` is an ``nn.Module`` usable by any method: ``views(images_uint8)``
returns the list of standardised float views, global crops first. Datasets that decode per item
(image folders, shards) cut the random resized crops from the whole original image in their
workers instead (``lightning_gen.data.crops``, following ``crop_specs()``); ``views(list_of_crops)``
then takes one uint8 batch per view and does the rest (flip, colour, blur, solarize) here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import bounded, choice
from lightning_gen.data.crops import CropSpec

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass
class CropConfig:
    """One kind of crop. ``None`` fields take the recipe's value; list probabilities cycle over views."""

    n: int | None = None  # how many views of this kind
    size: int | None = None  # output side in pixels; None: the image size (global) or 96/224 of it (local)
    scale: tuple[float, float] | None = bounded(
        None, 0, 1, low_open=True
    )  # area fraction of the random resized crop
    ratio: tuple[float, float] | None = bounded(None, 0, low_open=True)  # aspect ratios of the crop
    flip_p: float | None = bounded(None, 0, 1)
    jitter_p: float | None = bounded(None, 0, 1)
    jitter: tuple[float, float, float, float] | None = bounded(
        None, 0
    )  # brightness, contrast, saturation, hue
    grayscale_p: float | None = bounded(None, 0, 1)
    blur_p: list[float] | None = bounded(
        None, 0, 1
    )  # per view, cycled (DINO: [1.0, 0.1] for its two global crops)
    blur_sigma: tuple[float, float] | None = bounded(None, 0, low_open=True)  # Gaussian blur's sigma range
    solarize_p: list[float] | None = bounded(None, 0, 1)


@dataclass
class ViewsConfig:
    recipe: str = choice(
        "simclr", "simclr", "simclr_cifar", "moco_v1", "moco_v2", "dino", "byol", "swav", "none"
    )
    global_crops: CropConfig = field(default_factory=CropConfig)
    local_crops: CropConfig = field(default_factory=CropConfig)


def _crop(**kw) -> CropConfig:
    base = dict(
        n=2,
        size=None,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        jitter_p=0.8,
        jitter=(0.4, 0.4, 0.4, 0.1),
        grayscale_p=0.2,
        blur_p=[0.0],
        blur_sigma=(0.1, 2.0),
        solarize_p=[0.0],
    )
    base.update(kw)
    return CropConfig(**base)


VIEW_RECIPES: dict[str, tuple[CropConfig, CropConfig]] = {
    "simclr": (_crop(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=[0.5]), _crop(n=0)),
    "simclr_cifar": (_crop(jitter=(0.4, 0.4, 0.4, 0.1)), _crop(n=0)),
    "moco_v1": (_crop(scale=(0.2, 1.0), jitter_p=1.0, jitter=(0.4, 0.4, 0.4, 0.4)), _crop(n=0)),
    "moco_v2": (_crop(scale=(0.2, 1.0), blur_p=[0.5]), _crop(n=0)),
    "dino": (
        _crop(scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2]),
        _crop(n=6, scale=(0.05, 0.4), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=[0.5]),
    ),
    "byol": (
        _crop(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2]),
        _crop(n=0),
    ),
    "swav": (
        _crop(scale=(0.14, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=[0.5]),
        _crop(n=6, scale=(0.05, 0.14), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=[0.5]),
    ),
    # Identity views (tests, evaluation): no crop, no colour change.
    "none": (
        _crop(n=2, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0),
        _crop(n=0),
    ),
}


def resolve(cfg: ViewsConfig, image_size: int) -> tuple[CropConfig, CropConfig]:
    """Concrete (global, local) crop settings: the recipe with the config's non-None fields on top."""
    out = []
    for which, default in zip(("global_crops", "local_crops"), VIEW_RECIPES[cfg.recipe]):
        given = {k: v for k, v in dataclasses.asdict(getattr(cfg, which)).items() if v is not None}
        crop = dataclasses.replace(default, **given)
        if crop.size is None:
            crop.size = image_size if which == "global_crops" else local_crop_size(image_size)
        out.append(crop)
    return out[0], out[1]


def local_crop_size(image_size: int) -> int:
    """DINO's 96 px local crops for 224 px images, scaled to the image and rounded to a multiple of 8."""
    return max(8, int(round(image_size * 96 / 224 / 8)) * 8)


# ------------------------------------------------------------------------------ batched ops


def random_resized_crop(x: torch.Tensor, size: int, scale, ratio, flip_p: float = 0.0) -> torch.Tensor:
    """Per-sample random resized crop (and horizontal flip) of (N, C, H, W) as one grid_sample.

    Area fraction s ~ U(scale) and log aspect ratio ~ U(log ratio) give the crop's width and height
    as fractions of the image side; sides beyond 1 are clipped (torchvision retries, then falls
    back to a centre crop: the same distribution up to those rare cases).
    """
    n, dev = x.shape[0], x.device
    area = torch.empty(n, device=dev).uniform_(*scale)
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (torch.rand(n, device=dev) * (1 - w) + w / 2) * 2 - 1  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=dev) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(n, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def random_flip(x: torch.Tensor, p: float) -> torch.Tensor:
    """Horizontal flip of each sample with probability ``p`` (for views whose crop was cut already)."""
    if p <= 0:
        return x
    return _where(torch.rand(x.shape[0], device=x.device) < p, x.flip(-1), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB (N, 3, H, W), kept 3-channel."""
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """torchvision's ColorJitter with per-sample factors; one random order of the four per batch."""
    n, dev, rgb = x.shape[0], x.device, x.shape[1] == 3

    def factor(strength: float) -> torch.Tensor:
        return torch.empty(n, device=dev, dtype=x.dtype).uniform_(max(0.0, 1 - strength), 1 + strength)

    for op in torch.randperm(4).tolist():
        if op == 0 and brightness > 0:
            x = _blend(x, torch.zeros_like(x), factor(brightness))
        elif op == 1 and contrast > 0:
            gray = grayscale(x) if rgb else x
            mean = gray.mean((1, 2, 3), keepdim=True).expand_as(x)
            x = _blend(x, mean, factor(contrast))
        elif op == 2 and saturation > 0 and rgb:
            x = _blend(x, grayscale(x), factor(saturation))
        elif op == 3 and hue > 0 and rgb:
            hsv = rgb_to_hsv(x)
            shift = torch.empty(n, device=dev, dtype=x.dtype).uniform_(-hue, hue).view(-1, 1, 1)
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            x = hsv_to_rgb(hsv).clamp(0, 1)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, as a grouped convolution (reflect padding)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, K)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def augment(x: torch.Tensor, crop: CropConfig, view: int = 0, cropped: bool = False) -> torch.Tensor:
    """One view of a float batch in [0, 1]: crop + flip, jitter, grayscale, blur, solarize (SimCLR order).

    ``cropped``: ``x`` is this view's random resized crop already (cut by the data loader), only flip it.
    """
    n, dev = x.shape[0], x.device
    if cropped:
        x = random_flip(x, crop.flip_p)
    else:
        x = random_resized_crop(x, crop.size, crop.scale, crop.ratio, crop.flip_p)
    if crop.jitter_p > 0 and any(crop.jitter):
        x = _where(torch.rand(n, device=dev) < crop.jitter_p, color_jitter(x, *crop.jitter), x)
    if crop.grayscale_p > 0 and x.shape[1] == 3:
        x = _where(torch.rand(n, device=dev) < crop.grayscale_p, grayscale(x), x)
    blur_p = crop.blur_p[view % len(crop.blur_p)]
    if blur_p > 0:
        # The whole batch is blurred and the chosen samples keep it: picking them out first would give
        # a shape that depends on the draw, and on a GPU the host would wait to learn it (the blur
        # is a cheap separable convolution next to the network).
        chosen = torch.rand(n, device=dev) < blur_p
        sigma = torch.empty(n, device=dev).uniform_(*crop.blur_sigma)
        kernel = max(3, int(0.1 * crop.size) // 2 * 2 + 1)  # ~10% of the side, odd
        x = _where(chosen, gaussian_blur(x, sigma, kernel), x)
    solarize_p = crop.solarize_p[view % len(crop.solarize_p)]
    if solarize_p > 0:
        x = _where(torch.rand(n, device=dev) < solarize_p, solarize(x), x)
    return x


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


class Views(nn.Module):
    """``views(images)`` -> list of standardised float views (global crops first, then local crops).

    ``images`` are uint8 (N, C, H, W) or floats in [0, 1]. Augmentation runs in float32 without
    autocast (bf16 colour maths would visibly quantise), then the mean/std standardisation.
    """

    def __init__(self, cfg: ViewsConfig, mean, std, image_size: int):
        super().__init__()
        self.global_crops, self.local_crops = resolve(cfg, image_size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    @property
    def num_global(self) -> int:
        return self.global_crops.n

    @property
    def num_local(self) -> int:
        return self.local_crops.n

    def crop_specs(self) -> list[CropSpec]:
        """What a data loader that cuts the crops itself must deliver: one spec per view, in view order."""
        return [
            CropSpec(crop.size, tuple(crop.scale), tuple(crop.ratio))
            for crop in (self.global_crops, self.local_crops)
            for _ in range(crop.n)
        ]

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor | list[torch.Tensor], channels_last: bool = False
    ) -> list[torch.Tensor]:
        """``images``: one batch to cut every view from, or one batch of crops per view (``crop_specs``)."""
        cropped = isinstance(images, list | tuple)
        if cropped:
            self._check_crops(images)
        out = []
        with torch.autocast(images[0].device.type, enabled=False):
            if not cropped:
                x = _unit(images)
            for crop in (self.global_crops, self.local_crops):
                for v in range(crop.n):
                    source = _unit(images[len(out)]) if cropped else x
                    view = (augment(source, crop, v, cropped=cropped) - self.mean) / self.std
                    out.append(view.contiguous(memory_format=torch.channels_last) if channels_last else view)
        return out

    def _check_crops(self, crops) -> None:
        sizes = [spec.size for spec in self.crop_specs()]
        got = [tuple(c.shape[-2:]) for c in crops]
        if got != [(s, s) for s in sizes]:
            raise ValueError(f"pre-cut views must be one batch per view of sides {sizes}, got shapes {got}")

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised views back to [0, 1], for image grids."""
        return (x * self.std + self.mean).clamp(0, 1)
