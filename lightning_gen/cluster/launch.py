"""Processes started by an external launcher agree on their run before anything is written.

``torchrun`` (on one node or several), ``mpirun`` or a hand-written script start every training process
itself, each running ``lgen train`` from the start. Each would name its own run (a generated id),
look for its own checkpoint to resume and pick its own W&B id, long before Lightning creates the
process group (in ``trainer.fit``). So global rank 0 decides all three and every other process takes
its answer, through the c10d key-value store at ``MASTER_ADDR:MASTER_PORT``:

- under torchrun the elastic agent of node 0 already serves that store (``TORCHELASTIC_USE_AGENT_STORE``)
  and the process group reuses it later;
- under other launchers global rank 0 serves it, and the process group is told to reuse it (the same
  flag), so the port stays Lightning's.

A run launched by torchrun with ``--rdzv-id NAME`` is named NAME (as a SLURM job is named by its job
id), so launching the same command again resumes it. Not used under SLURM (the job id names the run
and every task sees the same files) nor by the processes Lightning starts itself (they inherit the
run from the process that started them, through ``$LGEN_RUN_ID``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment

AGREEMENT_TIMEOUT = timedelta(minutes=10)  # rank 0 may be scanning checkpoints on a slow file system
_served: list = []  # the store global rank 0 serves when no agent does; it must live as long as the process


def torchelastic_run_id() -> str | None:
    """torchrun's ``--rdzv-id`` (its default, "none", names nothing)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def external_launch(num_nodes: int) -> tuple[int, int] | None:
    """(global rank, world size) when an external launcher started this process as one of several."""
    env = os.environ
    if (
        SLURMEnvironment.detect()
        or env.get("LGEN_RUN_ID")
        or not {"MASTER_ADDR", "MASTER_PORT"} <= env.keys()
    ):
        return None
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if "RANK" in env:  # torchrun, mpirun-style launchers
        return int(env["RANK"]), world
    if "NODE_RANK" in env and "LOCAL_RANK" in env:  # Lightning's variables, set by hand on each node
        return int(env["NODE_RANK"]) * (world // max(num_nodes, 1)) + int(env["LOCAL_RANK"]), world
    return None


def agree(rank: int, world: int, decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Global rank 0's ``decide()``, on every process (a JSON-able dict)."""
    from torch.distributed import TCPStore

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = TCPStore(host, port, world, is_master=False, timeout=AGREEMENT_TIMEOUT)
    else:
        store = TCPStore(
            host,
            port,
            world,
            is_master=rank == 0,
            timeout=AGREEMENT_TIMEOUT,
            wait_for_workers=False,
            multi_tenant=True,
        )
        _served.append(store)
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # init_process_group: a client of this store
    key = f"lgen/run/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        try:
            decided = decide()
        except Exception as error:
            store.set(key, json.dumps({"error": f"{type(error).__name__}: {error}"}))
            raise
        store.set(key, json.dumps(decided))
        return decided
    decided = json.loads(store.get(key))
    if "error" in decided:
        raise RuntimeError(f"global rank 0 could not set the run up ({decided['error']}); see its output")
    return decided
