"""Images and reference statistics for ``lgen eval gen`` / ``lgen eval stats``, from where the field keeps them.

- a folder of image files (``*.png``, ``*.jpg``, ...; not recursive, in name order), all of one size:
  ``fidelity --input1 DIR``'s habit;
- an ``.npz`` of images: ``arr_0`` (or ``images``), uint8 (N, H, W, C) or (N, C, H, W), as the
  guided-diffusion / ADM samplers write them, with class labels in ``arr_1`` (or ``labels``) if any;
- ``<dataset>:<split>`` of this project's datasets (``fashion_mnist:test``);
- reference statistics: an ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D) as pytorch-fid and clean-fid
  publish them. Files written by ``lgen eval stats`` also carry ``extractor``, ``weights_sha256``,
  ``resize``, ``image_size``, ``n`` (and ``data``, ``split``), which those tools ignore and which say
  what the statistics were measured with.

Images are read in batches as uint8 (N, C, H, W); a folder is checked (sizes, modes) from the file
headers before any pixel is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightning_gen.config import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_KEYS, LABEL_KEYS = ("arr_0", "images"), ("arr_1", "labels")
PROVENANCE_KEYS = ("extractor", "weights_sha256", "resize", "image_size", "n", "data", "split")


class ImageSource:
    """Images to evaluate: ``batches(size)`` of uint8 (n, C, H, W) and their labels (or None)."""

    description = ""
    image_size = channels = count = 0
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        raise NotImplementedError


class FolderImages(ImageSource):
    def __init__(self, folder: Path):
        from PIL import Image

        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ConfigError(
                f"{folder} holds no images ({', '.join('*' + e for e in IMAGE_EXTENSIONS)}; subfolders are not read)"
            )
        sizes, modes = {}, set()
        for path in self.files:
            with Image.open(path) as image:  # the header only
                sizes.setdefault(image.size, path.name)
                modes.add(image.mode)
        if len(sizes) > 1:
            (a, first), (b, second) = list(sizes.items())[:2]
            raise ConfigError(
                f"{folder} holds images of different sizes: {a[0]}x{a[1]} ({first}) and {b[0]}x{b[1]} ({second}); "
                "evaluate images of one size (resize them first)"
            )
        ((width, height),) = sizes
        if width != height:
            raise ConfigError(f"{folder} holds {width}x{height} images: square images are evaluated")
        self.mode = "L" if modes <= {"L", "1"} else "RGB"
        self.image_size, self.channels, self.count = width, 1 if self.mode == "L" else 3, len(self.files)
        self.description = f"folder {folder} ({self.count} images)"

    def batches(self, batch_size: int):
        from PIL import Image

        for start in range(0, self.count, batch_size):
            arrays = []
            for path in self.files[start : start + batch_size]:
                with Image.open(path) as image:
                    arrays.append(np.asarray(image.convert(self.mode)))
            x = torch.from_numpy(np.stack(arrays))
            yield (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous(), None


class ArrayImages(ImageSource):
    def __init__(self, images: np.ndarray, labels: np.ndarray | None, where: str):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ConfigError(
                f"{where}: images must be uint8 (N, H, W, C) or (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        if images.shape[2] != images.shape[3]:
            raise ConfigError(
                f"{where}: images of {images.shape[2]}x{images.shape[3]}: square images are evaluated"
            )
        if not len(images):
            raise ConfigError(f"{where} holds no images")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ConfigError(f"{where}: {len(self.labels)} labels for {len(self.images)} images")
        self.count, self.channels, self.image_size = (
            len(self.images),
            self.images.shape[1],
            self.images.shape[-1],
        )
        self.description = f"{where} ({self.count} images{', labelled' if self.labels is not None else ''})"

    def batches(self, batch_size: int):
        for start in range(0, self.count, batch_size):
            labels = None if self.labels is None else self.labels[start : start + batch_size]
            yield self.images[start : start + batch_size], labels


class DatasetImages(ImageSource):
    """A split of one of this project's datasets, at ``data.image_size`` (its plain evaluation view)."""

    def __init__(self, datamodule, split: str):
        self.datamodule, self.split = datamodule, split
        try:
            self.loader = datamodule.eval_dataloader(split)
        except KeyError as error:
            raise ConfigError(str(error.args[0])) from error
        info = datamodule.info
        self.name = f"{info.name}:{split}"
        self.count, self.channels, self.image_size = len(self.loader.dataset), info.channels, info.image_size
        self.description = f"{self.name} ({self.count} images, {info.image_size} px)"

    def batches(self, batch_size: int):
        for batch in self.loader:
            labels = torch.as_tensor(batch["label"]).long()
            yield batch["image"], labels if bool((labels >= 0).any()) else None


@dataclass
class Statistics:
    """A reference given by its Gaussian: mean (D,), covariance (D, D), and what made it (may be empty)."""

    mu: torch.Tensor
    sigma: torch.Tensor
    meta: dict = field(default_factory=dict)
    path: str = ""

    def __len__(self) -> int:
        return int(self.meta.get("n", 0))


def read_npz(path: Path, role: str) -> ImageSource | Statistics:
    """An .npz of images or of statistics; a ConfigError for anything else."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{role}={path} is not a readable .npz file ({error})") from error
    with data:
        keys = list(data.keys())
        if "mu" in keys and "sigma" in keys:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ConfigError(
                    f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
                )
            meta = {k: data[k].item() for k in PROVENANCE_KEYS if k in keys}
            return Statistics(torch.from_numpy(mu), torch.from_numpy(sigma), meta, str(path))
        image_key = next((k for k in IMAGE_KEYS if k in keys), None)
        if image_key is not None and data[image_key].ndim == 4:
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            labels = data[label_key] if label_key else None
            return ArrayImages(data[image_key], labels, str(path))
    raise ConfigError(
        f"{role}={path} has neither mu and sigma (reference statistics, the pytorch-fid / clean-fid layout) "
        f"nor an image array (arr_0 or images, uint8 N x H x W x C); it holds: {', '.join(keys) or 'nothing'}"
    )


def write_statistics(path: Path, mu: torch.Tensor, sigma: torch.Tensor, meta: dict) -> Path:
    """``mu``, ``sigma`` (float64) and the self-describing keys, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    extra = {k: np.asarray(v) for k, v in meta.items() if v is not None}
    np.savez(tmp, mu=mu.double().cpu().numpy(), sigma=sigma.double().cpu().numpy(), **extra)
    os.replace(tmp, path)
    return path


def is_dataset_split(value: str) -> bool:
    return ":" in value and not Path(value).exists()


def open_images(value: str, role: str) -> ImageSource | Statistics:
    """``value`` as a folder or an .npz (``<dataset>:<split>`` is the caller's: it needs the data config)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return FolderImages(path)
    if path.is_file() and path.suffix == ".npz":
        return read_npz(path, role)
    if path.exists():
        raise ConfigError(f"{role}={value}: give a folder of images or an .npz file")
    raise ConfigError(
        f"{role}={value}: no such folder or file (or <dataset>:<split>, e.g. fashion_mnist:test)"
    )
