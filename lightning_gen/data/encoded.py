"""What DataModules of compressed images share (``data=folder`` decoding per item, ``data=shards``).

Their training items depend on the method being trained, which the DataModule asks when the
Trainer requests the training loader:

- a method with crop-based views (SimCLR, MoCo, DINO, CPC: ``crop_specs()``) gets one random
  resized crop of the whole original image per view, cut in the workers (``decode=cpu``), or the
  encoded bytes and the crop boxes, decoded and cut on the GPU after the transfer (``decode=device``;
  ``auto`` picks it when training on CUDA);
- any other method gets the evaluation view (short side resized, centre crop), as evaluation does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_gen.data import crops
from lightning_gen.data.crops import CropSpec, ItemMaker


class DecodesPerItem:
    """Mixin for an ``ImageDataModule`` whose config has ``image_size``, ``channels``, ``resize_scale``
    and ``decode``."""

    train_crops: Sequence[CropSpec] | None = None  # set to override what the trained method asks for
    _device_maker: ItemMaker | None = None  # the training items' maker when they are decoded on the device

    def crop_specs(self) -> list[CropSpec]:
        if self.train_crops is not None:
            return list(self.train_crops)
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        ask = getattr(module, "crop_specs", None)
        return list(ask()) if ask is not None else []

    def decodes_on_device(self) -> bool:
        if self.cfg.decode != "auto":
            return self.cfg.decode == "device"
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def eval_maker(self) -> ItemMaker:
        return ItemMaker("image", self.image_size, self.cfg.channels, self.cfg.resize_scale)

    def train_maker(self) -> ItemMaker:
        specs = self.crop_specs()
        if not specs:
            return self.eval_maker()
        mode = "encoded" if self.decodes_on_device() else "views"
        maker = ItemMaker(
            mode, self.image_size, self.cfg.channels, self.cfg.resize_scale, specs, seed=self.seed
        )
        self._device_maker = maker if mode == "encoded" else None
        return maker

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Encoded JPEGs stay on the CPU (nvjpeg reads host memory), everything else moves; then the
        # batch is decoded and cropped on the device into the same "views" a CPU worker makes.
        encoded = batch.pop("encoded", None) if isinstance(batch, dict) else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if encoded is not None:
            maker = self._device_maker
            batch["views"] = crops.device_views(
                encoded, batch.pop("boxes"), maker.specs, device, maker.channels
            )
        return batch
