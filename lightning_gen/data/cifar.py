"""CIFAR-10 and CIFAR-100 from the python pickle batches that torchvision downloads."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from lightning_gen.data.base import DataConfig, ImageDataModule, ImageTensorDataset, resize_uint8
from lightning_gen.registry import register_datamodule


def read_cifar_batches(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


class _CifarDataModule(ImageDataModule):
    channels, native_size = 3, 32
    folder, label_key = "cifar-10-batches-py", "labels"
    splits: dict[str, list[str]] = {}
    torchvision_class = "CIFAR10"

    def expected_files(self) -> list[Path]:
        return [self.root / self.folder / name for names in self.splits.values() for name in names]

    def download(self) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, self.torchvision_class)(str(self.root), train=True, download=True)

    def load(self, split: str) -> ImageTensorDataset:
        images, labels = read_cifar_batches(
            [self.root / self.folder / n for n in self.splits[split]], self.label_key
        )
        return ImageTensorDataset(resize_uint8(images, self.image_size), labels)


@register_datamodule("cifar10", DataConfig)
class CIFAR10DataModule(_CifarDataModule):
    """CIFAR-10: 50k train / 10k test colour images, 32x32, 10 classes (python pickle batches)."""

    num_classes = 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@register_datamodule("cifar100", DataConfig)
class CIFAR100DataModule(_CifarDataModule):
    """CIFAR-100: 50k train / 10k test colour images, 32x32, 100 fine classes (python pickle files)."""

    num_classes = 100
    folder, label_key, torchvision_class = "cifar-100-python", "fine_labels", "CIFAR100"
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    splits = {"train": ["train"], "test": ["test"]}
