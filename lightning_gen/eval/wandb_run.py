"""Append offline evaluation results to the W&B run of the training run, and read offline W&B logs.

A training run keeps its W&B id in ``<run_dir>/wandb_id`` (see ``run.py``). Appending resumes that
id (``resume="allow"``): online, the results land in the same run on the server; offline, wandb
writes a new ``offline-run-*-<id>`` folder under ``<run_dir>/wandb`` with the same id, and
``wandb sync`` uploads the folders of one id in order of start time into that one run.

``read_wandb_file`` decodes a ``.wandb`` log (LevelDB log framing of protobuf ``Record``s) without a
server: wandb 0.31 no longer ships a Python reader, and offline runs write no ``wandb-summary.json``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def run_dir_of_checkpoint(ckpt: str | Path) -> Path | None:
    """``runs/<exp>/<id>/checkpoints/x.ckpt`` -> ``runs/<exp>/<id>`` when that folder is a run directory."""
    run_dir = Path(ckpt).resolve().parent.parent
    return run_dir if (run_dir / "config.yaml").is_file() else None


def append_to_run(
    run_dir: Path | None, results: dict[str, float], prefix: str, summary: dict[str, Any] | None = None
) -> str | None:
    """Add ``results`` to the summary (and a history row) of the run's W&B run, and ``summary`` (any
    JSON values, e.g. the provenance of the results) to its summary only; returns its folder or None."""
    if run_dir is None or not (run_dir / "wandb_id").is_file():
        return None
    from lightning_gen.run import wandb_mode

    cfg = OmegaConf.load(run_dir / "config.yaml")
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None) or {}
    if not wandb_cfg.get("enabled", True):
        return None
    mode = wandb_mode(wandb_cfg.get("mode", "auto"))
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(
        id=(run_dir / "wandb_id").read_text().strip(),
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    values = {f"{prefix}/{k}": v for k, v in results.items() if isinstance(v, int | float)}
    run.log(values)
    run.summary.update(values)
    if summary:
        run.summary.update({f"{prefix}/{k}": v for k, v in summary.items()})
    where = str(Path(run.dir).parent)
    run.finish()
    return where


# ---------------------------------------------------------------------------------- reading logs

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B log (missing ':W&B' header)")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a header is zero padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            break


def read_wandb_file(path: str | Path) -> dict[str, Any]:
    """``{"history": [row dicts], "summary": {key: value}, "run_id": str}`` of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, summary, run_id = [], {}, None
    for raw in _records(Path(path)):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return {"history": history, "summary": summary, "run_id": run_id}


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
