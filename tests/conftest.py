"""Shared test helpers: run the real `lgen` CLI in a subprocess, and fast overrides for tiny runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Lightning gives its logger a StreamHandler bound to sys.stderr as it is at import. Imported first inside a
# test that captures output (capsys), that handler would keep the test's stream, closed when the test ends,
# and every later Lightning log line would print "--- Logging error ---". Importing it here binds the
# session's stream.
import lightning.pytorch  # noqa: F401
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Overrides that make any experiment tiny: small images, few steps, no progress bar, no W&B.
FAST = [
    "data.image_size=16",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "callbacks.embedding_plot.enabled=false",  # t-SNE is the slowest evaluation callback
]


def lgen_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    env.pop("LGEN_RUN_ID", None)
    # wandb.init in this process (the in-process `lgen eval` tests) starts a W&B service and names it
    # in WANDB_SERVICE; a child that inherits it sends its runs to that service instead of its own (its
    # offline file is written when this process's service gets to it, and a resumed id is "in use").
    env.pop("WANDB_SERVICE", None)
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    env.update(extra)
    return env


def run_lgen(*args: str, cwd: Path, timeout: float = 600, check: bool = True, env: dict | None = None):
    """Run `python -m lightning_gen ARGS` in ``cwd``; on failure show the output tail."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_gen", *args],
        cwd=cwd,
        env=env or lgen_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lgen {' '.join(args)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def lgen(tmp_path):
    """``lgen(*args)`` runs the CLI in a fresh folder (``runs/`` lands there)."""

    def call(*args: str, **kwargs):
        kwargs.setdefault("cwd", tmp_path)
        return run_lgen(*args, **kwargs)

    call.cwd = tmp_path
    return call


def start_gloo_workers(fn, world: int, *args, preload: tuple[str, ...] = ()) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes and wait for them (they set up gloo).

    The processes are forked from one forkserver that imported ``preload`` (torch, Lightning, the
    modules ``fn`` needs) once: each spawned process would import them again, which costs more
    than the test itself on a shared 2-core machine. The forkserver has run no torch op, so forking
    it is safe; if an earlier test started the forkserver, the preload list is ignored (slower, same result).
    """
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", *preload])
    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="forkserver")
