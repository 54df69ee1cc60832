"""`bash benchmarks/gpu_check.sh --dry-run`: on a machine without a GPU it walks every stage the GPU check
runs, with the stage limits (at most 10 minutes together) and commands, composes the config of every
training run of its stages, and prints the skeleton of the Markdown report."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, lgen_env

STAGES = ("overhead", "input_pipeline", "methods", "sampling", "fsdp", "nccl")


def dry_run(tmp_path, **settings: str) -> subprocess.CompletedProcess:
    env = lgen_env(OUT_DIR=str(tmp_path / "out"), **settings)
    if "PYTHON" not in settings:
        env.pop("PYTHON", None)
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=tmp_path,  # from anywhere
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_walks_every_stage_composes_every_run_and_prints_the_report_skeleton(tmp_path):
    proc = dry_run(tmp_path, PYTHON=sys.executable, GPUS="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"with {sys.executable}" in out
    limits = {name: int(s) for name, s in re.findall(r"^== (\w+) \(limit (\d+) s\)", out, re.M)}
    assert list(limits) == list(STAGES)  # with 2 GPUs every stage runs, the NCCL one included
    assert sum(limits.values()) <= 600
    assert f"== total: {sum(limits.values())} s of stage limits on this node" in out
    # the training stages: every method family's run and the FSDP / NCCL runs, each config composed
    composed = re.findall(r"^  - (.+): config composes$", out, re.M)
    assert len(composed) >= 18 + 2 + 1 and "CONFIG ERROR" not in out
    for family in ("ddpm_digits", "gan_digits", "dino_digits", "mae_digits", "swav_digits"):
        assert any(line.startswith(family) for line in composed), family
    assert "callbacks.fid.enabled=true" in out and "trainer.precision=auto" in out
    assert "trainer.strategy=fsdp" in out and "distributed_equality.py --device=cuda" in out
    # the report: one row per stage, none run yet
    assert "| stage | what it shows | limit (s) | seconds | result |" in out
    for stage in STAGES:
        assert re.search(
            rf"^\| {stage} \| .+ \| {limits[stage]} \| - \| dry run: would run \|$", out, re.M
        ), stage
    assert not (tmp_path / "out" / "report.md").exists()  # a dry run writes no report


def test_dry_run_refuses_limits_over_ten_minutes_and_never_uses_a_bare_python(tmp_path):
    proc = dry_run(tmp_path, METHODS_LIMIT="400")
    assert proc.returncode == 1 and "the stage limits sum to 820 s" in proc.stderr
    used = re.search(r"runs, with (\S+)", proc.stdout).group(1)
    assert used.endswith(("/.venv/bin/python", "python3")), used
