"""One run per launch under torchrun on two nodes (lightning_gen.cluster.launch), tried on this machine.

Two ``torchrun --nnodes 2 --nproc-per-node 1`` processes meet at a c10d rendezvous on localhost, as two
nodes would, and each starts one `lgen train` worker (`trainer.num_nodes=2 trainer.devices=1`, gloo).
The first launch has no run name: global rank 0 generates it and the other node takes it (without the
agreement each node would name its own run). The second launch names the run by torchrun's
``--rdzv-id`` and both nodes resume from the same checkpoint. One run directory, one W&B id.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import FAST, lgen_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
ARGS = [
    "train",
    "experiment=ae_digits",
    *[a for a in FAST if not a.startswith(("logger.wandb", "trainer.limit_train_batches"))],
    "trainer.limit_train_batches=4",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "callbacks.images.enabled=false",
]
AGREED = re.compile(r"\[lgen\] global rank (\d) of 2: run (\S+) as global rank 0 decided, resuming from (.*)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(cwd, *extra: str, rdzv_id: str = "none") -> list[tuple[str, str, str]]:
    """Start both "nodes" and return each node's (global rank, run id, resumed from) as it reported them."""
    rendezvous = [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        rdzv_id,
    ]
    env = lgen_env(OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            [*TORCHRUN, *rendezvous, "-m", "lightning_gen", *ARGS, *extra],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    reports = [AGREED.findall(output) for output in outputs]
    assert all(len(r) == 1 for r in reports), outputs  # one line per node
    return sorted(r[0] for r in reports)


@pytest.mark.ddp
def test_two_torchrun_nodes_share_one_run_directory_wandb_run_and_resume(tmp_path):
    first = launch_two_nodes(tmp_path, "callbacks.stop_after.steps=2")
    (rank0, run_id, resumed0), (rank1, run_id1, resumed1) = first
    assert (rank0, rank1) == ("0", "1") and run_id1 == run_id  # the generated name, taken from rank 0
    assert resumed0 == resumed1 == "nothing (a new run)"
    runs = tmp_path / "runs" / "ae_digits"
    assert [p.name for p in runs.iterdir()] == [run_id]

    second = launch_two_nodes(tmp_path, rdzv_id=run_id)  # the same run, named by torchrun's --rdzv-id
    checkpoint = f"runs/ae_digits/{run_id}/checkpoints/last.ckpt"
    assert second == [("0", run_id, checkpoint), ("1", run_id, checkpoint)]
    assert [p.name for p in runs.iterdir()] == [run_id]
    final = torch.load(runs / run_id / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 4  # 2 steps, then the 2 left of the epoch after the resume

    wandb_id = (runs / run_id / "wandb_id").read_text().strip()
    segments = sorted((runs / run_id / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in segments)
