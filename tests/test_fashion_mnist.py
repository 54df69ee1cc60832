"""Fashion-MNIST: the torchvision layout, Debian's copy as the fallback, the real 70k images, a short training.

The fallback and precedence tests write tiny idx files in both layouts and always run; the tests on the
real dataset need Debian's package (``sudo apt-get install dataset-fashion-mnist``) and skip without it.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from lightning_gen import registry
from lightning_gen.config import compose, section_object
from lightning_gen.data import mnist
from lightning_gen.data.base import DatasetMissingError
from tests import datasets
from tests.conftest import FAST

REAL = mnist.DEBIAN_FASHION_MNIST
needs_real_files = pytest.mark.skipif(
    not all((REAL / f"{n}.gz").exists() for pair in mnist._FILES.values() for n in pair),
    reason=f"Fashion-MNIST is not installed in {REAL}: {mnist.INSTALL_FASHION_MNIST}",
)


def fashion(root, *overrides: str):
    cfg = compose(["data=fashion_mnist", f"data.root={root}", *overrides])
    return registry.build("data", section_object(cfg.data))


def write_debian_copy(folder, n_train: int, n_test: int) -> dict:
    """The Debian package's layout: the four idx files, gzipped, directly in one folder."""
    written = datasets.write_mnist(folder / "tmp", folder="x", n_train=n_train, n_test=n_test, gz=True)
    for path in (folder / "tmp" / "x" / "raw").iterdir():
        path.rename(folder / path.name)
    return written


def test_debian_copy_is_read_when_root_has_no_torchvision_layout(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    written = write_debian_copy(system, n_train=24, n_test=8)
    monkeypatch.setattr(mnist.FashionMNISTDataModule, "system_copies", (system,))
    dm = fashion(tmp_path / "empty", "data.image_size=null", "data.val_fraction=0")
    dm.prepare_data()  # finds the files: nothing to download, no error
    dm.setup()
    assert dm.source == system
    images, labels = written["t10k"]
    assert torch.equal(dm.datasets["test"].images[:, 0], torch.from_numpy(images))
    assert dm.datasets["test"].labels.tolist() == labels.tolist()
    assert len(dm.datasets["train"]) == 24


def test_torchvision_layout_under_root_wins_over_the_debian_copy(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_debian_copy(system, n_train=24, n_test=8)
    monkeypatch.setattr(mnist.FashionMNISTDataModule, "system_copies", (system,))
    root = tmp_path / "root"
    written = datasets.write_mnist(root, folder="FashionMNIST", n_train=40, n_test=12)
    dm = fashion(root, "data.image_size=null", "data.val_fraction=0")
    dm.setup()
    assert dm.source == root / "FashionMNIST" / "raw"
    assert len(dm.datasets["train"]) == 40
    assert torch.equal(dm.datasets["test"].images[:, 0], torch.from_numpy(written["t10k"][0]))


def test_missing_fashion_mnist_names_both_places_and_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist.FashionMNISTDataModule, "system_copies", (tmp_path / "not-installed",))
    dm = fashion(tmp_path / "nowhere")
    with pytest.raises(DatasetMissingError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert (
        str((tmp_path / "nowhere").resolve()) in message
        and "FashionMNIST/raw/train-images-idx3-ubyte" in message
    )
    assert str(mnist.DEBIAN_FASHION_MNIST) in message
    assert "apt-get install dataset-fashion-mnist" in message


@needs_real_files
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    dm = fashion(tmp_path / "empty", "data.image_size=null", "data.val_fraction=0")
    dm.setup()
    train, test = dm.datasets["train"], dm.datasets["test"]
    assert dm.source == REAL
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    # Balanced classes, as published: 6000 per class in train, 1000 in test.
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # The normalisation constants the DataModule declares are the training set's own statistics.
    pixels = train.images.double() / 255
    assert pixels.mean().item() == pytest.approx(dm.mean[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(dm.std[0], abs=5e-4)
    # Not random bytes: the mean "trouser" (class 1) is darker between the legs than on them.
    trouser = pixels[train.labels == 1].mean(0)[0]
    assert trouser[20, 14] < 0.2 * trouser[20, 11]
    # The config's split: 5000 of the 60000 held out (seeded), 32x32 after resizing.
    split = fashion(tmp_path / "empty")
    split.setup()
    assert [len(split.datasets[s]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    assert split.datasets["train"].images.shape[1:] == (1, 32, 32)
    assert np.intersect1d(split.datasets["train"].labels.numpy(), np.arange(10)).size == 10


@needs_real_files
def test_a_few_training_steps_on_real_fashion_mnist(lgen):
    """The supervised baseline's experiment, 3 steps of batch 32 on the real images found through the
    Debian fallback (data.root holds nothing): finite losses, a validation accuracy."""
    fast = [o for o in FAST if not o.startswith("data.image_size")]
    proc = lgen(
        "train",
        "experiment=supervised_fashion_mnist",
        *fast,
        "data.root=nowhere",
        "run_id=smoke",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
    )
    assert "fashion_mnist: train 55000, val 5000, test 10000 images of 1x32x32" in proc.stdout + proc.stderr
    with open(lgen.cwd / "runs/supervised_fashion_mnist/smoke/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert len(val_acc) == 1 and 0 <= val_acc[0] <= 1
