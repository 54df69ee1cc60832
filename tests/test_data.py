"""Each DataModule reads tiny datasets written in the real on-disk format; missing data is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_gen import registry
from lightning_gen.config import compose, section_object
from lightning_gen.data.base import DatasetMissingError
from tests import datasets


def datamodule(*overrides: str):
    cfg = compose(list(overrides))
    return registry.build("data", section_object(cfg.data))


def test_digits_embedded_split_is_deterministic_uint8_and_upsampled():
    dm = datamodule("data=digits", "data.image_size=16", "data.val_fraction=0.2")
    dm.setup()
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 16, 16)
    assert len(train) + len(val) + len(test) == 1797
    again = datamodule("data=digits", "data.image_size=16", "data.val_fraction=0.2")
    again.setup()
    assert torch.equal(again.datasets["val"].images, val.images)
    other_seed = datamodule("data=digits", "data.image_size=16", "data.val_fraction=0.2", "data.split_seed=1")
    other_seed.setup()
    assert not torch.equal(other_seed.datasets["val"].labels, val.labels)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"} and batch["image"].dtype == torch.uint8
    assert dm.info.channels == 1 and dm.info.image_size == 16 and dm.info.num_classes == 10


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    arrays = datasets.write_mnist(tmp_path, gz=gz)
    dm = datamodule("data=mnist", f"data.root={tmp_path}", "data.image_size=null", "data.val_fraction=0")
    dm.setup()
    images, labels = arrays["t10k"]
    assert torch.equal(dm.datasets["test"].images[:, 0], torch.from_numpy(images))
    assert torch.equal(dm.datasets["test"].labels, torch.from_numpy(labels.astype(np.int64)))
    assert len(dm.datasets["train"]) == 40


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    datasets.write_mnist(tmp_path, folder="FashionMNIST")
    dm = datamodule("data=fashion_mnist", f"data.root={tmp_path}", "data.val_fraction=0.25")
    dm.setup()
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["val"]) == 10
    assert dm.datasets["train"].images.shape[-1] == 32  # resized from 28 by the config


def test_cifar10_pickle_batches(tmp_path):
    batches = datasets.write_cifar10(tmp_path)
    dm = datamodule("data=cifar10", f"data.root={tmp_path}")
    dm.setup()
    train = dm.datasets["train"]
    assert len(train) == 40 and train.images.shape[1:] == (3, 32, 32)
    first = torch.from_numpy(batches[0][0][0].reshape(3, 32, 32))
    assert torch.equal(train.images[0], first)  # channel-major rows as in the CIFAR format
    assert train.labels[:8].tolist() == batches[0][1]
    assert dm.datasets["val"] is dm.datasets["test"]  # val_fraction 0 -> validate on the test split


def test_cifar100_fine_labels(tmp_path):
    datasets.write_cifar100(tmp_path)
    dm = datamodule("data=cifar100", f"data.root={tmp_path}")
    dm.setup()
    assert dm.num_classes == 100 and len(dm.datasets["train"]) == 30
    assert int(dm.datasets["train"].labels.max()) < 100


def test_stl10_binaries_with_unlabeled_split(tmp_path):
    written = datasets.write_stl10(tmp_path)
    dm = datamodule("data=stl10", f"data.root={tmp_path}", "data.image_size=null")
    dm.setup()
    train = dm.datasets["train"]
    assert len(train) == 12 + 20
    assert torch.equal(
        train.images[0], torch.from_numpy(written["train"][0])
    )  # (W, H) storage transposed back
    assert (train.labels[12:] == -1).all() and (train.labels[:12] >= 0).all()
    assert (train.labels[:12] <= 9).all()  # stored 1..10, read as 0..9
    eval_batch = next(iter(dm.eval_dataloader("train")))  # the evaluation view keeps labeled images only
    assert (eval_batch["label"] >= 0).all() and len(dm.eval_dataloader("train").dataset) == 12


def test_svhn_mat_files_map_label_10_to_digit_0(tmp_path):
    written = datasets.write_svhn(tmp_path)
    dm = datamodule("data=svhn", f"data.root={tmp_path}")
    dm.setup()
    images, labels = written["test"]
    test = dm.datasets["test"]
    assert torch.equal(test.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert test.labels.tolist() == (labels % 10).tolist()


def test_image_folder_tree(tmp_path):
    datasets.write_image_folder(tmp_path / "tree")
    dm = datamodule(
        "data=folder", f"data.root={tmp_path / 'tree'}", "data.image_size=24", "data.batch_size=4"
    )
    dm.setup()
    assert dm.classes == ["cat", "dog", "eel"] and dm.num_classes == 3
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (3, 24, 24) and batch["image"].dtype == torch.uint8
    assert sorted(set(dm.datasets["val"].labels.tolist())) == [0, 1, 2]


def test_missing_dataset_names_folder_files_and_download_command(tmp_path):
    dm = datamodule("data=cifar10", f"data.root={tmp_path}")
    with pytest.raises(DatasetMissingError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert str(tmp_path) in message and "data_batch_1" in message and "test_batch" in message
    assert f"lgen prepare data=cifar10 data.root={tmp_path} data.download=true" in message


def test_missing_dataset_via_cli_is_a_clean_error(lgen, tmp_path):
    proc = lgen(
        "train", "data=mnist", f"data.root={tmp_path / 'nowhere'}", "logger.wandb.enabled=false", check=False
    )
    assert proc.returncode == 2
    assert "MNIST/raw/train-images-idx3-ubyte" in proc.stderr and "data.download=true" in proc.stderr
    assert "Traceback" not in proc.stderr
