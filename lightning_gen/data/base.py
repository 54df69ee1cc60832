"""The DataModule shape every dataset shares.

Batches are dicts ``{"image": uint8 (N, C, H, W), "label": int64 (N,), "index": int64 (N,)}``:
uint8 keeps host memory and host-to-device traffic four times smaller than float, and methods
augment on the device after the transfer (``Method.to_float`` + ``lightning_gen.data.views``).
Unlabeled samples carry label -1. ``index`` is the sample's position in its split, which is how
contrastive losses find positives across views and how evaluation drops DistributedSampler padding.

Splits: ``train`` (shuffled, drop_last), ``val`` (held out from train with a seeded permutation,
or the official test set when ``val_fraction`` is 0), ``test``. ``eval_dataloader(split)`` is the
plain labeled view of any split for evaluation callbacks: no augmentation, no shuffling, nothing
dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_gen.config import bounded
from lightning_gen.data.sampler import EpochSampler, ResumableLoader
from lightning_gen.methods.base import DataInfo
from lightning_gen.randomness import EVAL_LOADER, stream_seed


class DatasetMissingError(FileNotFoundError):
    pass


@dataclass
class DataConfig:
    name: str = ""
    root: str = "data"  # where the torchvision on-disk layout lives
    download: bool = False  # prepare_data downloads (on one process) only when true
    batch_size: int = bounded(
        128, 1, hint="images per device and step"
    )  # the global batch is printed at start
    eval_batch_size: int = bounded(256, 1)
    num_workers: int = bounded(0, 0, hint="loader processes per device; 0 loads in the training process")
    # page-locked batches, so the copy to the GPU runs asynchronously; None: on when training on a CUDA GPU
    pin_memory: bool | None = None
    image_size: int | None = bounded(
        None, 1, hint="pixels per side"
    )  # resize at load time; None: native size
    val_fraction: float = bounded(0.1, 0, 0.9)  # held out from train, seeded; 0 -> validate on the test split
    max_train_samples: int | None = bounded(None, 1)  # a deterministic subset, for quick runs and tests
    split_seed: int = 0


class ImageTensorDataset(Dataset):
    """uint8 images kept in memory as one tensor, with labels and the sample index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 (N, C, H, W)"
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def resize_uint8(images: torch.Tensor, size: int | None, chunk: int = 4096) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) tensor to size x size (bilinear, antialiased when shrinking)."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for part in images.split(chunk):
        x = F.interpolate(
            part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out.append(x.round().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


class ImageDataModule(L.LightningDataModule):
    """Base of all DataModules: splits, loaders and the evaluation view. Subclasses implement ``load``."""

    config_class = DataConfig
    channels = 3
    num_classes = 10
    native_size = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    has_val_split = False  # True where the dataset ships a validation split (image folders)

    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed  # the run's seed: the training order of epoch e is a function of (seed, e)
        self.root = Path(cfg.root).expanduser()
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ to implement
    def expected_files(self) -> list[Path]:
        """Files that must exist for ``load`` to work (named in the missing-dataset error)."""
        return []

    def download(self) -> None:
        raise DatasetMissingError(f"{self.registry_name} cannot be downloaded automatically")

    def load(self, split: str) -> Dataset:
        """The dataset of ``split`` in ("train", "test", and dataset-specific ones like "unlabeled")."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def info(self) -> DataInfo:
        return DataInfo(
            name=self.registry_name,
            channels=self.channels,
            image_size=self.image_size,
            num_classes=self.num_classes,
            mean=tuple(self.mean),
            std=tuple(self.std),
            batch_size=self.cfg.batch_size,
        )

    @property
    def image_size(self) -> int:
        return self.cfg.image_size or self.native_size

    def download_command(self) -> str:
        return f"lgen prepare data={self.registry_name} data.root={self.cfg.root} data.download=true"

    def check_files(self) -> None:
        missing = [p for p in self.expected_files() if not p.exists()]
        if missing:  # one line, as every `lgen: error:` is
            expected = ", ".join(str(p) for p in self.expected_files())
            command = self.download_command()
            get_it = f"get it with `{command}`" if not command.startswith("(") else command.strip("()")
            raise DatasetMissingError(
                f"dataset {self.registry_name!r} not found under {self.root.resolve()}: missing {missing[0]} "
                f"(expected {expected}); {get_it}, or point data.root at the folder that holds it"
            )

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node (rank 0): the only place that downloads.
        if self.cfg.download and any(not p.exists() for p in self.expected_files()):
            created = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                self.download()
            except DatasetMissingError:
                raise
            except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision's MNIST
                # raises RuntimeError once every mirror failed
                if created and not any(self.root.iterdir()):
                    self.root.rmdir()  # leave no empty folder behind
                reason = " ".join(str(getattr(error, "reason", None) or error).split())
                raise DatasetMissingError(
                    f"could not download {self.registry_name} into {self.root.resolve()} "
                    f"({type(error).__name__}: {reason}). Without internet access here, run "
                    f"`{self.download_command()}` on a machine that has it and copy {self.root} over, "
                    f"or point data.root at an existing copy"
                ) from error
        self.check_files()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.check_files()
        train = self.load("train")
        if self.cfg.max_train_samples is not None and self.cfg.max_train_samples < len(train):
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.split_seed))
            train = _subset(train, keep[: self.cfg.max_train_samples].sort().values)
        test = self.load("test")
        if self.has_val_split or self.cfg.val_fraction <= 0:
            self.datasets.update(train=train, val=test, test=test)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.split_seed))
            n_val = max(1, int(round(len(train) * self.cfg.val_fraction)))
            self.datasets.update(
                train=_subset(train, order[n_val:].sort().values),
                val=_subset(train, order[:n_val].sort().values),
                test=test,
            )
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items())
        rank_zero_info(
            f"[data] {self.registry_name}: {sizes} images of {self.channels}x{self.image_size}x{self.image_size}"
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise KeyError(f"{self.registry_name} has no split {split!r}; splits: {', '.join(self.datasets)}")
        workers = self._workers()
        # Its own generator: without one, iter() draws the workers' base seed from the global RNG, i.e.
        # from the training stream (Lightning iterates a validation loader before on_validation_start).
        rank = self.trainer.global_rank if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(stream_seed(self.seed, rank, EVAL_LOADER))
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pins_memory(),
            persistent_workers=workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Seeded per-epoch order, sharded over the DDP ranks, resumable mid-epoch (``data.sampler``)."""
        if "train" not in self.datasets:
            self.setup()
        train = self.training_dataset()
        trainer = self.trainer  # None outside a Trainer (notebooks, evaluation)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(train, num_replicas=world, rank=rank, seed=self.seed)
        workers = self._workers()
        return ResumableLoader(
            train,
            sampler,
            batch_size=self.cfg.batch_size,
            drop_last=len(sampler) >= self.cfg.batch_size,
            num_workers=workers,
            pin_memory=self.pins_memory(),
            persistent_workers=workers > 0,
            collate_fn=self.collate_fn,
        )

    def pins_memory(self) -> bool:
        """``data.pin_memory``; unset, whether the trainer runs on a CUDA device. Lightning copies batches
        with ``non_blocking=True``, which overlaps with the GPU's work only from page-locked (pinned)
        memory: from ordinary memory CUDA stages the copy and may wait for the GPU's queue first."""
        if self.cfg.pin_memory is not None:
            return bool(self.cfg.pin_memory)
        trainer = getattr(self, "trainer", None)  # None outside a Trainer (notebooks, evaluation)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    collate_fn = None  # the DataLoader's default_collate, unless a subclass's items need another

    def training_dataset(self) -> Dataset:
        """What the training loader reads: the train split, or a view of it that augments per item."""
        return self.datasets["train"]

    def _workers(self) -> int:
        # More workers than cores only adds contention (and Lightning/torch warnings).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return min(self.cfg.num_workers, cores)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.cfg.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.cfg.eval_batch_size, shuffle=False, drop_last=False)

    def eval_dataloader(self, split: str = "train") -> DataLoader:
        """Plain labeled view of ``split`` for evaluation: no augmentation, no shuffling, nothing dropped."""
        return self._loader(split, self.cfg.eval_batch_size, shuffle=False, drop_last=False)


class _SubsetWithIndex(Dataset):
    """A subset whose ``index`` field is the position within the subset (0..len-1)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = dict(self.dataset[self.indices[i]])
        item["index"] = i
        return item

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if isinstance(dataset, ImageTensorDataset):  # stay one contiguous tensor: fast and picklable
        return ImageTensorDataset(dataset.images[indices], dataset.labels[indices])
    return _SubsetWithIndex(dataset, indices)
