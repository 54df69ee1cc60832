"""``lgen shards``: write an ImageNet-style folder tree into shards once, and validate shards.

    lgen shards write /datasets/imagenet /datasets/imagenet-shards --workers 32
    lgen shards validate /datasets/imagenet-shards
    lgen train experiment=simclr_imagenet data=shards data.root=/datasets/imagenet-shards

Each split folder (``train/``, ``val/`` by default) becomes a LitData dataset of items
``{"image": the file's original bytes, "label", "index", "path"}``: JPEGs are stored as they are,
compressed, and decoded only when training reads them. ``index`` is the file's position in the sorted
listing (as ``data=folder`` numbers it) and ``path`` its name relative to the split folder. The files
are written in a seeded random order, so every shard holds a random mix of classes (a batch streams
from a few shards at a time). Writing runs in parallel worker processes with a progress bar; every
file's header is checked on the way (an unreadable file stops the write and is named).

Afterwards each shard's SHA-256 and the manifest (classes, sample and label counts) are added to the
split's ``index.json``, and the shards are validated: every listed shard present with its size and
checksum, every item readable with a label in range, the indices exactly 0..N-1, the label counts
those of the source tree, and a sample of images (``--decode``) decoded. ``lgen shards validate``
runs the same checks later, e.g. after copying the shards. Upload the folder to an object store as
it is (``aws s3 sync``, ``gsutil -m rsync``) and set ``data.root`` to its URL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lightning_gen.data.decode import decode, image_size
from lightning_gen.data.folder import list_image_folder
from lightning_gen.data.shards import MANIFEST_KEY, ShardError, check_local_chunks, chunk_of, read_index

FORMAT_VERSION = 1


def _item(entry: tuple[str, int, int, str]) -> dict:
    """One file as a shard item (runs in LitData's writer processes). The header must parse."""
    path, label, index, name = entry
    data = Path(path).read_bytes()
    try:
        image_size(data)
    except Exception as error:
        raise ShardError(
            f"{path} is not an image file that can be read ({type(error).__name__}): fix or remove it"
        ) from error
    return {"image": data, "label": label, "index": index, "path": name}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _optimize(entries: list, out: Path, workers: int, chunk_bytes: str, overwrite: bool) -> None:
    from litdata import optimize

    optimize(
        fn=_item,
        inputs=entries,
        output_dir=str(out),
        num_workers=workers,
        chunk_bytes=chunk_bytes,
        reorder_files=False,
        mode="overwrite" if overwrite else None,
        # fork: the writers inherit the imported modules instead of importing torch again (seconds each);
        # nothing here has started threads or CUDA before the fork
        start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
    )


def write_split(
    folder: Path, out: Path, classes: list[str], workers: int, chunk_bytes: str, seed: int, overwrite: bool
) -> dict:
    """Write one split folder into ``out``; returns its manifest."""
    files, labels = list_image_folder(folder, classes)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ShardError(
                f"{out} exists and is not empty: choose another output folder or pass --overwrite"
            )
        shutil.rmtree(out)
    order = np.random.default_rng(seed).permutation(len(files))
    entries = [(str(files[i]), labels[i], int(i), files[i].relative_to(folder).as_posix()) for i in order]
    print(f"[shards] {folder}: {len(files)} images of {len(classes)} classes -> {out}", flush=True)
    started = time.time()
    try:
        _optimize(entries, out, workers, chunk_bytes, overwrite)
    except RuntimeError as error:
        shutil.rmtree(out, ignore_errors=True)  # a partial write is of no use
        print(file=sys.stderr, flush=True)  # end the progress bar's line
        if "ShardError" in str(error):
            raise ShardError(str(error)) from None
        raise
    index_path = out / "index.json"
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL
        digests = dict(
            zip(
                (c["filename"] for c in index["chunks"]),
                pool.map(sha256, (out / c["filename"] for c in index["chunks"])),
            )
        )
    manifest = {
        "format": FORMAT_VERSION,
        "classes": classes,
        "num_samples": len(files),
        "label_counts": np.bincount(labels, minlength=len(classes)).tolist(),
        "sha256": digests,
        "source": str(folder.resolve()),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    index[MANIFEST_KEY] = manifest
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(index_path)
    size = sum(c["chunk_bytes"] for c in index["chunks"])
    print(
        f"[shards] wrote {len(index['chunks'])} shards, {size / 1e9:.2f} GB, in {time.time() - started:.0f} s",
        flush=True,
    )
    return manifest


def validate_split(
    location: Path, decode_samples: int = 32, checksums: bool = True, workers: int = 4
) -> dict:
    """Check one written split; raises ShardError naming the first problem, returns a summary."""
    from litdata import StreamingDataset

    index = read_index(str(location))
    manifest = index[MANIFEST_KEY]
    check_local_chunks(str(location), index)
    if checksums:
        names = [c["filename"] for c in index["chunks"]]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for name, digest in zip(names, pool.map(sha256, (location / n for n in names))):
                if digest != manifest["sha256"].get(name):
                    raise ShardError(
                        f"shard {location / name} is corrupt (its SHA-256 differs from the one written): "
                        "copy it again or rewrite the shards with `lgen shards write`"
                    )
    n = manifest["num_samples"]
    listed = sum(c["chunk_size"] for c in index["chunks"])
    if listed != n:
        raise ShardError(f"{location}: the shards hold {listed} items but {n} images were written")
    dataset = StreamingDataset(str(location))
    seen = np.zeros(n, dtype=np.int64)
    counts = np.zeros(len(manifest["classes"]), dtype=np.int64)
    position = 0
    try:
        for item in dataset:
            label, i = int(item["label"]), int(item["index"])
            if not 0 <= label < len(counts) or not 0 <= i < n:
                raise ValueError(f"label {label} / index {i} out of range")
            counts[label] += 1
            seen[i] += 1
            position += 1
    except ShardError:
        raise
    except Exception as error:
        raise ShardError(
            f"shard {location / chunk_of(index, position)} is damaged: item {position} cannot be read "
            f"({type(error).__name__}: {error})"
        ) from error
    if (seen != 1).any():
        bad = int(np.flatnonzero(seen != 1)[0])
        raise ShardError(f"{location}: image index {bad} is stored {int(seen[bad])} times (expected once)")
    if counts.tolist() != manifest["label_counts"]:
        raise ShardError(f"{location}: the label counts {counts.tolist()} differ from the source's")
    for position in np.linspace(0, n - 1, min(decode_samples, n)).astype(int).tolist():
        item = dataset[position]
        try:
            decode(item["image"])
        except Exception as error:
            raise ShardError(
                f"image {item['path']} (index {item['index']}) in shard {location / chunk_of(index, position)} "
                f"does not decode ({type(error).__name__}: {error})"
            ) from error
    return {"split": location.name, "images": n, "classes": len(counts), "shards": len(index["chunks"])}


def write_shards(
    source: Path,
    out: Path,
    splits: tuple[str, ...] = ("train", "val"),
    workers: int = 4,
    chunk_bytes: str = "128MB",
    seed: int = 0,
    overwrite: bool = False,
    validate: bool = True,
) -> list[dict]:
    train = source / splits[0]
    if not train.is_dir():
        raise ShardError(
            f"{train} is not a folder: expected {source}/<split>/<class>/<image> for splits {splits}"
        )
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())  # the first split names the classes
    for split in splits:
        if not (source / split).is_dir():
            raise ShardError(f"split folder {source / split} does not exist (splits: {', '.join(splits)})")
    for split in splits:
        write_split(source / split, out / split, classes, workers, chunk_bytes, seed, overwrite)
    return [validate_split(out / split, workers=workers) for split in splits] if validate else []


# ------------------------------------------------------------------------------ CLI plugin


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="action", required=True)
    write = sub.add_parser(
        "write",
        help="write an image-folder tree into shards, then validate them",
        description="Write SOURCE/<split>/<class>/<image> into OUT/<split>/ (LitData shards of the original "
        "compressed bytes, labels, indices), in parallel, then validate them.",
        epilog="example:\n  lgen shards write /datasets/imagenet /datasets/imagenet-shards --workers 32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    write.add_argument("source", type=Path, help="the image-folder root, holding train/ and val/")
    write.add_argument(
        "out", type=Path, help="a local folder for the shards (upload it to an object store after)"
    )
    write.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="split folders (default: train val)"
    )
    write.add_argument("--workers", type=int, default=4, help="writer processes (default: 4)")
    write.add_argument("--chunk-bytes", default="128MB", help="shard size (default: 128MB)")
    write.add_argument("--seed", type=int, default=0, help="seed of the random order of files in the shards")
    write.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT")
    write.add_argument("--no-validate", action="store_true", help="skip the validation after writing")
    check = sub.add_parser(
        "validate",
        help="check written shards: presence, sizes, checksums, counts, labels, decodable images",
        description="Check the shards in PATH/<split>/ against their manifest; the first problem is an error.",
        epilog="example:\n  lgen shards validate /datasets/imagenet-shards --decode 256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("path", type=Path, help="the folder written by `lgen shards write`")
    check.add_argument("--splits", nargs="+", default=["train", "val"])
    check.add_argument("--decode", type=int, default=32, help="images decoded per split (default: 32)")
    check.add_argument("--no-checksums", action="store_true", help="skip the SHA-256 of every shard")
    check.add_argument("--workers", type=int, default=4, help="threads hashing shards (default: 4)")


def main(args: argparse.Namespace) -> int:
    if args.action == "write":
        reports = write_shards(
            args.source,
            args.out,
            tuple(args.splits),
            args.workers,
            args.chunk_bytes,
            args.seed,
            args.overwrite,
            validate=not args.no_validate,
        )
    else:
        reports = [
            validate_split(args.path / split, args.decode, not args.no_checksums, args.workers)
            for split in args.splits
        ]
    for r in reports:
        print(
            f"[shards] {r['split']}: valid: {r['images']} images, {r['classes']} classes, {r['shards']} shards"
        )
    return 0
