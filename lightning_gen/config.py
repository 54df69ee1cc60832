"""Load, compose, validate and print OmegaConf configs (no Hydra, on purpose: see ARCHITECTURE.md).

Composition order, each step overriding the one before:

1. ``conf/config.yaml`` (root keys and the ``defaults:`` list of group options);
2. the experiment's own ``defaults:`` (``experiment=NAME`` picks ``conf/experiment/NAME.yaml``);
3. group selections on the command line (``data=cifar10``);
4. the chosen group files (``conf/<group>/<option>.yaml``) are loaded under their group key;
5. the experiment's body (everything but its ``defaults:``), merged at the root;
6. dotted overrides from the command line (``method.lr=0.1``).

Every section is then checked against its dataclass schema: the root, ``trainer``, ``logger`` and
``cluster`` have fixed schemas here; ``method``, ``data`` and each ``callbacks.<name>`` section are
checked against the schema registered under their name. Unknown keys and wrong types are errors
that name the full path, the expected type and the valid keys, with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("method", "data", "trainer", "logger", "cluster")
SELECTABLE = (*GROUPS, "experiment")


class ConfigError(ValueError):
    """A config that does not compose or validate. The message says what to change."""


# --------------------------------------------------------------------------------------------
# Schemas of the fixed sections. Method, data and callback schemas live next to their classes.
# --------------------------------------------------------------------------------------------


def choice(default: str, *options: str, help: str = "") -> Any:
    """A string field restricted to ``options`` (checked with a did-you-mean)."""
    return field(default=default, metadata={"choices": options, "help": help})


def bounded(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    hint: str = "",
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A number field that must lie in [low, high] (None: no bound, and a None value is always allowed).

    ``low_open`` / ``high_open`` exclude the bound itself: a temperature > 0, a dropout rate < 1. A list
    or tuple of numbers (crop scales, per-view probabilities) is checked entry by entry.
    ``hint`` completes the error message with what the number means, e.g. "images per device and step"."""
    metadata = {"low": low, "high": high, "hint": hint, "low_open": low_open, "high_open": high_open}
    return field(default=default, metadata=metadata)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1  # int, list of ids, or "auto"
    num_nodes: int = bounded(1, 1, hint="machines to train on")
    # "auto" becomes ddp when more than one process trains; "fsdp" shards the model (lightning_gen.sharding)
    strategy: str = "auto"
    # "auto": bf16-mixed on GPUs of compute capability >= 8.0 and bf16-native CPUs, 16-mixed on older GPUs,
    # else 32-true (lightning_gen/precision.py)
    precision: str = "auto"
    channels_last: bool = True  # memory format for conv nets (ignored by methods without convs)
    compile: bool = False  # torch.compile the networks that dominate the step (backbone, U-Net): see docs/data-at-scale.md
    max_epochs: int = bounded(10, -1, hint="-1 trains until max_steps or max_time")
    max_steps: int = bounded(-1, -1, hint="-1: no step limit")
    max_time: str | None = None  # "DD:HH:MM:SS"
    accumulate_grad_batches: int = bounded(1, 1, hint="batches per optimizer step")
    gradient_clip_val: float | None = bounded(None, 0)
    gradient_clip_algorithm: str = choice("norm", "norm", "value")
    check_val_every_n_epoch: int = bounded(1, 1)
    val_check_interval: float | None = bounded(None, 0)
    limit_train_batches: float | None = bounded(None, 0, hint="a fraction (0.25) or a number of batches (10)")
    limit_val_batches: float | None = bounded(None, 0, hint="a fraction (0.25) or a number of batches (10)")
    # logged at least once per epoch: capped at the epoch's batch count on small datasets; also the interval
    # at which ranks agree on stop signals and non-finite losses (lightning_gen/control.py) and the
    # progress bar refreshes: the steps on which the host reads values back from the GPU
    log_every_n_steps: int = bounded(10, 1)
    checkpoint_every_n_steps: int | None = bounded(None, 1)  # besides the checkpoint at every epoch end
    keep_best: int = bounded(1, -1, hint="-1 keeps all")  # best checkpoints kept by the monitored metric
    sync_batchnorm: bool = False
    # true: deterministic algorithms only (an op without one raises); "warn": it warns instead; false: fastest
    deterministic: Any = False
    benchmark: bool | None = None
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = bounded(0, -1)
    detect_anomaly: bool = False


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = choice("auto", "auto", "online", "offline", "disabled")
    project: str = "lightning_gen"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_model: bool = False


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: bool = True


@dataclass
class ClusterConfig:
    """How `lgen submit` asks SLURM for resources (ignored by `lgen train`)."""

    nodes: int = bounded(1, 1)
    gpus_per_node: int = bounded(0, 0)  # 0: a CPU job; else ntasks-per-node = gpus_per_node
    tasks_per_node: int | None = bounded(
        None, 1
    )  # CPU jobs: DDP processes per node (default: trainer.devices)
    cpus_per_task: int = bounded(4, 1)
    mem: str | None = "16G"
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # --signal=USR1@<grace>: seconds between the preemption signal and the time limit, for finishing the
    # step and writing the checkpoint. 5 minutes: a ResNet-50 or ViT-B checkpoint with optimizer state is
    # 0.3-1 GB, a shared file system can be slow under load, and SLURM may send the signal up to 60 s late.
    signal_grace_s: int = 300
    omp_num_threads: int | None = bounded(
        None, 1
    )  # per training process; default cpus_per_task - data.num_workers
    requeue: bool = True
    setup: list[str] = field(default_factory=list)  # e.g. ["module load cuda", "source .venv/bin/activate"]
    extra_sbatch: list[str] = field(default_factory=list)  # extra "#SBATCH ..." lines, without the prefix
    template: str = "slurm/job.sbatch"


@dataclass
class RootConfig:
    experiment: str | None = None  # name of the experiment; the run directory is runs/<experiment>/<run_id>
    seed: int = bounded(0, 0)
    run_id: str | None = None  # given, or $SLURM_JOB_ID, or generated
    resume: str = "auto"  # "auto": newest checkpoint of this run id; "never"; or a checkpoint path
    runs_dir: str = "runs"
    method: Any = None
    data: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    callbacks: Any = None  # name -> section, each checked against its registered schema
    # A stage trained first when the method needs its output (latent diffusion's autoencoder): the
    # stage-1 experiment and its overrides, e.g. {experiment: latent_autoencoder_digits, trainer:
    # {max_epochs: 20}}; checked by composing that config (lightning_gen/stages.py)
    stage1: Any = None


# --------------------------------------------------------------------------------------------
# Finding config files
# --------------------------------------------------------------------------------------------


def conf_dir() -> Path:
    """``$LGEN_CONF_DIR``, else ``./conf`` if it has a config.yaml, else the one in this repository."""
    candidates = [os.environ.get("LGEN_CONF_DIR"), "conf", Path(__file__).resolve().parents[1] / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate)
    raise ConfigError(
        "no config directory found: set LGEN_CONF_DIR to a folder with config.yaml, "
        "or run from the repository root"
    )


def options(group: str) -> list[str]:
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # yaml syntax errors carry line numbers; keep them
        raise ConfigError(f"cannot parse {path}: {error}") from error
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return node


def _load_option(group: str, option: str) -> DictConfig:
    path = conf_dir() / group / f"{option}.yaml"
    if not path.is_file():
        available = options(group)
        raise ConfigError(
            f"unknown {group} option {option!r}{did_you_mean(option, available)}. "
            f"Available in {path.parent}: {', '.join(available) or '(none)'}"
        )
    return _load_yaml(path)


def _split_defaults(node: DictConfig, where: str) -> tuple[dict[str, str | None], DictConfig]:
    """Separate a file's ``defaults:`` list (group -> option) from the rest of its body."""
    selections: dict[str, str | None] = {}
    body = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    for item in node.get("defaults", []) or []:
        if item == "_self_":
            continue
        if not isinstance(item, DictConfig) or len(item) != 1:
            raise ConfigError(f"{where}: each defaults entry must be 'group: option', got {item!r}")
        ((group, option),) = item.items()
        if group not in SELECTABLE:
            raise ConfigError(
                f"{where}: unknown group {group!r} in defaults{did_you_mean(group, SELECTABLE)}; "
                f"groups are {', '.join(SELECTABLE)}"
            )
        selections[str(group)] = None if option is None else str(option)
    return selections, body


# --------------------------------------------------------------------------------------------
# Parsing the command line
# --------------------------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``group=option`` selections from dotted ``key=value`` overrides."""
    selections: dict[str, str] = {}
    dotted: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(
                f"cannot read argument {arg!r}: overrides look like group=option (e.g. data=cifar10) "
                f"or key=value (e.g. method.lr=0.1)"
            )
        key, value = arg.split("=", 1)
        if "." not in key and key in SELECTABLE:
            selections[key] = value
        else:
            dotted.append(arg)
    return selections, dotted


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def compose(args: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose and validate the config for command-line overrides ``args``."""
    cli_selections, dotted = parse_overrides(list(args))
    root_path = conf_dir() / "config.yaml"
    selections, cfg = _split_defaults(_load_yaml(root_path), str(root_path))

    # The root's default experiment is the embedded default of a bare `lgen train`. Picking a method
    # or dataset on the command line without an experiment means "this method/data with its own
    # defaults", so the default experiment (written for the autoencoder on digits) is not applied.
    if "experiment" not in cli_selections and {"method", "data"} & cli_selections.keys():
        selections.pop("experiment", None)
    experiment = cli_selections.get("experiment", selections.get("experiment"))
    experiment_body = OmegaConf.create({})
    if experiment not in (None, "null", "none"):
        exp_selections, experiment_body = _split_defaults(
            _load_option("experiment", experiment), f"experiment {experiment!r}"
        )
        exp_selections.pop("experiment", None)
        selections.update(exp_selections)
    else:
        experiment = None
    selections.update({k: v for k, v in cli_selections.items() if k != "experiment"})

    for group in GROUPS:
        option = selections.get(group)
        if option is None:
            cfg[group] = {}
            continue
        cfg[group] = _load_option(group, option)
        if group in ("method", "data") and "name" not in cfg[group]:
            cfg[group]["name"] = option

    cfg = OmegaConf.merge(cfg, experiment_body)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot read overrides {dotted}: {error}") from error
    if cfg.get("experiment") is None:
        cfg.experiment = (
            experiment or f"{selections.get('method') or 'method'}_{selections.get('data') or 'data'}"
        )
    return validate(cfg)


def validate(cfg: DictConfig) -> DictConfig:
    """Check ``cfg`` against all schemas and return it as a typed (structured) config."""
    from lightning_gen import registry

    nested = _all_leaf_paths(RootConfig)
    for kind in ("method", "data"):
        name = (cfg.get(kind) or {}).get("name")
        if name in registry.entries(kind):
            nested += _all_leaf_paths(registry.get(kind, name).config, kind)
    _check_keys(cfg, RootConfig, "", skip={"method", "data", "callbacks"}, nested=nested)
    typed = _typed(cfg, RootConfig, "", skip={"method", "data", "callbacks"})
    _check_devices(typed.trainer.devices)
    _check_deterministic(typed.trainer.deterministic)
    for key in ("experiment", "run_id"):  # the run directory is <runs_dir>/<experiment>/<run_id>
        _check_folder_name(typed[key], key)
    for kind in ("method", "data"):
        section = cfg.get(kind) or OmegaConf.create({})
        if "name" not in section:
            raise ConfigError(f"{kind}.name is missing: choose one with {kind}=<option>, see `lgen list`")
        schema = registry.get(kind, section.name).config
        _check_keys(section, schema, kind)
        typed[kind] = _typed(section, schema, kind)
    if typed.get("stage1") is not None:
        from lightning_gen.stages import check_section

        check_section(typed)
    callbacks = cfg.get("callbacks") or OmegaConf.create({})
    known = registry.entries("callback")
    typed.callbacks = OmegaConf.create({})
    for name, section in callbacks.items():
        if name not in known:
            raise ConfigError(
                f"unknown callback callbacks.{name}{did_you_mean(name, known)}; "
                f"valid callbacks: {', '.join(known) or '(none)'}"
            )
        _check_keys(section, known[name].config, f"callbacks.{name}")
        typed.callbacks[name] = _typed(section, known[name].config, f"callbacks.{name}")
    return typed


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _all_leaf_paths(schema: type, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(schema):
        kind = _field_type(schema, f.name)
        if dataclasses.is_dataclass(kind):
            paths += _all_leaf_paths(kind, _join(prefix, f.name))
        else:
            paths.append(_join(prefix, f.name))
    return paths


def _field_type(schema: type, name: str):
    hints = typing.get_type_hints(schema)
    return hints.get(name, Any)


def _check_keys(node: Any, schema: type, path: str, skip=frozenset(), nested=()) -> None:
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{path or 'config'} must be a mapping of keys to values, got {node!r}; "
            f"valid keys: {', '.join(f.name for f in dataclasses.fields(schema))}"
        )
    valid = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        if key in skip:
            continue
        if key not in valid:
            hint = did_you_mean(key, valid)
            if not hint and not path:  # a leaf written without its section, e.g. lr=0.1
                matches = [p for p in nested if p.endswith(f".{key}")]
                hint = f" (did you mean {matches[0]!r}?)" if matches else ""
            where = f"{_join(path, key)}" if path else f"{key} (at the top level)"
            raise ConfigError(f"unknown config key {where}{hint}. Valid keys here: {', '.join(valid)}")
        kind = _field_type(schema, key)
        if dataclasses.is_dataclass(kind) and node[key] is not None:
            _check_keys(node[key], kind, _join(path, key))
        choices = _choices(schema, key)
        value = node._get_node(key)._value() if hasattr(node._get_node(key), "_value") else None
        if choices and isinstance(value, str) and value not in choices and not value.startswith("${"):
            raise ConfigError(
                f"invalid value {value!r} for {_join(path, key)}{did_you_mean(value, choices)}; "
                f"expected one of: {', '.join(choices)}"
            )


def _choices(schema: type, key: str) -> tuple[str, ...]:
    for f in dataclasses.fields(schema):
        if f.name == key:
            return tuple(f.metadata.get("choices", ()))
    return ()


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "null"
    return getattr(kind, "__name__", str(kind))


def _typed(node: DictConfig, schema: type, path: str, skip=frozenset()) -> DictConfig:
    structured = OmegaConf.structured(schema)
    body = OmegaConf.masked_copy(node, [k for k in node if k not in skip])
    try:
        merged = OmegaConf.merge(structured, body)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        full = _join(path, key)
        owner: Any = schema
        for part in key.split(".")[:-1]:
            owner = _field_type(owner, part) if dataclasses.is_dataclass(owner) else Any
        leaf = key.split(".")[-1]
        expected = _type_name(_field_type(owner, leaf)) if dataclasses.is_dataclass(owner) else "?"
        try:
            value = OmegaConf.select(body, key, throw_on_missing=False)
        except OmegaConfBaseException:
            value = "?"
        raise ConfigError(
            f"wrong type for {full}: expected {expected}, got {value!r} ({type(value).__name__})"
        ) from error
    _check_bounds(merged, schema, path)
    return merged


def _check_bounds(node: DictConfig, schema: type, path: str) -> None:
    """Numbers declared with ``bounded`` must lie in their range: caught here, not as a traceback later."""
    for f in dataclasses.fields(schema):
        kind = _field_type(schema, f.name)
        value = node.get(f.name)
        if dataclasses.is_dataclass(kind) and isinstance(value, DictConfig):
            _check_bounds(value, kind, _join(path, f.name))
            continue
        meta = _bounds_metadata(schema, f.name)
        if not meta:
            continue
        full = _join(path, f.name)
        allowed = _allowed_range(meta)
        hint = f" ({meta['hint']})" if meta.get("hint") else ""
        if isinstance(value, ListConfig | list | tuple) or type(value).__name__ == "TupleConfig":
            for entry in value:
                if _is_number(entry) and not _in_range(entry, meta):
                    raise ConfigError(
                        f"invalid value {entry} in {full}={list(value)}: every entry must be {allowed}{hint}"
                    )
            continue
        if not _is_number(value) or _in_range(value, meta):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        raise ConfigError(
            f"invalid value {value} for {full}: it must be {allowed}{hint}; "
            f"e.g. {full}={_example(value, default, meta)}"
        )


def _is_number(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and isinstance(value, int | float)


def _in_range(value: float, meta: dict) -> bool:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        return False
    return not (high is not None and (value >= high if meta.get("high_open") else value > high))


def _allowed_range(meta: dict) -> str:
    """'between 0 and 1', 'at least 1', 'greater than 0 and at most 1', ..."""
    low, high, low_open, high_open = (
        meta.get("low"),
        meta.get("high"),
        meta.get("low_open"),
        meta.get("high_open"),
    )
    if low is not None and high is not None and not (low_open or high_open):
        return f"between {low} and {high}"
    parts = []
    if low is not None:
        parts.append(f"greater than {low}" if low_open else f"at least {low}")
    if high is not None:
        parts.append(f"less than {high}" if high_open else f"at most {high}")
    return " and ".join(parts)


def _example(value: float, default: Any, meta: dict) -> Any:
    """A value to suggest: the field's default where it is allowed, else the nearest allowed bound."""
    if _is_number(default) and _in_range(default, meta):
        return default
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value <= low:
        return low if not meta.get("low_open") else (low + high) / 2 if high is not None else low + 1
    return high if not meta.get("high_open") else (low + high) / 2 if low is not None else high - 1


def _bounds_metadata(schema: type, name: str) -> dict:
    """The ``bounded`` metadata of a field, also when a subclass redeclares it with a plain default."""
    for klass in schema.__mro__:
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == name and ("low" in f.metadata or "high" in f.metadata):
                    return dict(f.metadata)
    return {}


def _check_folder_name(value: Any, key: str) -> None:
    """``experiment`` and ``run_id`` each name one folder of the run's path: no separator, not '.' or '..'."""
    if value is None:
        return
    text = str(value)
    separators = [sep for sep in ("/", "\\", os.sep, os.altsep) if sep]
    if text.strip() in ("", ".", "..") or any(sep in text for sep in separators) or "\0" in text:
        raise ConfigError(
            f"invalid value {text!r} for {key}: it is one folder name of the run directory "
            f"(<runs_dir>/<experiment>/<run_id>), so it cannot be empty, '.' or '..' or contain a path "
            f"separator; e.g. {key}=my-run, and runs_dir=... to put runs elsewhere"
        )


def _check_devices(devices: Any) -> None:
    """trainer.devices: a count (N >= 1, or -1 for all), "auto", or device ids ([0, 1] or "0,1")."""
    if isinstance(devices, bool):
        ok = False
    elif isinstance(devices, int):
        ok = devices >= 1 or devices == -1
    elif isinstance(devices, str):
        ok = devices == "auto" or devices.strip().removesuffix(",").replace(",", "").isdigit()
    else:  # a list of device ids
        ok = (
            all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
            and len(devices) > 0
        )
    if not ok:
        raise ConfigError(
            f"invalid value {devices!r} for trainer.devices: give a number of devices (trainer.devices=2), "
            f"-1 or auto for all of them, or device ids (trainer.devices=[0,1])"
        )


def _check_deterministic(value: Any) -> None:
    """trainer.deterministic: true, false or warn (Lightning's ``Trainer(deterministic=...)``)."""
    if not (isinstance(value, bool) or value == "warn"):
        raise ConfigError(
            f"invalid value {value!r} for trainer.deterministic: expected true (deterministic algorithms "
            "only: an operation without one raises), warn (it warns instead) or false"
        )


# --------------------------------------------------------------------------------------------
# Using a composed config
# --------------------------------------------------------------------------------------------


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def section_object(section: DictConfig):
    """The dataclass instance behind a validated section (what methods and DataModules receive)."""
    return OmegaConf.to_object(section)


def to_dict(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def from_saved(path: str | Path) -> DictConfig:
    """Re-validate a config.yaml written into a run directory."""
    return validate(_load_yaml(Path(path)))
