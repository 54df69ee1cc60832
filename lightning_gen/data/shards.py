"""``data=shards``: an image dataset streamed from shards (LitData), from a local folder or an object store.

Layout, as ``lgen shards write`` makes it from an ImageNet-style folder tree::

    <root>/train/index.json  chunk-*.bin     LitData's optimized format: the original image bytes
    <root>/val/index.json    chunk-*.bin     (JPEG stays JPEG), label, index and file path per item

``<root>`` is a folder or a URL LitData streams from (``s3://bucket/imagenet``, ``gs://``, ``azure://``,
with the provider's usual credentials in the environment); remote chunks are cached under
``data.cache_dir`` (LitData's default ``~/.lightning/chunks`` when null), at most
``data.max_cache_size``. Each ``index.json`` also holds this project's manifest (``"lgen"``: classes,
sample and label counts, a SHA-256 per shard) that ``lgen shards validate`` checks.

Training streams with LitData's ``StreamingDataset``/``StreamingDataLoader``: every rank and worker
reads its own chunks sequentially in an order that is a function of (seed, epoch); items are decoded
and cropped per item as ``data=folder`` does (``lightning_gen.data.encoded``). Under DDP LitData
gives every worker of every rank the same number of full batches, so an epoch leaves out fewer than
(processes x workers x batch size) samples, different ones each epoch. The loader's position is
saved in checkpoints and a resumed run continues the epoch where it stopped, with no sample repeated
or skipped. Evaluation reads the splits in order by index (resize + centre crop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import Dataset

from lightning_gen.config import ConfigError, choice
from lightning_gen.data import crops
from lightning_gen.data.base import DataConfig, DatasetMissingError, ImageDataModule
from lightning_gen.data.crops import ItemMaker
from lightning_gen.data.encoded import DecodesPerItem
from lightning_gen.registry import register_datamodule

MANIFEST_KEY = "lgen"
REMOTE_SCHEMES = ("s3://", "gs://", "azure://", "hf://", "r2://", "local:")


class ShardError(DatasetMissingError):
    """Shards that are missing, incomplete, corrupt or not written by ``lgen shards write``."""

    def __init__(self, message: str):
        super().__init__(own_message(message))


def own_message(message: str) -> str:
    """A ShardError raised in a worker process (DataLoader, shard writer) comes back with the worker's
    whole traceback as its message; keep only what the ShardError said, so the CLI prints one line."""
    marker = f"{ShardError.__name__}: "
    if "Traceback" in message and marker in message:
        return message.rsplit(marker, 1)[1].splitlines()[0].strip()
    return message


@dataclass
class ShardsConfig(DataConfig):
    root: str = "data/imagenet-shards"  # a folder or a URL (s3://bucket/prefix, gs://..., azure://...)
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int | None = 224
    channels: int = 3
    resize_scale: float = 1.143  # evaluation: short side to image_size*scale, then centre crop (256/224)
    decode: str = choice("auto", "auto", "cpu", "device")  # training crops: CPU workers or the GPU (nvjpeg)
    cache_dir: str | None = None  # where remote chunks are cached (null: LitData's ~/.lightning/chunks)
    max_cache_size: str = "100GB"


def is_remote(root: str) -> bool:
    return root.startswith(REMOTE_SCHEMES)


def split_location(root: str, folder: str) -> str:
    return f"{root.rstrip('/')}/{folder}" if is_remote(root) else str(Path(root).expanduser() / folder)


def read_index(location: str, cache_dir: str | None = None) -> dict:
    """index.json of one split (a remote one is fetched into LitData's cache first)."""
    if is_remote(location):
        dataset = StreamingDataset(location, cache_dir=cache_dir)
        len(dataset)  # makes LitData fetch index.json into its cache
        location = dataset.input_dir.path
    path = Path(location) / "index.json"
    if not path.is_file():
        raise ShardError(
            f"no shards at {location}: {path} is missing. Write them from an image folder with\n"
            f"  lgen shards write <folder with train/ and val/> {Path(location).parent}"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ShardError(
            f"{path} is not valid JSON ({error}): the shards are damaged; write them again"
        ) from error
    if MANIFEST_KEY not in index:
        raise ShardError(
            f"{path} has no {MANIFEST_KEY!r} manifest (classes, counts): these shards were not written by "
            "`lgen shards write`; write them with it"
        )
    return index


def check_local_chunks(location: str, index: dict) -> None:
    """Every shard listed in index.json is there with the size it was written with (cheap: stat only)."""
    folder = Path(location)
    for chunk in index["chunks"]:
        path = folder / chunk["filename"]
        if not path.is_file():
            raise ShardError(
                f"shard {path} is missing ({len(index['chunks'])} shards are listed in {folder / 'index.json'}): "
                "copy it again or rewrite the shards with `lgen shards write`"
            )
        size = path.stat().st_size
        if size != chunk["chunk_bytes"]:
            raise ShardError(
                f"shard {path} is incomplete or damaged: {size} bytes where {chunk['chunk_bytes']} were written; "
                "copy it again or rewrite the shards with `lgen shards write`"
            )


def chunk_of(index: dict, position: int) -> str:
    """The shard file that holds the item at global ``position`` (LitData's order: chunk by chunk)."""
    for chunk in index["chunks"]:
        if position < chunk["chunk_size"]:
            return chunk["filename"]
        position -= chunk["chunk_size"]
    return "(past the last shard)"


class ShardStream(StreamingDataset):
    """LitData's StreamingDataset whose items are decoded (and cropped) by ``maker``."""

    def __init__(self, location: str, maker: ItemMaker, **kwargs):
        super().__init__(location, **kwargs)
        self.maker, self.location = maker, location

    def __getitem__(self, index):
        try:
            raw = super().__getitem__(index)
            # LitData counts epochs from 1; crops are seeded by the 0-based epoch, as for data=folder.
            return self.maker(raw["image"], raw["label"], raw["index"], self.current_epoch - 1)
        except ShardError:
            raise
        except Exception as error:
            chunk = getattr(index, "chunk_index", "?")
            raise ShardError(
                f"cannot read item {getattr(index, 'index', index)} of shard #{chunk} in {self.location} "
                f"({type(error).__name__}: {error}); check the shards with `lgen shards validate`"
            ) from error


class ShardLoader(StreamingDataLoader):
    """LitData's StreamingDataLoader, following the Trainer's epochs and resuming exactly.

    Its state (in checkpoints, through Lightning) counts the samples handed to training in the
    epoch: a run resumed mid-epoch skips exactly those and continues the same order with the same
    crops. The state also says whether the epoch was complete (also when ``limit_train_batches``
    ended it early): then the next epoch starts fresh, as in the uninterrupted run.
    """

    def __init__(self, *args, trainer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer = trainer  # the Trainer whose epochs this loader follows (None: count iterations)
        self._resume_pending = False  # a loaded mid-epoch state not yet continued

    def __iter__(self):
        # Runs at the first batch, after Lightning has moved to the epoch. A loaded state applies to
        # the first epoch iterated after it only (LitData clears it when an iteration runs to its
        # end, but Lightning stops asking once it has the epoch's count of batches). Every other
        # epoch starts fresh, numbered by the Trainer: a run resumed from an end-of-epoch checkpoint
        # (whose loader state Lightning does not restore) still gets the next epoch's order and crops.
        if self._resume_pending:
            self._resume_pending = False
        else:
            self.restore = False
            if self.trainer is not None:
                self.current_epoch = self.trainer.current_epoch  # LitData adds 1: it counts from 1
        yield from super().__iter__()

    def epoch_complete(self) -> bool:
        if self.trainer is None:
            return False
        from lightning_gen.checkpoint import epoch_complete

        return epoch_complete(self.trainer)

    def state_dict(self):
        state = super().state_dict()
        state["epoch_complete"] = self.epoch_complete()
        return state

    def load_state_dict(self, state) -> None:
        if state.get("epoch_complete"):
            self.current_epoch = state["current_epoch"]  # the next iteration starts epoch + 1
            self.restore = False
            return
        super().load_state_dict(state)
        self._resume_pending = True


class ShardsByIndex(Dataset):
    """Map-style access to one split in stored order: the evaluation view (resize + centre crop)."""

    def __init__(self, location: str, maker: ItemMaker, size: int, **stream_kwargs):
        self.location, self.maker, self.size, self.stream_kwargs = location, maker, size, stream_kwargs
        self._stream = None

    def __len__(self) -> int:
        return self.size

    @property
    def stream(self):
        if self._stream is None:  # opened lazily, in the process that reads (LitData caches are per process)
            self._stream = StreamingDataset(self.location, **self.stream_kwargs)
        return self._stream

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}

    def raw(self, i: int) -> dict:
        return self.stream[i]

    def __getitem__(self, i: int) -> dict:
        raw = self.raw(i)
        return self.maker(raw["image"], raw["label"], raw["index"], 0)

    @cached_property
    def labels(self) -> torch.Tensor:
        """Every label, read without decoding an image (evaluation with label fractions uses it)."""
        return torch.tensor([int(self.raw(i)["label"]) for i in range(len(self))], dtype=torch.long)


@register_datamodule("shards", ShardsConfig)
class ShardDataModule(DecodesPerItem, ImageDataModule):
    """Shards written by ``lgen shards write``, streamed from a folder or an object store (LitData)."""

    has_val_split = True
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, cfg: ShardsConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.root_location = cfg.root if is_remote(cfg.root) else str(Path(cfg.root).expanduser())
        self.channels = cfg.channels
        if cfg.channels == 1:
            self.mean, self.std = (0.5,), (0.5,)
        self._indexes: dict[str, dict] = {}
        self.classes: list[str] = []
        if is_remote(cfg.root) or Path(self.location("train"), "index.json").is_file():
            self.classes = list(self.index("train")[MANIFEST_KEY]["classes"])
        self.num_classes = len(self.classes)

    def location(self, split: str) -> str:
        return split_location(
            self.root_location, self.cfg.train_dir if split == "train" else self.cfg.val_dir
        )

    def index(self, split: str) -> dict:
        if split not in self._indexes:
            self._indexes[split] = read_index(self.location(split), self.cfg.cache_dir)
        return self._indexes[split]

    def expected_files(self) -> list[Path]:
        if is_remote(self.cfg.root):
            return []
        return [Path(self.location(s)) / "index.json" for s in ("train", "val")]

    def download_command(self) -> str:
        return f"lgen shards write <folder with train/ and val/> {self.cfg.root}"

    def check_files(self) -> None:
        super().check_files()
        for split in ("train", "val"):
            index = self.index(split)
            if not is_remote(self.cfg.root):
                check_local_chunks(self.location(split), index)

    def stream_kwargs(self) -> dict:
        kwargs: dict = {"max_cache_size": self.cfg.max_cache_size}
        if self.cfg.cache_dir:
            kwargs["cache_dir"] = self.cfg.cache_dir
        return kwargs

    def load(self, split: str) -> Dataset:
        manifest = self.index(split)[MANIFEST_KEY]
        return ShardsByIndex(
            self.location(split), self.eval_maker(), manifest["num_samples"], **self.stream_kwargs()
        )

    def setup(self, stage: str | None = None) -> None:
        if self.cfg.max_train_samples is not None:
            raise ConfigError(
                "data.max_train_samples is not supported by data=shards: write shards of the subset instead "
                "(lgen shards write on a smaller folder tree)"
            )
        super().setup(stage)

    def train_dataloader(self):
        if not self.datasets:
            self.setup()
        stream = ShardStream(
            self.location("train"),
            self.train_maker(),
            shuffle=True,
            drop_last=True,
            seed=self.seed,
            **self.stream_kwargs(),
        )
        workers = self._workers()
        return ShardLoader(
            stream,
            batch_size=self.cfg.batch_size,
            num_workers=workers,
            pin_memory=self.pins_memory(),
            drop_last=True,
            collate_fn=crops.collate,
            trainer=self.trainer,
        )
