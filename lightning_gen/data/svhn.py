"""SVHN cropped digits from torchvision's .mat files (<root>/{train,test,extra}_32x32.mat)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_gen.data.base import DataConfig, ImageDataModule, ImageTensorDataset, resize_uint8
from lightning_gen.registry import register_datamodule


@dataclass
class SVHNConfig(DataConfig):
    use_extra: bool = False  # add the 531k "extra" images to train


@register_datamodule("svhn", SVHNConfig)
class SVHNDataModule(ImageDataModule):
    """SVHN street-view house numbers, 73k train / 26k test (+531k extra), 32x32 colour, 10 classes."""

    channels, num_classes, native_size = 3, 10, 32
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)

    def expected_files(self) -> list[Path]:
        names = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if self.cfg.use_extra else [])
        return [self.root / n for n in names]

    def download(self) -> None:
        import torchvision.datasets as tvd

        for split in ["train", "test"] + (["extra"] if self.cfg.use_extra else []):
            tvd.SVHN(str(self.root), split=split, download=True)

    def _read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        from scipy.io import loadmat

        mat = loadmat(str(self.root / f"{name}_32x32.mat"))
        images = torch.from_numpy(
            np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))
        )  # (H, W, C, N) -> NCHW
        labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)  # the digit 0 is stored as 10
        return images, labels

    def load(self, split: str) -> ImageTensorDataset:
        parts = ["train", "extra"] if split == "train" and self.cfg.use_extra else [split]
        loaded = [self._read(p) for p in parts]
        images, labels = torch.cat([i for i, _ in loaded]), torch.cat([y for _, y in loaded])
        return ImageTensorDataset(resize_uint8(images, self.image_size), labels)
