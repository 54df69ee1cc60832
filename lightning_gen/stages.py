"""Two-stage experiments: a model the experiment's method is built on (stage 1), then that method.

Stage 1 is latent diffusion's autoencoder, a token model's tokenizer or a distilled student's teacher:
each method says which config field names it (``stage1_input``: ``method.latents``, ``method.tokenizer``,
``method.teacher``). The rest of this text speaks of latent diffusion; the others work alike.

An experiment names its stage 1 in a root-level ``stage1:`` section: the stage-1 experiment and any
overrides of it, in the same nested form as the experiment file itself (on the command line
``stage1.trainer.max_epochs=2``)::

    stage1:
      experiment: latent_autoencoder_digits
      trainer: {max_epochs: 20}
    method:
      latents: stage1        # the last checkpoint of stage 1

Stage 1 runs with the seed, devices, precision and logger settings of the command that asks for it
(then its own overrides), in the fixed run directory ``<runs_dir>/<stage-1 experiment>/stage1-seed<seed>/``
(``stage1.run_id`` names another). When ``method.latents`` names that directory's checkpoint
(``stage1``, or the same path written out) and stage 1 has not finished there, ``lgen train`` trains it
first: after every check of stage 2, made with an untrained autoencoder of the stage-1 recipe, so bad
input fails before anything is created; then stage 2. A later command finds stage 1 finished (the
marker ``stage1_finished.json`` beside its checkpoints) and reuses it; a stage 1 interrupted by a
signal is resumed by the next command. A stage-1 directory trained with other settings (its
``config.yaml``) is an error, never silently reused.

Where stage 1 runs: in a child ``lgen train`` process started by the launching process, before any
DDP process of stage 2 exists. Stage 1 so has its own processes and process group (Lightning starts
its DDP workers as for any run) and ends before stage 2's are started; the DDP workers of stage 2
re-run the command and find stage 1 finished. When an external launcher (torchrun, srun with several
tasks) started every process at once, global rank 0 trains stage 1 on its node's devices, with the
launcher's variables removed from the child's environment, and the other processes wait for its
marker (a shared file system, as checkpoints need anyway). While it trains, the parent passes SIGTERM
(and SLURM's SIGUSR1, as SIGTERM) on to it, so stage 1 stops at a step boundary with a checkpoint and
the next command resumes it; Ctrl+C reaches it directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_gen.config import ConfigError, compose, to_dict

FINISHED = "stage1_finished.json"  # written beside stage 1's checkpoints once it ended normally
# What stage 1 takes from the command that asks for it (its own stage1.* overrides come after)
CARRIED = (
    "seed",
    "runs_dir",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.precision",
    "trainer.enable_progress_bar",
    "logger",
)
# What decides the weights stage 1 trains: a finished stage 1 trained with other values is not reused
DECISIVE = (
    "seed",
    "method",
    "data",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.limit_train_batches",
    "trainer.accumulate_grad_batches",
)
VOLATILE_DATA = ("num_workers", "pin_memory", "download", "root")
# Set by external launchers (torchrun, srun, mpirun): removed from stage 1's environment
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LGEN_RUN_ID",
)
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_", "JSM_NAMESPACE_")


def dotted(node, prefix: str = "") -> list[str]:
    """``key.sub=<value>`` overrides that rebuild ``node`` (values as JSON, which the YAML parser reads)."""
    if isinstance(node, DictConfig):
        items = []
        for key in node:
            items += dotted(node[key], f"{prefix}.{key}" if prefix else str(key))
        return items
    value = to_dict(node) if isinstance(node, ListConfig) else node
    return [f"{prefix}={json.dumps(value)}"]


def stage1_overrides(cfg: DictConfig) -> list[str]:
    """The command line of the stage-1 run that ``cfg`` (a config with a ``stage1`` section) asks for."""
    section = cfg.stage1
    own = OmegaConf.masked_copy(section, [k for k in section if k != "experiment"])
    carried = []
    for key in CARRIED:
        carried += dotted(OmegaConf.select(cfg, key), key)
    args = [f"experiment={section.experiment}", *carried, *dotted(own)]
    if "run_id" not in section:
        seed = section.get("seed", cfg.seed)
        args.append(f"run_id=stage1-seed{seed}")
    return args


def check_section(cfg: DictConfig) -> DictConfig:
    """Validate ``cfg.stage1`` by composing the stage-1 config it describes; returns that config."""
    section = cfg.stage1
    if not isinstance(section, DictConfig) or "experiment" not in section:
        raise ConfigError(
            "stage1 must be a section naming the stage-1 experiment and its overrides, e.g. "
            "stage1: {experiment: latent_autoencoder_digits, trainer: {max_epochs: 20}}"
        )
    from lightning_gen.config import _load_option

    if "stage1" in _load_option("experiment", str(section.experiment)):
        raise ConfigError(
            f"stage1.experiment={section.experiment} has a stage1 section of its own: "
            "one stage before the model is supported"
        )
    try:
        return compose(stage1_overrides(cfg))
    except ConfigError as error:
        raise ConfigError(f"stage1 (experiment {section.experiment}): {error}") from error


@dataclass(frozen=True)
class Stage1Input:
    """What a method is built on that an experiment's stage 1 can train (a method's ``stage1_input``):
    latent diffusion's autoencoder, a token model's tokenizer, a distilled student's teacher."""

    field: str  # the method's config field naming its checkpoint (ckpt:<path> or stage1)
    keyword: str  # the method's constructor argument taking the model itself
    what: str  # what it is, for messages
    methods: tuple[str, ...]  # the methods that train one
    example: str  # a stage-1 experiment that trains one

    @property
    def a_what(self) -> str:
        return ("an " if self.what[0] in "aeiou" else "a ") + self.what


@dataclass
class Stage1:
    """The stage-1 run a config's ``method.<field>`` (``Stage1Input``) depends on."""

    cfg: DictConfig  # the composed stage-1 config
    overrides: list[str]  # its `lgen train` command line
    run_dir: Path
    input: Stage1Input

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def finished(self) -> bool:
        return (self.run_dir / FINISHED).is_file() and self.checkpoint.is_file()

    def check_reusable(self) -> None:
        """A stage-1 directory holding another recipe's run is an error, not reused or resumed."""
        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return
        # as plain JSON values (a tuple field of the schema and its list in the saved YAML compare equal)
        there, here = (json.loads(json.dumps(to_dict(c))) for c in (OmegaConf.load(saved), self.cfg))
        for key in DECISIVE:
            a, b = _select(there, key), _select(here, key)
            if key == "data":
                a, b = ({k: v for k, v in (d or {}).items() if k not in VOLATILE_DATA} for d in (a, b))
            if a != b:
                raise ConfigError(
                    f"{self.run_dir} holds a stage 1 trained with other settings ({key}: {_differ(a, b)}): "
                    f"delete that folder to train it again, or give this stage 1 its own with stage1.run_id=<name>"
                )

    def announce_reuse(self) -> None:
        rank_zero_info(f"[lgen] stage 1: reusing the finished {self.input.what} {self.checkpoint}")

    def untrained_model(self):
        """The stage-1 recipe's model with its initial weights: shapes and data for stage 2's checks."""
        from lightning_gen.run import build_datamodule, build_method

        if self.cfg.method.name not in self.input.methods:
            raise ConfigError(
                f"stage1.experiment={self.cfg.experiment} trains {self.cfg.method.name}, not {self.input.a_what}: "
                f"name a method={' | '.join(self.input.methods)} experiment (e.g. {self.input.example})"
            )
        return build_method(self.cfg, build_datamodule(self.cfg))

    def run(self) -> None:
        """Train stage 1 (global rank 0 of the launch) or wait until it has (every other process)."""
        if not _launching_process():
            while not self.finished:
                time.sleep(5)
            return
        rank_zero_info(
            f"[lgen] stage 1: training the {self.input.what} (experiment {self.cfg.experiment}) into {self.run_dir}/; "
            "stage 2 starts when it has finished"
        )
        started = time.time()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)
        }
        # one node: a child process of this one can use this node's devices only
        command = [sys.executable, "-m", "lightning_gen", "train", *self.overrides, "trainer.num_nodes=1"]
        code = _wait_passing_signals(subprocess.Popen(command, env=env))
        if code != 0:
            print(
                f"[lgen] stage 1 ({self.run_dir}) exited with code {code}: stage 2 did not start. "
                "Run the same command again to resume stage 1 from its checkpoint.",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(code)
        (self.run_dir / FINISHED).write_text(
            json.dumps(
                {
                    "checkpoint": str(self.checkpoint),
                    "command": ["lgen", "train", *self.overrides],
                    "seconds": round(time.time() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )
        rank_zero_info(f"[lgen] stage 1 finished in {time.time() - started:.0f} s: {self.checkpoint}")


def stage1_input(cfg: DictConfig) -> Stage1Input | None:
    """What the method of ``cfg`` builds on that a stage 1 can train (None: nothing)."""
    from lightning_gen import registry

    return getattr(registry.get("method", cfg.method.name).cls, "stage1_input", None)


def plan(cfg: DictConfig) -> Stage1 | None:
    """The stage 1 that ``cfg.method.<field>`` depends on (``latents``, ``tokenizer``, ``teacher``), or
    None. ``<field>=stage1`` is resolved to ``ckpt:<stage 1's last checkpoint>`` in ``cfg`` (what
    config.yaml then records)."""
    spec = stage1_input(cfg)
    if spec is None:
        return None
    value = cfg.method.get(spec.field) if spec.field in cfg.method else None
    if not value:
        return None
    if cfg.get("stage1") is None:
        if value == "stage1":
            raise ConfigError(
                f"method.{spec.field}=stage1, but experiment {cfg.experiment} has no stage1 section naming the "
                f"{spec.what}'s experiment: add one (stage1.experiment={spec.example}) or give "
                f"method.{spec.field}=ckpt:<checkpoint>"
            )
        return None
    overrides = stage1_overrides(cfg)
    stage_cfg = compose(overrides)
    run_dir = Path(stage_cfg.runs_dir) / stage_cfg.experiment / stage_cfg.run_id
    stage1 = Stage1(stage_cfg, overrides, run_dir, spec)
    if value == "stage1":
        cfg.method[spec.field] = f"ckpt:{stage1.checkpoint}"
    elif Path(str(value).removeprefix("ckpt:")).resolve() != stage1.checkpoint.resolve():
        return None  # another model: the method reads it (or says it is missing)
    stage1.check_reusable()
    return stage1


def _launching_process() -> bool:
    """Whether this process is the first of its launch (plain `lgen train`, or global rank 0 of an
    external launcher), before any process group exists."""
    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    if SLURMEnvironment.detect():
        return env.get("SLURM_PROCID", "0") == "0"
    return env.get("NODE_RANK", "0") == "0" and env.get("LOCAL_RANK", "0") == "0"


def _wait_passing_signals(child: subprocess.Popen) -> int:
    """The child's exit code; SIGTERM and SIGUSR1 reaching this process are passed on as SIGTERM (stop
    with a checkpoint). SIGINT is left to the terminal, which sends Ctrl+C to the child as well."""
    forward = lambda signum, frame: child.send_signal(signal.SIGTERM)  # noqa: E731
    handled = [signal.SIGTERM, signal.SIGINT, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])]
    previous = {s: signal.getsignal(s) for s in handled}
    try:
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, forward)
    except ValueError:  # not the main thread: no handlers can be set
        previous = {}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _select(values: dict, key: str):
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _differ(there, here) -> str:
    if isinstance(there, dict) and isinstance(here, dict):
        for key in sorted(set(there) | set(here)):
            if there.get(key) != here.get(key):
                return f"{key}={there.get(key)!r} there, {here.get(key)!r} here"
    return f"{there!r} there, {here!r} here"
