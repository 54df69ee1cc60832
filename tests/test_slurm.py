"""`lgen submit` on a real (one-node, local) SLURM cluster: DDP job, preemption + requeue, job array,
and the multi-node code path. Skipped, with the command that enables them, where no cluster runs."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import lgen_env, run_lgen

pytestmark = pytest.mark.slurm

ENABLE = (
    "needs a running SLURM cluster: sudo apt-get install -y slurm-wlm munge && "
    "sudo slurm/local-cluster.sh start && export SLURM_CONF=/tmp/lgen-slurm/slurm.conf"
)
MAX_STEPS = 40
# Tiny CPU DDP training: 2 processes x 32 digits images of 16x16 per step, 19 steps per epoch.
TRAIN = [
    "experiment=ae_digits",
    "data.image_size=16",
    "data.batch_size=32",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.max_epochs=100",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "callbacks.images.enabled=false",
]
# The weight comparison needs the same float reduction order on both sides: a CPU kernel splits its
# sums by thread count, and Lightning gives a process cpu_count // local processes threads, which
# differs between 1 node x 2 processes and 2 "nodes" x 1 process (CI failed on a many-core machine).
ONE_THREAD = "1"
JOB = ["cluster.cpus_per_task=1", "cluster.mem=1G", "cluster.time=00:15:00", "cluster.signal_grace_s=30"]


def _slurm_conf() -> str | None:
    conf = os.environ.get("SLURM_CONF") or "/tmp/lgen-slurm/slurm.conf"
    return conf if Path(conf).is_file() else None


@pytest.fixture(scope="module")
def slurm_env():
    conf = _slurm_conf()
    if shutil.which("sbatch") is None or conf is None:
        pytest.skip(ENABLE)
    probe = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True
    )
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip(f"SLURM at {conf} does not answer ({probe.stderr.decode().strip()}); {ENABLE}")
    return lgen_env(SLURM_CONF=conf)


def slurm(env, *command: str) -> str:
    return subprocess.run(list(command), env=env, capture_output=True, text=True, check=True).stdout


def job_fields(env, job_id: str) -> list[dict[str, str]]:
    """One dict per job (array: per task) from `scontrol show job -o`."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def wait_done(env, job_id: str, log: Path | None = None, timeout: float = 300) -> list[dict[str, str]]:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    jobs = wait_for(
        lambda: (j := job_fields(env, job_id)) and all(x["JobState"] in done for x in j) and j,
        timeout,
        f"job {job_id} to finish",
        log,
    )
    assert all(j["JobState"] == "COMPLETED" for j in jobs), (
        f"{jobs}\n{log.read_text()[-4000:] if log else ''}"
    )
    return jobs


def submitted_job(proc) -> str:
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def optimizer_steps(checkpoint: dict) -> set[int]:
    return {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def lr_by_step(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["lr"]) for r in metric_rows(run_dir) if r.get("lr")}


class Reference:
    """The same training, uninterrupted and outside SLURM: 1 node x 2 CPU processes. It starts in
    the background while the SLURM jobs run; ``run_dir()`` waits for it."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        args = ["train", *TRAIN, "trainer.devices=2", "logger.wandb.enabled=false", "run_id=ref"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lightning_gen", *args],
            cwd=cwd,
            env=lgen_env(OMP_NUM_THREADS=ONE_THREAD),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run_dir(self) -> Path:
        if self.proc.returncode is None:
            self.output, _ = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, self.output[-4000:]
        return self.cwd / "runs" / "ae_digits" / "ref"


@pytest.fixture(scope="module")
def reference(slurm_env, tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.communicate()


def test_preempted_ddp_job_requeues_and_resumes_with_nothing_lost(slurm_env, reference, tmp_path):
    env = {**slurm_env, "OMP_NUM_THREADS": ONE_THREAD}  # sbatch passes the environment on to the job
    proc = run_lgen("submit", *TRAIN, *JOB, "trainer.devices=2", cwd=tmp_path, env=env)
    job_id = submitted_job(proc)
    run_dir = tmp_path / "runs" / "ae_digits" / job_id
    log = run_dir / f"slurm-{job_id}.out"
    assert f"tail -f {log}" in proc.stdout
    assert (run_dir / "job.sbatch").read_text().count("#SBATCH --ntasks-per-node=2") == 1

    # Preempt while it trains: SIGUSR1 to the training processes, as --signal does before the time limit.
    wait_for(lambda: list((run_dir / "checkpoints").glob("step*.ckpt")), 240, "training to start", log)
    slurm(slurm_env, "scancel", "--signal=USR1", job_id)
    (job,) = wait_for(
        lambda: [
            j for j in job_fields(slurm_env, job_id) if j["Restarts"] == "1" and j["JobState"] == "PENDING"
        ],
        120,
        "the job to requeue itself",
        log,
    )
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved_step = ckpt(hpc)["global_step"]
    assert 0 < saved_step < MAX_STEPS
    before = {
        "rows": metric_rows(run_dir),
        "config": (run_dir / "config.yaml").read_text(),
        "wandb": {p: p.stat().st_size for p in (run_dir / "wandb").glob("offline-run-*/*.wandb")},
    }
    assert before["rows"] and before["wandb"]
    # SLURM holds a requeued job back ~2 minutes (its BeginTime); the local cluster may start it now.
    slurm(slurm_env, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
    wait_done(slurm_env, job_id, log)

    text = log.read_text()
    reference = reference.run_dir()
    assert f"checkpoint at step {saved_step} and requeue" in text
    assert f"Restored all states from the checkpoint at runs/ae_digits/{job_id}/hpc_ckpt_1.ckpt" in text
    last, ref = ckpt(run_dir / "checkpoints" / "last.ckpt"), ckpt(reference / "checkpoints" / "last.ckpt")
    assert last["global_step"] == ref["global_step"] == MAX_STEPS
    assert optimizer_steps(last) == optimizer_steps(ref) == {MAX_STEPS}
    # Bitwise the uninterrupted run's weights: the resume continued the interrupted epoch at the next
    # batch (loader position and every rank's random streams come back from the checkpoint).
    for name, value in ref["state_dict"].items():
        assert torch.equal(last["state_dict"][name], value), name
    # the stateless LR schedule lands on the uninterrupted run's values after the resume
    lr, ref_lr = lr_by_step(run_dir), lr_by_step(reference)
    assert max(lr) == max(ref_lr) == MAX_STEPS - 1
    for step in range(saved_step, MAX_STEPS):
        assert lr[step] == pytest.approx(ref_lr[step], rel=1e-6)

    # nothing written before the preemption is lost
    rows = metric_rows(run_dir)
    after = [{k: r.get(k, "") for k in before["rows"][0]} for r in rows]
    assert all(row in after for row in before["rows"])
    assert max(int(r["step"]) for r in rows) == MAX_STEPS - 1
    assert (run_dir / "config.yaml").read_text() == before["config"]
    for path, size in before["wandb"].items():
        assert path.stat().st_size >= size
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    assert len(segments) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in segments)


def test_sweep_runs_one_array_task_per_combination(slurm_env, tmp_path):
    sweep = "sweep=method.latent_dim=8,16"
    quick = [*TRAIN, "trainer.max_steps=4", "trainer.devices=1", "logger.wandb.enabled=false"]
    proc = run_lgen("submit", *quick, *JOB, sweep, cwd=tmp_path, env=slurm_env)
    job_id = submitted_job(proc)
    assert "(array of 2 tasks)" in proc.stdout
    wait_done(slurm_env, job_id)
    for task, latent in enumerate([8, 16]):
        run_dir = tmp_path / "runs" / "ae_digits" / f"{job_id}_{task}"
        assert (run_dir / f"slurm-{job_id}_{task}.out").exists()
        config = OmegaConf.load(run_dir / "config.yaml")
        assert config.method.latent_dim == latent and config.run_id == f"{job_id}_{task}"
        last = ckpt(run_dir / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 4 and last["hyper_parameters"]["cfg"]["latent_dim"] == latent


def test_two_nodes_of_one_device_match_one_node_of_two(slurm_env, reference, tmp_path):
    """Multi-node code path on the one-node cluster: two srun tasks get the SLURM variables that a
    2-node x 1-task allocation gives (node id = task id, one task per node), so Lightning's
    SLURMEnvironment and DDP run exactly as on two nodes."""
    command = " ".join([sys.executable, "-m", "lightning_gen", "train", *TRAIN, "logger.wandb.enabled=false"])
    script = f"""#!/bin/bash
#SBATCH --job-name=lgen-multinode
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --mem=1G
#SBATCH --time=00:10:00
#SBATCH --output={tmp_path}/multinode.out
#SBATCH --chdir={tmp_path}
srun bash -c 'export SLURM_NODEID=$SLURM_PROCID SLURM_LOCALID=0 SLURM_NNODES=2 SLURM_JOB_NUM_NODES=2 \\
  SLURM_NTASKS_PER_NODE=1 OMP_NUM_THREADS={ONE_THREAD}; exec {command} trainer.num_nodes=2 trainer.devices=1'
"""
    env = slurm_env
    job_id = subprocess.run(
        ["sbatch", "--parsable"], input=script, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    log = tmp_path / "multinode.out"
    wait_done(env, job_id, log)
    text = log.read_text()
    reference = reference.run_dir()
    assert "global batch 64 = 32 per device x 2 processes (2 node(s) x 1 device(s))" in text
    run_dir = tmp_path / "runs" / "ae_digits" / job_id
    assert lr_by_step(run_dir) == pytest.approx(lr_by_step(reference), rel=1e-6)
    last, ref = ckpt(run_dir / "checkpoints" / "last.ckpt"), ckpt(reference / "checkpoints" / "last.ckpt")
    assert last["global_step"] == ref["global_step"] == MAX_STEPS
    # same seed, same global ranks over the data, same all-reduced gradients: the same weights
    for name, value in ref["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=name)
