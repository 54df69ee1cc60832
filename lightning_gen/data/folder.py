"""Any ImageNet-style folder tree: <root>/<train_dir>/<class>/*.jpg and <root>/<val_dir>/<class>/*.jpg."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_gen.data.base import DataConfig, DatasetMissingError, ImageDataModule, ImageTensorDataset
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


class FolderImages(Dataset):
    """Decodes, resizes (short side) and centre-crops images into uint8 (C, S, S) tensors."""

    def __init__(self, files: list[Path], labels: list[int], size: int, channels: int, scale: float):
        self.files, self.labels, self.size, self.channels, self.scale = files, labels, size, channels, scale

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        with Image.open(self.files[i]) as img:
            img = img.convert("RGB" if self.channels == 3 else "L")
            img = TF.resize(img, int(round(self.size * self.scale)), antialias=True)
            img = TF.center_crop(img, [self.size, self.size])
            return TF.pil_to_tensor(img)

    def __getitem__(self, i: int):
        return {"image": self.load_image(i), "label": torch.tensor(self.labels[i]), "index": i}


@register_datamodule("folder", FolderConfig)
class ImageFolderDataModule(ImageDataModule):
    """An ImageNet-style tree of class folders (train/ and val/); classes are the sorted folder names."""

    has_val_split = True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, cfg: FolderConfig):
        super().__init__(cfg)
        self.channels = cfg.channels
        if cfg.channels == 1:
            self.mean, self.std = (0.5,), (0.5,)
        self.classes = sorted(p.name for p in (self.root / cfg.train_dir).iterdir() if p.is_dir()) if (
            self.root / cfg.train_dir).is_dir() else []
        self.num_classes = len(self.classes)

    def expected_files(self) -> list[Path]:
        return [self.root / self.cfg.train_dir, self.root / self.cfg.val_dir]

    def download_command(self) -> str:
        return f"(no download: arrange images as {self.root}/{self.cfg.train_dir}/<class>/<image>.jpg)"

    def load(self, split: str) -> Dataset:
        folder = self.root / (self.cfg.train_dir if split == "train" else self.cfg.val_dir)
        files, labels = [], []
        for label, name in enumerate(self.classes):
            for path in sorted((folder / name).glob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                    labels.append(label)
        if not files:
            raise DatasetMissingError(
                f"no images found in {folder}: expected {folder}/<class>/<image>{{{','.join(sorted(IMAGE_SUFFIXES))}}} "
                f"with classes {self.classes or '(none found)'}"
            )
        images = FolderImages(files, labels, self.image_size, self.channels, self.cfg.resize_scale)
        if not self.cfg.in_memory:
            return images
        stacked = torch.stack([images.load_image(i) for i in range(len(images))])
        return ImageTensorDataset(stacked, torch.tensor(labels))
