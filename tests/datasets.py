"""Writers of tiny datasets in the real on-disk formats the DataModules read (and torchvision downloads)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def random_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """idx format: 0x0000, dtype code 0x08 (uint8), ndim, big-endian int32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 12, gz: bool = False):
    raw = root / folder / "raw"
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = random_images(n, (28, 28), seed=n), rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar10(root: Path, n_per_batch: int = 8, n_test: int = 10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    batches = []
    for i in range(1, 6):
        data = random_images(n_per_batch, (3 * 32 * 32,), seed=i)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump({"data": data, "labels": labels, "batch_label": f"training batch {i} of 5"}, handle)
        batches.append((data, labels))
    test = random_images(n_test, (3 * 32 * 32,), seed=99)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": test, "labels": rng.integers(0, 10, n_test).tolist()}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return batches


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(folder / name, "wb") as handle:
            pickle.dump(
                {
                    "data": random_images(n, (3072,), seed=n),
                    "fine_labels": rng.integers(0, 100, n).tolist(),
                    "coarse_labels": rng.integers(0, 20, n).tolist(),
                },
                handle,
            )


def write_stl10(root: Path, n_train: int = 12, n_test: int = 8, n_unlabeled: int = 20):
    """STL-10 binaries: images column-major (N, 3, 96(W), 96(H)), labels 1..10 as uint8."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    images_hw = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        chw = random_images(n, (3, 96, 96), seed=n + 7)  # (N, C, H, W) as the reader should return
        chw.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # stored as (N, C, W, H)
        images_hw[split] = chw
        if split != "unlabeled":
            (rng.integers(1, 11, n).astype(np.uint8)).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    return images_hw


def write_svhn(root: Path, n_train: int = 16, n_test: int = 8):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = random_images(n, (32, 32, 3), seed=n + 11)  # (N, H, W, C)
        labels = np.arange(1, n + 1) % 10 + 1  # 1..10, where 10 means the digit 0
        savemat(
            str(root / f"{split}_32x32.mat"), {"X": images.transpose(1, 2, 3, 0), "y": labels.reshape(-1, 1)}
        )
        out[split] = (images, labels)
    return out


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3, size: int = 40):
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.full((size, size + 8, 3), 40 * c + 10 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def coordinate_image(height: int, width: int) -> np.ndarray:
    """RGB pixels whose red value is the column and green the row (sides up to 256): any crop of it,
    resized, tells where in the original it was cut."""
    assert height <= 256 and width <= 256
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    pixels[..., 2] = 128
    return pixels


def write_coordinate_folder(root: Path, sizes=((180, 240), (240, 180), (100, 250)), classes=("a", "b")):
    """train/ and val/ trees of lossless (PNG) coordinate images, every size in every class."""
    from PIL import Image

    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, (h, w) in enumerate(sizes):
                Image.fromarray(coordinate_image(h, w)).save(folder / f"{i}.png")
    return [size for _ in classes for size in sizes]  # (height, width) of every train image, by index
