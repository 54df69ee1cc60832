"""Shards (data=shards, LitData): written from a real image-folder tree and validated; damaged shards are
clear errors; under 2-process DDP (gloo) every sample is seen once per epoch; a run interrupted
mid-epoch (or at an epoch end) and resumed through Lightning sees the remaining samples exactly once, in
the uninterrupted run's order and with its crops."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lightning_gen import registry
from lightning_gen.callbacks.stop_after import StopAfter, StopAfterConfig
from lightning_gen.checkpoint import LastCheckpoint
from lightning_gen.config import compose, section_object
from lightning_gen.data.crops import CropSpec
from lightning_gen.data.shard_writer import validate_split, write_shards
from lightning_gen.data.shards import ShardError
from tests import datasets

PER_CLASS = 8  # 3 classes: 24 training images = 2 ranks x 2 workers x batch 3 x 2 batches


def shard_datamodule(root: Path | str, *overrides: str):
    cfg = compose(["data=shards", f"data.root={root}", "data.image_size=16", *overrides])
    return registry.build("data", section_object(cfg.data))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    datasets.write_image_folder(root / "tree", per_class=PER_CLASS, size=24)
    write_shards(root / "tree", root / "shards", workers=2, chunk_bytes="8KB")
    return root


def test_cli_writes_validated_shards_that_match_the_folder(lgen, tmp_path):
    datasets.write_image_folder(tmp_path / "tree", per_class=2)
    proc = lgen("shards", "write", str(tmp_path / "tree"), str(tmp_path / "out"), "--workers", "2")
    assert "train: valid: 6 images, 3 classes" in proc.stdout and "val: valid: 6 images" in proc.stdout
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    manifest = index["lgen"]
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["label_counts"] == [2, 2, 2]
    assert set(manifest["sha256"]) == {c["filename"] for c in index["chunks"]}
    # every stored item is the original file's bytes, with the folder path's label and index
    from litdata import StreamingDataset

    from lightning_gen.data.folder import list_image_folder

    files, labels = list_image_folder(tmp_path / "tree" / "train", manifest["classes"])
    for item in StreamingDataset(str(tmp_path / "out" / "train")):
        i = int(item["index"])
        assert bytes(item["image"]) == files[i].read_bytes() and int(item["label"]) == labels[i]
        assert item["path"] == files[i].relative_to(tmp_path / "tree" / "train").as_posix()
    again = lgen("shards", "write", str(tmp_path / "tree"), str(tmp_path / "out"), check=False)
    assert (
        again.returncode == 2 and "exists and is not empty" in again.stderr and "--overwrite" in again.stderr
    )
    assert lgen("shards", "validate", str(tmp_path / "out")).returncode == 0


def test_an_unreadable_source_image_is_named(lgen, tmp_path):
    datasets.write_image_folder(tmp_path / "tree", per_class=2)
    (tmp_path / "tree" / "train" / "dog" / "broken.jpg").write_bytes(b"not an image")
    proc = lgen(
        "shards", "write", str(tmp_path / "tree"), str(tmp_path / "out"), "--workers", "2", check=False
    )
    error = [line for line in proc.stderr.splitlines() if line.startswith("lgen: error:")]
    assert proc.returncode == 2 and len(error) == 1 and "broken.jpg is not an image file" in error[0]
    assert not (tmp_path / "out" / "train").exists()  # no partial shards left behind


def damaged_copy(written: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "copy"
    shutil.copytree(written / "shards", copy)
    index = json.loads((copy / "train" / "index.json").read_text())
    return copy, copy / "train" / index["chunks"][1]["filename"]


def test_corrupt_truncated_or_missing_shards_are_clear_errors(written, tmp_path, lgen):
    copy, chunk = damaged_copy(written, tmp_path)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    chunk.write_bytes(bytes(data))
    proc = lgen("shards", "validate", str(copy), check=False)
    assert proc.returncode == 2 and f"lgen: error: shard {chunk} is corrupt" in proc.stderr
    chunk.write_bytes(bytes(data[:-100]))
    with pytest.raises(ShardError, match=f"shard {chunk} is incomplete or damaged"):
        validate_split(copy / "train", checksums=False)
    chunk.unlink()
    proc = lgen(
        "train",
        "method=simclr",
        "data=shards",
        f"data.root={copy}",
        "logger.wandb.enabled=false",
        check=False,
    )
    assert proc.returncode == 2 and f"lgen: error: shard {chunk} is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shards_without_a_manifest_or_folder_are_clear_errors(tmp_path, lgen):
    proc = lgen("prepare", "data=shards", f"data.root={tmp_path / 'nothing'}", check=False)
    assert proc.returncode == 2 and "lgen shards write" in proc.stderr


def test_streams_from_a_url_through_the_chunk_cache(written, tmp_path):
    # LitData's local: scheme takes the object-store path (chunks fetched into the cache as they are
    # needed), the one s3:// and gs:// take, without a network
    cache = tmp_path / "cache"
    dm = shard_datamodule(f"local:{written / 'shards'}", f"data.cache_dir={cache}", "data.batch_size=4")
    dm.setup()
    assert dm.classes == ["cat", "dog", "eel"] and len(dm.datasets["val"]) == 3 * PER_CLASS
    seen = [i for batch in dm.train_dataloader() for i in batch["index"].tolist()]
    assert sorted(seen) == list(range(3 * PER_CLASS))
    assert len(list(cache.rglob("chunk-*.bin"))) > 0  # read through the cache, not in place
    assert next(iter(dm.val_dataloader()))["image"].shape[1:] == (3, 16, 16)


def _ddp_epochs(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dm = shard_datamodule(Path(root), "data.batch_size=3", "data.num_workers=2")
    dm.seed = 5
    dm.setup()
    seen = {}
    loader = dm.train_dataloader()
    for epoch in range(2):
        seen[f"epoch{epoch}"] = [i for batch in loader for i in batch["index"].tolist()]
    # interrupted after one batch of epoch 0, resumed from the loader's state in a new loader
    first = dm.train_dataloader()
    batches = iter(first)
    seen["before"] = next(batches)["index"].tolist()
    state = first.state_dict()
    del batches
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    seen["after"] = [i for batch in resumed for i in batch["index"].tolist()]
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_ddp_processes_see_every_sample_once_per_epoch_and_after_a_resume(written, tmp_path):
    out = tmp_path / "seen.json"
    mp.spawn(_ddp_epochs, args=(2, free_port(), str(written / "shards"), str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    n = 3 * PER_CLASS
    for epoch in ("epoch0", "epoch1"):
        assert not set(ranks[0][epoch]) & set(ranks[1][epoch])  # the ranks read disjoint samples
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == list(range(n))
    assert ranks[0]["epoch0"] != ranks[0]["epoch1"]  # a new order every epoch
    for rank in ranks:  # the resumed loader continues where the interrupted one stopped
        assert rank["before"] + rank["after"] == rank["epoch0"]


class Recorder(L.LightningModule):
    """Records what every training step receives: epoch, sample indices and a checksum of the crops."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int], float]] = []

    def crop_specs(self):
        return [CropSpec(16, (0.08, 1.0), (3 / 4, 4 / 3)), CropSpec(8, (0.05, 0.4), (3 / 4, 4 / 3))]

    def training_step(self, batch, batch_idx):
        pixels = float(sum(v.double().sum() * (k + 1) for k, v in enumerate(batch["views"])))
        self.seen.append((self.current_epoch, batch["index"].tolist(), pixels))
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(written: Path, ckpt_dir: Path, stop: StopAfterConfig | None = None, resume: str | None = None):
    dm = shard_datamodule(written / "shards", "data.batch_size=4", "data.num_workers=2")
    dm.seed = 3
    module = Recorder()
    callbacks = [LastCheckpoint(ckpt_dir)] + ([StopAfter(stop, ckpt_dir)] if stop else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=str(ckpt_dir),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module.seen


@pytest.mark.parametrize(
    "stop", [StopAfterConfig(steps=4), StopAfterConfig(epochs=1)], ids=["mid_epoch", "epoch_end"]
)
def test_resumed_run_continues_the_epoch_like_the_uninterrupted_run(written, tmp_path, stop):
    full = fit(written, tmp_path / "full")
    steps_per_epoch = 3 * PER_CLASS // 4
    assert len(full) == 2 * steps_per_epoch
    for epoch in (0, 1):
        indices = [i for e, batch, _ in full if e == epoch for i in batch]
        assert sorted(indices) == list(range(3 * PER_CLASS))
    first = fit(written, tmp_path / "cut", stop=stop)
    assert 0 < len(first) < len(full)
    rest = fit(written, tmp_path / "cut", resume=str(tmp_path / "cut" / "last.ckpt"))
    # the same batches, in the same order, with the same crops: nothing repeated, nothing skipped
    assert first + rest == full
