"""`lgen submit` without SLURM: the rendered sbatch script, sweeps, pre-submit checks, resume helpers."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess

import pytest
import torch

from lightning_gen.checkpoint import resume_path
from lightning_gen.cluster import submit
from lightning_gen.config import ConfigError
from lightning_gen.loggers import AppendingCSVLogger

GPU_JOB = [
    "experiment=ae_digits",
    "cluster.nodes=2",
    "cluster.gpus_per_node=4",
    "trainer.devices=4",
    "cluster.cpus_per_task=8",
    "cluster.mem=64G",
    "cluster.time=24:00:00",
    "cluster.partition=gpu",
    "cluster.account=proj42",
    "cluster.qos=high",
    "cluster.constraint=a100",
    "cluster.signal_grace_s=120",
    'cluster.extra_sbatch=["--exclusive", "#SBATCH --mail-type=END"]',
    'cluster.setup=["module load cuda/12.1", "source .venv/bin/activate"]',
]


def run_main(overrides, dry_run=True) -> int:
    return submit.main(argparse.Namespace(overrides=list(overrides), dry_run=dry_run))


def test_two_nodes_four_gpus_script_line_by_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the run directory and --chdir follow the submitting folder
    job = submit.plan(GPU_JOB)
    script = submit.render(job)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=lgen-ae_digits",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --time=24:00:00",  # not YAML's base-60 reading 86400
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path.resolve()}/runs/ae_digits/%j/slurm-%j.out",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
    ]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    setup = lines.index("module load cuda/12.1")
    assert lines[setup + 1] == "source .venv/bin/activate"
    assert "    0) TASK_OVERRIDES=() ;;" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.startswith("srun --kill-on-bad-exit=1 ")
    assert " -m lightning_gen train experiment=ae_digits " in srun
    # Lightning's SLURMEnvironment checks devices == ntasks-per-node and num_nodes == nodes
    assert " trainer.devices=4 " in srun and " trainer.num_nodes=2 " in srun
    assert srun.endswith('"${TASK_OVERRIDES[@]}" &')
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0

    assert run_main(GPU_JOB) == 0
    assert capsys.readouterr().out.startswith(script)


def test_optional_lines_dropped_and_cpu_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = submit.render(
        submit.plan(["experiment=ae_digits", "trainer.devices=2", "cluster.requeue=false"])
    )
    options = {line.split("=")[0] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert "#SBATCH --ntasks-per-node=2" in script  # CPU job: one task per trainer device
    for absent in ("--gpus-per-node", "--partition", "--account", "--qos", "--constraint", "--array"):
        assert f"#SBATCH {absent}" not in options
    assert "#SBATCH --no-requeue" in script
    assert "trainer.accelerator=cpu" in script


def test_sweep_is_one_array_with_one_combination_per_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = submit.plan(["experiment=ae_digits", "sweep=method.lr=0.1,0.2 method.latent_dim=16,32"])
    assert job.combos == [
        ["method.lr=0.1", "method.latent_dim=16"],
        ["method.lr=0.1", "method.latent_dim=32"],
        ["method.lr=0.2", "method.latent_dim=16"],
        ["method.lr=0.2", "method.latent_dim=32"],
    ]
    assert [(c.method.lr, c.method.latent_dim) for c in job.cfgs] == [
        (0.1, 16),
        (0.1, 32),
        (0.2, 16),
        (0.2, 32),
    ]
    script = submit.render(job)
    assert "#SBATCH --array=0-3" in script
    assert f"#SBATCH --output={tmp_path.resolve()}/runs/ae_digits/%A_%a/slurm-%A_%a.out" in script
    assert "    3) TASK_OVERRIDES=(method.lr=0.2 method.latent_dim=32) ;;" in script
    assert job.run_ids("77") == ["77_0", "77_1", "77_2", "77_3"]
    # bash picks the task's overrides by $SLURM_ARRAY_TASK_ID
    case = script[script.index("case ") : script.index("esac") + 4]
    out = subprocess.run(
        ["bash", "-c", case + '\nprintf "%s\\n" "${TASK_OVERRIDES[@]}"'],
        env={"SLURM_ARRAY_TASK_ID": "2"},
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == ["method.lr=0.2", "method.latent_dim=16"]


def test_split_values_keeps_brackets_and_quotes():
    assert submit.split_values("0.1,[1,2],'a,b'") == ["0.1", "[1,2]", "'a,b'"]


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("90", 5400),
        ("05:30", 330),
        ("24:00:00", 86400),
        ("2-00", 172800),
        ("1-02:03", 93780),
        ("1-00:00:05", 86405),
    ],
)
def test_slurm_time_formats(text, seconds):
    assert submit.time_seconds(text) == seconds


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.devices=2", "cluster.gpus_per_node=4"], "trainer.devices=2 but cluster.gpus_per_node=4"),
        (["trainer.devices=2", "cluster.tasks_per_node=3"], "trainer.devices=2 but cluster.tasks_per_node=3"),
        (["trainer.num_nodes=3", "cluster.nodes=2"], "trainer.num_nodes=3 but cluster.nodes=2"),
        (
            ["cluster.time=00:01:00", "cluster.signal_grace_s=120"],
            "is not longer than cluster.signal_grace_s=120",
        ),
        (["cluster.time=soon"], "cannot read cluster.time='soon'"),
        (["trainer.accelerator=gpu"], "cluster.gpus_per_node=0 asks for no GPU"),
        (["sweep=experiment=a,b"], None),  # a ConfigError, checked below
    ],
)
def test_pre_submit_checks(overrides, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if message is None:
        with pytest.raises(ConfigError, match="sweep over experiment is not supported"):
            submit.plan(["experiment=ae_digits", *overrides])
        return
    assert run_main(["experiment=ae_digits", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_invalid_config_is_an_error_before_submitting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"does not validate \(sweep combination method.latnet_dim=8\).*latent_dim"
    ):
        submit.plan(["experiment=ae_digits", "sweep=method.latnet_dim=8"])


def test_sbatch_not_found(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without sbatch, as on a laptop
    assert run_main(["experiment=ae_digits"], dry_run=False) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err
    assert run_main(["experiment=ae_digits"], dry_run=True) == 0  # a dry run needs no SLURM
    assert not (tmp_path / "runs").exists()


def test_resume_picks_the_checkpoint_furthest_along(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert resume_path(run_dir, "auto") is None
    torch.save({"global_step": 40}, run_dir / "checkpoints" / "last.ckpt")
    torch.save({"global_step": 57}, run_dir / "hpc_ckpt_1.ckpt")  # SIGUSR1 after the last epoch end
    assert resume_path(run_dir, "auto") == str(run_dir / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": 80}, run_dir / "checkpoints" / "last.ckpt")  # resumed and went on
    assert resume_path(run_dir, "auto") == str(run_dir / "checkpoints" / "last.ckpt")
    assert resume_path(run_dir, "never") is None
    # requeued at step 95, where trainer.checkpoint_every_n_steps also refreshed last.ckpt (written after):
    # the same state, and the requeue's own checkpoint is the one resumed from
    torch.save({"global_step": 95}, run_dir / "hpc_ckpt_2.ckpt")
    torch.save({"global_step": 95}, run_dir / "checkpoints" / "last.ckpt")
    os.utime(run_dir / "hpc_ckpt_2.ckpt", (1, 1))  # older file
    assert resume_path(run_dir, "auto") == str(run_dir / "hpc_ckpt_2.ckpt")


def test_resume_removes_only_preemption_checkpoints_that_a_later_one_supersedes(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 30}, run_dir / "checkpoints" / "last.ckpt")
    torch.save({"global_step": 20}, run_dir / "hpc_ckpt_1.ckpt")  # first preemption
    torch.save({"global_step": 40}, run_dir / "hpc_ckpt_2.ckpt")  # second preemption
    assert resume_path(run_dir, "auto") == str(run_dir / "hpc_ckpt_2.ckpt")
    assert not (run_dir / "hpc_ckpt_1.ckpt").exists()  # a full copy of an older state: superseded
    assert (run_dir / "hpc_ckpt_2.ckpt").exists()  # the one resumed from stays
    assert (run_dir / "checkpoints" / "last.ckpt").exists()  # never touched
    torch.save({"global_step": 50}, run_dir / "checkpoints" / "last.ckpt")
    assert resume_path(run_dir, "never") is None and (run_dir / "hpc_ckpt_2.ckpt").exists()
    assert resume_path(run_dir, "auto") == str(run_dir / "checkpoints" / "last.ckpt")
    assert not (run_dir / "hpc_ckpt_2.ckpt").exists()


def test_csv_log_continues_across_resumes(tmp_path):
    first = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")
    first.log_metrics({"loss": 1.0}, step=0)
    first.log_metrics({"loss": 0.5}, step=1)
    first.save()
    second = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")  # the resumed segment
    second.log_metrics({"loss": 0.25, "lr": 0.1}, step=2)  # a new column rewrites the header
    second.save()
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["loss"], r["lr"]) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "0.5", ""),
        ("2", "0.25", "0.1"),
    ]


def test_imagenet_recipe_carries_its_resources_and_srun_gets_the_cpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(["experiment=simclr_imagenet"]) == 0  # lgen submit --dry-run experiment=simclr_imagenet
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    for expected in (
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",  # data.num_workers=8 loader processes + the training process + 1
        "#SBATCH --mem=320G",
        "#SBATCH --time=48:00:00",
        "#SBATCH --signal=USR1@300",
        "export SRUN_CPUS_PER_TASK=10",
        "export OMP_NUM_THREADS=2",  # the 10 CPUs minus the 8 loader workers
    ):
        assert expected in lines, expected
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert lines.index("export SRUN_CPUS_PER_TASK=10") < lines.index(srun)
    assert " trainer.devices=8 " in srun and "trainer.accelerator=cpu" not in srun
    assert "warning" not in captured.err  # the recipe's own resources feed it


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["experiment=simclr_imagenet", "cluster.cpus_per_task=4"],
            ["cluster.cpus_per_task=4 cannot feed data.num_workers=8", "cluster.cpus_per_task=10"],
        ),
        (
            # 2 GPU tasks, each holding train+unlabeled, test and the labeled train copy: 118k images of 3x96x96
            ["experiment=simclr_stl10", "cluster.mem=16G"],
            [
                "cluster.mem=16G (per node) looks too small for 2 task(s) per node",
                f"{118_000 * 3 * 96 * 96 / 2**30:.1f} GiB of stl10 images",
                f"estimated {2 * (4 + 118_000 * 3 * 96 * 96 / 2**30 + 4 * 0.5):.1f} GiB",
            ],
        ),
    ],
)
def test_resources_that_cannot_feed_the_recipe_are_a_warning(
    overrides, expected, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert run_main(overrides) == 0  # a warning, not an error: the script is still printed
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("lgen submit: warning: ")]
    assert len(warnings) == 1, captured.err
    for text in expected:
        assert text in warnings[0]
    assert captured.out.startswith("#!/bin/bash")


def test_slurm_memory_sizes():
    from lightning_gen.cluster.resources import memory_bytes

    assert memory_bytes("4G") == 4 * 2**30 and memory_bytes("500M") == 500 * 2**20
    assert memory_bytes("2048") == 2 * 2**30  # SLURM's default unit is megabytes
    assert memory_bytes("1T") == 2**40 and memory_bytes(None) is None and memory_bytes("0") is None
