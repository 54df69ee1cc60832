"""Submit a training run to SLURM: the same overrides as `lgen train`, plus cluster.* resources.

    lgen submit experiment=ae_digits cluster.nodes=2 cluster.gpus_per_node=4 cluster.time=24:00:00 \\
        cluster.partition=gpu cluster.account=myproj trainer.devices=4
    lgen submit experiment=ae_digits sweep='method.lr=1e-3,2e-3 method.latent_dim=16,32'   one job array
    lgen submit experiment=ae_digits --dry-run                                              print the script

The script is rendered from slurm/job.sbatch (cluster.template) and submitted held; once SLURM has
given it a job id, its run directory runs/<experiment>/<job id>/ (array task i: <array id>_<i>) gets
the script (job.sbatch) and the resolved config, and the job is released. The job log is
slurm-<id>.out in the run directory. SIGUSR1 arrives cluster.signal_grace_s seconds before the time
limit; Lightning saves a checkpoint and requeues the job, which resumes in the same run directory.

Before submitting, the resources are compared with what the recipe needs (``cluster.resources``):
too few CPUs for the loader workers or too little memory for an in-memory dataset is a warning.
The recipes for real datasets (``*_imagenet``, ``*_stl10``) carry their own ``cluster:`` section.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from lightning_gen.cluster import resources
from lightning_gen.config import ConfigError, compose, to_yaml

REPO = Path(__file__).resolve().parents[2]


class SubmitError(RuntimeError):
    """Something that stops a submission; the message says what to change."""


# ------------------------------------------------------------------------------ parsing


def split_values(text: str) -> list[str]:
    """``0.1,0.2,[1,2]`` -> ['0.1', '0.2', '[1,2]']: commas inside brackets or quotes do not split."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_sweep(text: str) -> list[list[str]]:
    """``'a.b=1,2 c=x,y'`` -> the cartesian product as override lists, in row-major order."""
    axes = []
    for token in shlex.split(text):
        key, sep, values = token.partition("=")
        if not sep or not key or not values:
            raise ConfigError(
                f"cannot read sweep entry {token!r}: write key=v1,v2,... "
                "e.g. sweep='method.lr=0.1,0.2 method.latent_dim=16,32'"
            )
        if "." not in key and key in ("experiment", "runs_dir", "run_id"):
            raise ConfigError(
                f"sweep over {key} is not supported: every array task shares it; submit one sweep per {key}"
            )
        axes.append([f"{key}={value}" for value in split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)]


def split_arguments(args: list[str]) -> tuple[list[str], list[list[str]]]:
    """Separate ``sweep=...`` entries from the train overrides; return (overrides, combinations)."""
    overrides, sweeps = [], []
    for arg in args:
        if arg.startswith("cluster.time=") and not arg.endswith(("'", '"')):
            # Quoted, so that YAML does not read 24:00:00 as the base-60 integer 86400.
            arg = f'cluster.time="{arg.partition("=")[2]}"'
        (sweeps if arg.startswith("sweep=") else overrides).append(arg)
    combos = parse_sweep(" ".join(s.removeprefix("sweep=") for s in sweeps)) if sweeps else [[]]
    return overrides, combos


def time_seconds(text: str) -> float:
    """SLURM --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; UNLIMITED/INFINITE."""
    text = str(text).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return float("inf")
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise SubmitError(
            f"cannot read cluster.time={text!r}: use a SLURM time: 90 (minutes), 04:00:00 or 2-00:00:00"
        )
    days, a, b, c = match.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if match.group(4) is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + b  # M or M:S


# ------------------------------------------------------------------------------ the job


@dataclass
class Job:
    """What one submission asks for, derived from the composed config of each array task."""

    cfgs: list[DictConfig]  # one per array task
    overrides: list[str]  # shared by all tasks (user overrides and the derived trainer settings)
    combos: list[list[str]]  # the sweep overrides of each task
    tasks_per_node: int
    warnings: list[str] = field(default_factory=list)  # resources that may not feed the recipe

    @property
    def cluster(self) -> DictConfig:
        return self.cfgs[0].cluster

    @property
    def is_array(self) -> bool:
        return len(self.combos) > 1

    @property
    def experiment_dir(self) -> Path:
        cfg = self.cfgs[0]
        return (Path(cfg.runs_dir) / cfg.experiment).resolve()

    def run_ids(self, job_id: str) -> list[str]:
        if self.cfgs[0].run_id:
            return [self.cfgs[0].run_id]
        return [f"{job_id}_{i}" for i in range(len(self.combos))] if self.is_array else [job_id]

    def log_pattern(self) -> str:
        if self.cfgs[0].run_id:
            return str(self.experiment_dir / self.cfgs[0].run_id / "slurm-%j.out")
        if self.is_array:
            return str(self.experiment_dir / "%A_%a" / "slurm-%A_%a.out")
        return str(self.experiment_dir / "%j" / "slurm-%j.out")


def derived_overrides(cfg: DictConfig) -> tuple[list[str], int]:
    """Check that Lightning's devices/num_nodes agree with what SLURM will start; return the
    overrides that make them explicit in the job, and the tasks per node."""
    cluster, trainer = cfg.cluster, cfg.trainer
    extra: list[str] = []
    devices = trainer.devices
    if cluster.nodes < 1:
        raise SubmitError(f"cluster.nodes={cluster.nodes}: ask for at least one node")
    if trainer.num_nodes not in (1, cluster.nodes):
        raise SubmitError(
            f"trainer.num_nodes={trainer.num_nodes} but cluster.nodes={cluster.nodes}: they must agree "
            f"(set cluster.nodes={trainer.num_nodes}, or drop trainer.num_nodes: it follows cluster.nodes)"
        )
    extra.append(f"trainer.num_nodes={cluster.nodes}")
    if not isinstance(devices, int) and str(devices) not in ("auto", "-1"):
        raise SubmitError(
            f"trainer.devices={devices}: a SLURM job needs a number of devices per node "
            f"(SLURM picks the device ids); set trainer.devices=N"
        )
    if cluster.gpus_per_node > 0:
        tasks = cluster.gpus_per_node
        what = f"cluster.gpus_per_node={cluster.gpus_per_node} (SLURM starts one task per GPU)"
        if trainer.accelerator == "cpu":
            raise SubmitError(
                f"trainer.accelerator=cpu with {what}: "
                "drop trainer.accelerator=cpu or set cluster.gpus_per_node=0"
            )
        if cluster.tasks_per_node not in (None, tasks):
            raise SubmitError(
                f"cluster.tasks_per_node={cluster.tasks_per_node} disagrees with {what}; "
                f"leave cluster.tasks_per_node out for GPU jobs"
            )
    else:
        if trainer.accelerator not in ("auto", "cpu"):
            raise SubmitError(
                f"trainer.accelerator={trainer.accelerator} but cluster.gpus_per_node=0 asks for no GPU: "
                f"set cluster.gpus_per_node=N, or trainer.accelerator=cpu for a CPU job"
            )
        extra.append("trainer.accelerator=cpu")
        tasks = cluster.tasks_per_node or (devices if isinstance(devices, int) and devices > 0 else 1)
        what = f"cluster.tasks_per_node={tasks}" if cluster.tasks_per_node else f"{tasks} task(s) per node"
    if isinstance(devices, int) and devices > 0 and devices != tasks:
        raise SubmitError(
            f"trainer.devices={devices} but {what}: Lightning needs devices == tasks per node "
            f"(srun --ntasks-per-node={tasks}); set trainer.devices={tasks}"
        )
    extra.append(f"trainer.devices={tasks}")
    return extra, tasks


def plan(args: list[str]) -> Job:
    """Compose and check every array task's config before anything is submitted."""
    overrides, combos = split_arguments(args)
    cfgs = []
    for combo in combos:
        try:
            cfgs.append(compose([*overrides, *combo]))
        except ConfigError as error:
            where = f" (sweep combination {' '.join(combo)})" if combo else ""
            raise ConfigError(f"the config does not validate{where}: {error}") from error
    derived, tasks = derived_overrides(cfgs[0])
    first = cfgs[0]
    for cfg, combo in zip(cfgs, combos):
        if derived_overrides(cfg)[0] != derived or cfg.cluster != first.cluster:
            raise SubmitError(
                f"sweep combination {' '.join(combo)} changes the resources; sweep only training settings"
            )
        if cfg.experiment != first.experiment or cfg.runs_dir != first.runs_dir:
            raise SubmitError("all sweep combinations must share experiment and runs_dir")
    if first.run_id and len(combos) > 1:
        raise SubmitError(
            "run_id=... names one run directory; leave it out for a sweep (tasks get <job>_<task>)"
        )
    grace, limit = first.cluster.signal_grace_s, time_seconds(first.cluster.time)
    if grace < 1:
        raise SubmitError(
            f"cluster.signal_grace_s={grace}: give the job at least a few seconds to checkpoint"
        )
    if limit <= grace:
        raise SubmitError(
            f"cluster.time={first.cluster.time} ({limit:.0f} s) is not longer than "
            f"cluster.signal_grace_s={grace}: "
            f"the checkpoint signal would come before training starts; raise cluster.time or lower the grace"
        )
    derived = [d for d in derived if d not in overrides]
    return Job(
        cfgs=cfgs,
        overrides=[*overrides, *derived],
        combos=combos,
        tasks_per_node=tasks,
        warnings=resources.warnings_for(first, tasks),
    )


def omp_threads(cfg: DictConfig) -> int:
    """Threads of each training process: cluster.omp_num_threads, or the task's CPUs its loader workers leave."""
    if cfg.cluster.omp_num_threads:
        return cfg.cluster.omp_num_threads
    return max(1, cfg.cluster.cpus_per_task - cfg.data.num_workers)


# ------------------------------------------------------------------------------ rendering


def template_path(name: str) -> Path:
    for candidate in (Path(name), REPO / name):
        if candidate.is_file():
            return candidate
    raise SubmitError(
        f"sbatch template {name} not found (looked in {Path.cwd()} and {REPO}); set cluster.template=PATH"
    )


def render(job: Job) -> str:
    """The sbatch script for ``job``: placeholders filled, #SBATCH lines with empty values dropped."""
    cluster, cfg = job.cluster, job.cfgs[0]
    command = [sys.executable, "-m", "lightning_gen", "train", *job.overrides]
    cases = []
    for i, combo in enumerate(job.combos):
        cases.append(f"    {i}) TASK_OVERRIDES=({' '.join(shlex.quote(c) for c in combo)}) ;;")
    cases.append('    *) echo "no overrides for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;')
    values = {
        "job_name": re.sub(r"[^A-Za-z0-9_.-]", "_", f"lgen-{cfg.experiment}"),
        "nodes": cluster.nodes,
        "ntasks_per_node": job.tasks_per_node,
        "gpus_per_node": cluster.gpus_per_node or "",
        "cpus_per_task": cluster.cpus_per_task,
        "omp_num_threads": omp_threads(cfg),
        "mem": cluster.mem or "",
        "time": cluster.time,
        "partition": cluster.partition or "",
        "account": cluster.account or "",
        "qos": cluster.qos or "",
        "constraint": cluster.constraint or "",
        "array": f"0-{len(job.combos) - 1}" if job.is_array else "",
        "signal_grace_s": cluster.signal_grace_s,
        "requeue": "--requeue" if cluster.requeue else "--no-requeue",
        "log": job.log_pattern(),
        "workdir": str(Path.cwd()),
        "extra_sbatch": "\n".join(_sbatch_line(line) for line in cluster.extra_sbatch),
        "setup": "\n".join(cluster.setup) or ":",
        "task_cases": "\n".join(cases),
        "command": " ".join(shlex.quote(str(c)) for c in command),
    }
    lines = []
    for line in template_path(cluster.template).read_text().splitlines():
        names = re.findall(r"{{(\w+)}}", line)
        for name in names:
            if name not in values:
                raise SubmitError(
                    f"unknown placeholder {{{{{name}}}}} in {cluster.template}; known: {', '.join(values)}"
                )
        if line.startswith("#SBATCH") and names and all(str(values[n]) == "" for n in names):
            continue
        for name in names:
            line = line.replace(f"{{{{{name}}}}}", str(values[name]))
        lines.append(line)
    return "\n".join(lines) + "\n"


def _sbatch_line(option: str) -> str:
    option = option.strip()
    return option if option.startswith("#SBATCH") else f"#SBATCH {option}"


# ------------------------------------------------------------------------------ submitting


def _slurm(*command: str, script: str | None = None) -> str:
    proc = subprocess.run(list(command), input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(
            f"`{' '.join(command)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout.strip()


def submit(job: Job, script: str) -> tuple[str, list[Path]]:
    """sbatch the script held, write it and the configs into the run directories, release it."""
    job_id = _slurm("sbatch", "--parsable", "--hold", script=script).split(";")[0]
    run_dirs = []
    try:
        for run_id, cfg in zip(job.run_ids(job_id), job.cfgs):
            run_dir = job.experiment_dir / run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "job.sbatch").write_text(script)
            cfg = cfg.copy()
            cfg.run_id = run_id
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            run_dirs.append(run_dir)
    except OSError as error:
        subprocess.run(["scancel", job_id], capture_output=True)
        raise SubmitError(f"cannot write the run directory ({error}); job {job_id} cancelled") from error
    _slurm("scontrol", "release", job_id)
    return job_id, run_dirs


# ------------------------------------------------------------------------------ CLI plugin


def add_arguments(parser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        help="the overrides of `lgen train`, cluster.* resources, sweep='key=v1,v2 key2=a,b' for a job array",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and the plan; submit nothing"
    )


def main(args) -> int:
    try:
        job = plan(args.overrides)
        if not args.dry_run and shutil.which("sbatch") is None:
            raise SubmitError(
                "sbatch not found on PATH: run lgen submit on a SLURM login node, or try it locally with "
                "`sudo slurm/local-cluster.sh start` (needs apt-get install slurm-wlm munge); "
                "--dry-run prints the script without SLURM"
            )
        script = render(job)
    except SubmitError as error:
        print(f"lgen submit: error: {error}", file=sys.stderr)
        return 2
    for warning in job.warnings:
        print(f"lgen submit: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        tasks = "\n".join(f"#   task {i}: {' '.join(c) or '(base config)'}" for i, c in enumerate(job.combos))
        print(
            f"# dry run: nothing submitted. {len(job.combos)} task(s), logs at {job.log_pattern()}\n{tasks}"
        )
        return 0
    try:
        job_id, run_dirs = submit(job, script)
    except SubmitError as error:
        print(f"lgen submit: error: {error}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}" + (f" (array of {len(run_dirs)} tasks)" if job.is_array else ""))
    for run_dir, combo in zip(run_dirs, job.combos):
        print(f"  run dir {run_dir}" + (f"   {' '.join(combo)}" if combo else ""))
    log = job.log_pattern().replace("%A_%a", f"{job_id}_0").replace("%A", job_id).replace("%j", job_id)
    print(f"follow the log:  tail -f {log}")
    print(f"job state:       squeue -j {job_id}    cancel: scancel {job_id}")
    return 0
