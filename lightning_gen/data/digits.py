"""scikit-learn's bundled 8x8 handwritten digits: the embedded default, no download needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.data.base import DataConfig, ImageDataModule, ImageTensorDataset, resize_uint8
from lightning_gen.registry import register_datamodule


@dataclass
class DigitsConfig(DataConfig):
    image_size: int | None = 32
    test_fraction: float = 0.2  # digits ships one set of 1797 images; this much is held out as test


@register_datamodule("digits", DigitsConfig)
class DigitsDataModule(ImageDataModule):
    """1797 handwritten digits (8x8, 10 classes) shipped inside scikit-learn, upsampled to image_size."""

    channels, num_classes, native_size = 1, 10, 8
    mean, std = (0.19,), (0.32,)

    def download_command(self) -> str:
        return "pip install scikit-learn"

    def load(self, split: str) -> ImageTensorDataset:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8)
        images = resize_uint8(images.unsqueeze(1), self.image_size)
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
        n_test = int(round(len(images) * self.cfg.test_fraction))
        if split == "test":
            keep = order[:n_test].sort().values
        elif split == "train":
            keep = order[n_test:].sort().values
        else:
            raise KeyError(f"digits has splits train and test, not {split!r}")
        return ImageTensorDataset(images[keep], labels[keep])
