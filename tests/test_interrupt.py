"""SIGTERM and SIGINT sent to a real `lgen train` process: it stops at a step boundary that every rank
agrees on, saves, prints its summary and the resume command, and exits with 128 + the signal number."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_gen.checkpoint import load_checkpoint
from tests.conftest import FAST, lgen_env, run_lgen

# Long enough that only the signal ends it; every epoch is 3 steps and ends with last.ckpt.
ENDLESS = [
    "experiment=ae_digits",
    *FAST,
    "trainer.max_epochs=1000",
    "callbacks.images.enabled=false",
    "callbacks.linear_probe.enabled=false",
    "callbacks.knn.enabled=false",
    "callbacks.clustering.enabled=false",
]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_gen", "train", *args],
        cwd=cwd,
        env=lgen_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"{path} never appeared (exit {proc.returncode})\n{out[-3000:]}\n{err[-3000:]}"
            )
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    """Wait for the run to exit; one that does not is killed with its child processes (DDP ranks)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*children(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"the run did not exit within {timeout} s\n{out[-3000:]}\n{err[-3000:]}"
        ) from None


def stopped_step(stdout: str, name: str) -> int:
    match = re.search(
        rf"stopped_by\s+{name} at step (\d+): checkpoint saved, exit code {128 + signal.Signals[name]}",
        stdout,
    )
    assert match, stdout[-3000:]
    return int(match.group(1))


def test_sigterm_saves_prints_the_resume_command_and_exits_143(tmp_path):
    args = [*ENDLESS, "run_id=term"]
    proc = start(args, tmp_path)
    last = tmp_path / "runs" / "ae_digits" / "term" / "checkpoints" / "last.ckpt"
    wait_for(last, proc)  # training is under way
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    step = stopped_step(out, "SIGTERM")
    assert load_checkpoint(last)["global_step"] == step  # saved at the step it stopped at

    command = re.search(r"resume_command\s+(.+)", out).group(1)
    assert shlex.split(command) == [sys.executable, "-m", "lightning_gen", "train", *args]
    # The printed command resumes the run (one extra override makes it end, two steps on).
    resumed = run_lgen(*shlex.split(command)[3:], f"trainer.max_steps={step + 2}", cwd=tmp_path)
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert load_checkpoint(last)["global_step"] == step + 2


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.ddp
def test_sigint_to_rank_zero_alone_stops_both_ddp_ranks_at_the_same_step(tmp_path):
    proc = start([*ENDLESS, "trainer.devices=2", "trainer.accelerator=cpu", "run_id=int"], tmp_path)
    last = tmp_path / "runs" / "ae_digits" / "int" / "checkpoints" / "last.ckpt"
    wait_for(last, proc)
    (rank1,) = children(proc.pid)  # Lightning started rank 1 as a child process of rank 0
    os.kill(
        proc.pid, signal.SIGINT
    )  # as `kill -INT`: rank 1 receives nothing, it learns at the step boundary
    out, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    step = stopped_step(out, "SIGINT")
    assert load_checkpoint(last)["global_step"] == step
    # Rank 1 stopped too: had it trained on, its next gradient all-reduce would wait forever for rank 0.
    deadline = time.time() + 60
    while running(rank1) and time.time() < deadline:
        time.sleep(0.2)
    assert not running(rank1), "rank 1 is still running"


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
