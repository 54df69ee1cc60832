"""STL-10 from its binary files (stl10_binary/*.bin): train, test and the 100k unlabeled split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_gen.data.base import DataConfig, ImageDataModule, ImageTensorDataset, resize_uint8
from lightning_gen.registry import register_datamodule


def read_stl10_images(path: Path) -> torch.Tensor:
    # Stored column-major per image: (N, C, W, H); transpose to (N, C, H, W).
    data = np.fromfile(path, dtype=np.uint8).reshape(-1, 3, 96, 96)
    return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 1, 3, 2)))


def read_stl10_labels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1)  # stored 1..10


@dataclass
class STL10Config(DataConfig):
    train_split: str = "train+unlabeled"  # what SSL trains on: train, unlabeled or train+unlabeled
    val_fraction: float = 0.0  # validate on the official test split


@register_datamodule("stl10", STL10Config)
class STL10DataModule(ImageDataModule):
    """STL-10: 5k labeled train, 8k test and 100k unlabeled 96x96 colour images, 10 classes."""

    channels, num_classes, native_size = 3, 10, 96
    mean, std = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)

    @property
    def folder(self) -> Path:
        return self.root / "stl10_binary"

    def expected_files(self) -> list[Path]:
        names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
        if "unlabeled" in self.cfg.train_split:
            names.append("unlabeled_X.bin")
        return [self.folder / n for n in names]

    def download(self) -> None:
        import torchvision.datasets as tvd

        tvd.STL10(str(self.root), split="train+unlabeled", download=True)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_stl10_images(self.folder / f"{split}_X.bin")
        if split == "unlabeled":
            return images, torch.full((len(images),), -1, dtype=torch.long)
        return images, read_stl10_labels(self.folder / f"{split}_y.bin")

    def load(self, split: str) -> ImageTensorDataset:
        parts = self.cfg.train_split.split("+") if split == "train" else [split]
        loaded = [self._split(p) for p in parts]
        images = torch.cat([i for i, _ in loaded])
        labels = torch.cat([y for _, y in loaded])
        return ImageTensorDataset(resize_uint8(images, self.image_size), labels)

    def eval_dataloader(self, split: str = "train"):
        # Evaluation needs labels: its train view is the labeled train split alone.
        if split == "train" and "unlabeled" in self.cfg.train_split:
            if "labeled_train" not in self.datasets:
                images, labels = self._split("train")
                self.datasets["labeled_train"] = ImageTensorDataset(
                    resize_uint8(images, self.image_size), labels
                )
            split = "labeled_train"
        return super().eval_dataloader(split)
