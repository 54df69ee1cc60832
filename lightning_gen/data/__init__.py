"""DataModules (one per dataset, registered by name) and on-device augmentation views."""

from lightning_gen.data.base import DataConfig, DatasetMissingError, ImageDataModule

__all__ = ["DataConfig", "DatasetMissingError", "ImageDataModule"]
