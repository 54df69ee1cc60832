"""MNIST and Fashion-MNIST from torchvision's on-disk layout: <root>/<Name>/raw/*-ubyte[.gz] (idx format).

Fashion-MNIST also reads the copy Debian and Ubuntu ship in the package ``dataset-fashion-mnist``
(the four idx files as published, gzipped, in /usr/share/datasets/fashion-mnist/) when ``data.root``
holds no torchvision copy, so ``data=fashion_mnist`` works offline after one ``apt-get install``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from lightning_gen.data.base import (
    DataConfig,
    DatasetMissingError,
    ImageDataModule,
    ImageTensorDataset,
    resize_uint8,
)
from lightning_gen.registry import register_datamodule

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
INSTALL_FASHION_MNIST = "sudo apt-get install dataset-fashion-mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format: magic, dims as big-endian int32, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file (magic bytes {data[:4].hex()})")
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(*dims)


class _IdxDataModule(ImageDataModule):
    channels, num_classes, native_size = 1, 10, 28
    folder = "MNIST"
    torchvision_class = "MNIST"

    @property
    def raw(self) -> Path:
        return self.root / self.folder / "raw"

    # Folders holding the idx files directly (a system-wide copy), read when data.root has none.
    system_copies: tuple[Path, ...] = ()

    @staticmethod
    def _find(folder: Path, name: str) -> Path:
        plain = folder / name
        return plain if plain.exists() or not (folder / f"{name}.gz").exists() else folder / f"{name}.gz"

    def _files_in(self, folder: Path) -> list[Path]:
        return [self._find(folder, n) for pair in _FILES.values() for n in pair]

    @property
    def source(self) -> Path:
        """The folder read: the torchvision layout under data.root wherever it is complete, else the
        first complete system copy, else the torchvision folder (whose files the error then names)."""
        for folder in (self.raw, *self.system_copies):
            if all(p.exists() for p in self._files_in(folder)):
                return folder
        return self.raw

    def expected_files(self) -> list[Path]:
        return self._files_in(self.source)

    def download(self) -> None:
        import torchvision.datasets as tvd

        for train in (True, False):
            getattr(tvd, self.torchvision_class)(str(self.root), train=train, download=True)

    def load(self, split: str) -> ImageTensorDataset:
        if split not in _FILES:
            raise DatasetMissingError(f"{self.registry_name} has splits train and test, not {split!r}")
        images_file, labels_file = (self._find(self.source, n) for n in _FILES[split])
        images = torch.from_numpy(read_idx(images_file).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        return ImageTensorDataset(resize_uint8(images, self.image_size), labels)


@register_datamodule("mnist", DataConfig)
class MNISTDataModule(_IdxDataModule):
    """MNIST handwritten digits, 60k train / 10k test, 28x28 grayscale (torchvision layout)."""

    mean, std = (0.1307,), (0.3081,)


@register_datamodule("fashion_mnist", DataConfig)
class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST clothing images, 60k train / 10k test, 28x28 grayscale (torchvision layout or Debian's copy)."""

    folder = torchvision_class = "FashionMNIST"
    mean, std = (0.2860,), (0.3530,)
    system_copies = (DEBIAN_FASHION_MNIST,)

    def check_files(self) -> None:
        if all(p.exists() for p in self.expected_files()):
            return
        listing = "\n  ".join(str(p) for p in self._files_in(self.raw))
        raise DatasetMissingError(
            f"dataset 'fashion_mnist' not found: neither the torchvision layout under "
            f"{self.root.resolve()} nor Debian's copy in {DEBIAN_FASHION_MNIST} is there.\n"
            f"Expected files:\n  {listing}\n  or {DEBIAN_FASHION_MNIST}/<the same names>.gz\n"
            f"Install it (Debian/Ubuntu, no other download needed) with:\n  {INSTALL_FASHION_MNIST}\n"
            f"or download the torchvision copy with: {self.download_command()}"
        )
