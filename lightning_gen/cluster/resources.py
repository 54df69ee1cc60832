"""Can the resources a job asks for feed its recipe? Estimates behind ``lgen submit``'s warnings.

Each check compares ``cluster.*`` with what the training processes of one node will need:

- CPUs: every task (one DDP process) runs ``data.num_workers`` loader processes besides itself, so
  ``cluster.cpus_per_task`` must be at least ``data.num_workers + 1``. With fewer, the DataModule
  starts only as many workers as it has CPUs and the GPUs wait for data.
- Memory (``--mem`` is per node): every task holds its own copy of an in-memory dataset (uint8
  images), plus a base of about 1 GiB for a CPU process (Python, PyTorch, the loggers; measured for
  the embedded default) or 4 GiB for a GPU process (CUDA's host side, pinned buffers), plus about
  0.5 GiB per loader worker. These are estimates: the warning says what it assumed.

Nothing here stops a submission; ``lgen submit`` prints the warnings and goes on.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

GIB = 1024**3
BASE_BYTES = {"cpu": 1 * GIB, "gpu": 4 * GIB}
WORKER_BYTES = GIB // 2

# Images each process keeps in memory (every split it loads), for the datasets that load into a tensor.
IN_MEMORY_IMAGES = {
    "digits": 1797,
    "color_digits": 1797,
    "mnist": 70_000,
    "fashion_mnist": 70_000,
    "cifar10": 60_000,
    "cifar100": 60_000,
    "svhn": 73_257 + 26_032,
}
STL10_SPLITS = {"train": 5_000, "test": 8_000, "unlabeled": 100_000}
SVHN_EXTRA = 531_131


def memory_bytes(text: str | None) -> int | None:
    """SLURM's --mem: a number with an optional K/M/G/T suffix (no suffix: megabytes); None or 0: not set."""
    if text in (None, "", "0"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", str(text).strip().upper())
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2) or "M"
    return int(number * 1024 ** {"K": 1, "M": 2, "G": 3, "T": 4}[unit])


def dataset_images(data: DictConfig) -> int | None:
    """How many images one process holds in memory, or None when the dataset streams from disk."""
    name = data.name
    if name == "stl10":
        train = sum(STL10_SPLITS[p] for p in data.train_split.split("+") if p in STL10_SPLITS)
        labeled_copy = STL10_SPLITS["train"] if "unlabeled" in data.train_split else 0  # evaluation's view
        return train + STL10_SPLITS["test"] + labeled_copy
    if name == "svhn":
        return IN_MEMORY_IMAGES["svhn"] + (SVHN_EXTRA if data.get("use_extra") else 0)
    if name == "folder":
        if not data.get("in_memory"):
            return None
        root = Path(data.root)
        folders = [root / data.train_dir, root / data.val_dir]
        if not all(f.is_dir() for f in folders):
            return None  # not on this machine: nothing to count
        return sum(len(list(c.iterdir())) for f in folders for c in f.iterdir() if c.is_dir())
    return IN_MEMORY_IMAGES.get(name)


def dataset_bytes(data: DictConfig) -> int | None:
    from lightning_gen import registry

    images = dataset_images(data)
    if images is None:
        return None
    cls = registry.get("data", data.name).cls
    channels = data.get("channels") or cls.channels
    size = data.image_size or cls.native_size
    return images * channels * size * size


def warnings_for(cfg: DictConfig, tasks_per_node: int) -> list[str]:
    """Why the resources of ``cfg.cluster`` may not feed this recipe (empty when they look sufficient)."""
    cluster, data = cfg.cluster, cfg.data
    found = []
    workers = data.num_workers
    if cluster.cpus_per_task < workers + 1:
        found.append(
            f"cluster.cpus_per_task={cluster.cpus_per_task} cannot feed data.num_workers={workers}: each task "
            f"runs {workers} loader processes besides the training process, and with fewer CPUs the loader "
            f"starts fewer of them. Ask for cluster.cpus_per_task={workers + 2} "
            f"(or set data.num_workers={max(cluster.cpus_per_task - 1, 0)})"
        )
    asked = memory_bytes(cluster.mem)
    held = dataset_bytes(data) or 0
    if asked is not None:
        kind = "gpu" if cluster.gpus_per_node > 0 else "cpu"
        per_task = BASE_BYTES[kind] + held + workers * WORKER_BYTES
        needed = tasks_per_node * per_task
        if asked < needed:
            parts = [f"~{BASE_BYTES[kind] / GIB:.0f} GiB per {kind.upper()} process"]
            if held:
                parts.append(f"{held / GIB:.1f} GiB of {data.name} images that every process holds in memory")
            if workers:
                parts.append(f"~{WORKER_BYTES / GIB:.1f} GiB per loader worker ({workers} per task)")
            found.append(
                f"cluster.mem={cluster.mem} (per node) looks too small for {tasks_per_node} task(s) per node: "
                f"estimated {needed / GIB:.1f} GiB from {', '.join(parts)}. "
                f"Ask for cluster.mem={int(-(-needed * 1.25 // GIB))}G"
            )
    return found
