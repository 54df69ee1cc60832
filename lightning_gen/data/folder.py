"""Any ImageNet-style folder tree: <root>/<train_dir>/<class>/*.jpg and <root>/<val_dir>/<class>/*.jpg.

Two ways to read it:

- ``in_memory=true`` (small trees): every image is decoded once, short side resized and
  centre-cropped to ``image_size``, and held as one uint8 tensor; SSL views are then cut on the
  device from that centre square.
- ``in_memory=false`` (ImageNet-sized trees, the ``*_imagenet`` recipes): workers read each file
  per item. Methods with crop-based views get their random resized crops cut from the whole
  original image (``lightning_gen.data.crops``), decoded with libjpeg-turbo or on the GPU; evaluation
  and other methods get the resized centre crop.

For a cluster, write the tree into shards once (``lgen shards write``) and train with
``data=shards``: no directory walk on every rank, sequential reads, any object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_gen.config import choice
from lightning_gen.data import crops
from lightning_gen.data.base import (
    DataConfig,
    DatasetMissingError,
    ImageDataModule,
    ImageTensorDataset,
    _SubsetWithIndex,
)
from lightning_gen.data.crops import ItemMaker
from lightning_gen.data.encoded import DecodesPerItem
from lightning_gen.registry import register_datamodule

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class FolderConfig(DataConfig):
    image_size: int | None = 64
    train_dir: str = "train"
    val_dir: str = "val"
    in_memory: bool = True  # decode once into a uint8 tensor; false decodes per item in the workers
    channels: int = 3
    resize_scale: float = 1.143  # resize the short side to image_size*scale, then centre-crop (256/224)
    # where training crops are decoded and cut (in_memory=false): CPU workers, or the GPU (nvjpeg);
    # auto: the GPU when training on CUDA
    decode: str = choice("auto", "auto", "cpu", "device")


def list_image_folder(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files of ``folder/<class>/`` in sorted order, and their class indices."""
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DatasetMissingError(
            f"no images found in {folder}: expected {folder}/<class>/<image>{{{','.join(sorted(IMAGE_SUFFIXES))}}} "
            f"with classes {classes or '(none found)'}"
        )
    return files, labels


class FolderFiles(Dataset):
    """Reads each file per item and makes the item with ``maker`` (evaluation view or training crops)."""

    def __init__(self, files: list[Path], labels: list[int] | torch.Tensor, maker: ItemMaker):
        self.files, self.maker = files, maker
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        # The epoch lives in shared memory: persistent workers see the one the sampler has set.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def with_maker(self, maker: ItemMaker) -> FolderFiles:
        return FolderFiles(self.files, self.labels, maker)

    def __getitem__(self, i: int) -> dict:
        return self.maker(self.files[i].read_bytes(), int(self.labels[i]), i, int(self._epoch))


@register_datamodule("folder", FolderConfig)
class ImageFolderDataModule(DecodesPerItem, ImageDataModule):
    """An ImageNet-style tree of class folders (train/ and val/); classes are the sorted folder names."""

    has_val_split = True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, cfg: FolderConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.channels = cfg.channels
        if cfg.channels == 1:
            self.mean, self.std = (0.5,), (0.5,)
        train = self.root / cfg.train_dir
        self.classes = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
        self.num_classes = len(self.classes)

    def expected_files(self) -> list[Path]:
        return [self.root / self.cfg.train_dir, self.root / self.cfg.val_dir]

    def download_command(self) -> str:
        return f"(no download: arrange images as {self.root}/{self.cfg.train_dir}/<class>/<image>.jpg)"

    def load(self, split: str) -> Dataset:
        folder = self.root / (self.cfg.train_dir if split == "train" else self.cfg.val_dir)
        files, labels = list_image_folder(folder, self.classes)
        images = FolderFiles(files, labels, self.eval_maker())
        if not self.cfg.in_memory:
            return images
        stacked = torch.stack([images[i]["image"] for i in range(len(images))])
        return ImageTensorDataset(stacked, torch.tensor(labels))

    @property
    def collate_fn(self):
        return None if self.cfg.in_memory else crops.collate

    def training_dataset(self) -> Dataset:
        train = self.datasets["train"]
        if self.cfg.in_memory:
            return train
        maker = self.train_maker()
        if isinstance(train, _SubsetWithIndex):
            return _SubsetWithIndex(train.dataset.with_maker(maker), torch.tensor(train.indices))
        return train.with_maker(maker)
