"""Build DataModule, method, callbacks, loggers and Trainer from a config, and train.

A run lives in ``runs/<experiment>/<run_id>/``::

    config.yaml        the resolved config (an older differing one is kept as config.<time>.yaml)
    checkpoints/       last.ckpt, the best by the method's monitored metric, periodic step checkpoints
    metrics.csv        every logged metric (CSV logger), hparams.yaml
    wandb/             the W&B run directory (offline runs: `wandb sync` uploads it)
    wandb_id           the W&B run id, reused when the run resumes (SLURM requeue included)
    samples/           image grids, where the method makes images

The run id is ``run_id=...`` if given, else ``$SLURM_JOB_ID`` (array tasks: ``<array job>_<task>``),
else torchrun's ``--rdzv-id``, else generated. The DDP processes that Lightning launches inherit it
through ``$LGEN_RUN_ID``; processes that an external launcher (torchrun, several nodes) starts take
global rank 0's run id, checkpoint to resume and W&B id (``cluster.launch``).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig

from lightning_gen import registry, stages
from lightning_gen.checkpoint import AtomicCheckpointIO, LastCheckpoint, resume_path
from lightning_gen.cluster.launch import agree, external_launch, torchelastic_run_id
from lightning_gen.config import ConfigError, section_object, to_dict, to_yaml
from lightning_gen.data.sampler import ElasticEpochResume
from lightning_gen.interrupt import StopOnSignal
from lightning_gen.methods.base import Method
from lightning_gen.precision import resolve_precision
from lightning_gen.quiet import LogEveryEpoch, silence_library_notices
from lightning_gen.randomness import RandomStreams

RUN_ID_ENV = "LGEN_RUN_ID"


@dataclass
class Run:
    """Everything ``train`` built, for callers that want to look inside (notebooks, tests)."""

    cfg: DictConfig
    run_dir: Path
    datamodule: Any
    method: Method
    trainer: L.Trainer
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped_by(self) -> signal.Signals | None:
        """The signal (SIGTERM, SIGINT) that stopped training early, if one did."""
        stop = next((c for c in self.trainer.callbacks if isinstance(c, StopOnSignal)), None)
        return stop.stopped_by if stop is not None else None

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number when a signal stopped training (what `lgen train` exits with)."""
        return 128 + int(self.stopped_by) if self.stopped_by is not None else 0


# ------------------------------------------------------------------------------ run identity


def slurm_run_id() -> str | None:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def resolve_run_id(cfg: DictConfig) -> str:
    return (
        cfg.run_id
        or os.environ.get(RUN_ID_ENV)
        or slurm_run_id()
        or torchelastic_run_id()
        or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    )


def settle_run(cfg: DictConfig) -> dict[str, Any]:
    """The run id, the checkpoint to resume from (None: start) and the W&B id of this run, decided by
    global rank 0 for every process when an external launcher started several (``cluster.launch``)."""

    def decide() -> dict[str, Any]:
        run_id = resolve_run_id(cfg)
        run_dir = run_directory(cfg, run_id)
        return {
            "run_id": run_id,
            "resume": resume_path(run_dir, cfg.resume),
            "wandb_id": wandb_run_id(run_dir),
        }

    launched = external_launch(cfg.trainer.num_nodes)
    if launched is None:
        return decide()
    rank, world = launched
    rank_zero_only.rank = rank  # Lightning sets it in trainer.fit; what is written before needs it now
    decided = agree(rank, world, decide)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node
        print(
            f"[lgen] global rank {rank} of {world}: run {decided['run_id']} as global rank 0 decided, "
            f"resuming from {decided['resume'] or 'nothing (a new run)'}",
            flush=True,
        )
    return decided


def run_directory(cfg: DictConfig, run_id: str) -> Path:
    return Path(cfg.runs_dir) / cfg.experiment / run_id


# ------------------------------------------------------------------------------ builders


def build_datamodule(cfg: DictConfig):
    datamodule = registry.build("data", section_object(cfg.data))
    datamodule.seed = cfg.seed  # the training order of epoch e is a function of (seed, e)
    return datamodule


def build_method(cfg: DictConfig, datamodule, **extra) -> Method:
    """``extra``: keyword arguments of the method's constructor besides its config and data (latent
    diffusion's ``autoencoder``)."""
    info = datamodule.info
    try:
        method = registry.build("method", section_object(cfg.method), data=info, **extra)
    except ValueError as error:  # built from the config alone: a network that cannot take this data's images
        raise ConfigError(
            f"method={cfg.method.name} cannot be built for data={cfg.data.name} "
            f"({info.channels}x{info.image_size}x{info.image_size} images): {error}"
        ) from error
    if cfg.trainer.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        compiled = method.compile_networks()
        rank_zero_info(f"[lgen] torch.compile: {', '.join(compiled) or 'no network of this method'}")
    return method


def build_callbacks(cfg: DictConfig, method: Method, run_dir: Path, validates: bool) -> list[L.Callback]:
    from lightning_gen.callbacks.guards import NonFiniteLossGuard

    ckpt_dir = run_dir / "checkpoints"
    configured = [
        registry.build("callback", section_object(section), name=name, run_dir=run_dir)
        for name, section in (cfg.callbacks or {}).items()
        if section.enabled
    ]
    monitor, mode, every = best_checkpoint_rule(method, configured)
    callbacks: list[L.Callback] = [
        RandomStreams(cfg.seed),
        ElasticEpochResume(),  # an epoch interrupted on another allocation ends where it should
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="epoch{epoch:03d}-step{step:06d}",
            monitor=monitor if validates else None,
            mode=mode,
            every_n_epochs=every,
            save_top_k=cfg.trainer.keep_best if validates and monitor else 1,
            auto_insert_metric_name=False,
        ),
        LastCheckpoint(ckpt_dir),
        NonFiniteLossGuard(ckpt_dir),
        StopOnSignal(),  # SIGTERM / SIGINT: stop at a step boundary with a checkpoint, exit 128 + signal
        LogEveryEpoch(),
    ]
    if cfg.trainer.enable_progress_bar:
        # The bar reads every prog_bar value back to the host when it refreshes (on a GPU, a wait for the
        # device): refresh on the logging steps, where Lightning reads the logged values anyway.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.trainer.log_every_n_steps))
    if SLURMEnvironment.detect():  # Lightning's SIGUSR1 requeue, run where all ranks agree
        from lightning_gen.cluster.requeue import RequeueAtStepBoundary

        callbacks.append(RequeueAtStepBoundary(signal.SIGUSR1))
    if cfg.trainer.checkpoint_every_n_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step{step:06d}",
                every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
                save_top_k=1,
                monitor="step",
                mode="max",
                save_last=True,
                auto_insert_metric_name=False,
            )
        )
    return callbacks + configured


def best_checkpoint_rule(method: Method, callbacks: list[L.Callback]) -> tuple[str | None, str, int]:
    """(metric, mode, every n epochs) the best checkpoint is chosen by.

    A generator evaluated by FID is judged by FID (checked on the epochs FID runs); otherwise the
    method's own ``monitor``, which is None where no logged number measures quality (a GAN's losses
    do not), and then the newest checkpoint is kept."""
    from lightning_gen.callbacks.fid import FID

    fid = next((c for c in callbacks if isinstance(c, FID)), None)
    if method.is_generative and fid is not None:
        return fid.metric_name(method.data_info.name), "min", fid.cfg.every_n_epochs
    monitor, mode = method.monitor if method.monitor else (None, "min")
    return monitor, mode, 1


def wandb_mode(requested: str) -> str:
    """auto: online when logged in (or WANDB_MODE=online), otherwise offline."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        logged_in = "api.wandb.ai" in netrc.read_text()
    except OSError:
        logged_in = False
    return "online" if logged_in else "offline"


def wandb_run_id(run_dir: Path) -> str:
    """One W&B id per run directory, kept across resumes and SLURM requeues (``save_run_files`` writes it)."""
    path = run_dir / "wandb_id"
    return path.read_text().strip() if path.exists() else secrets.token_hex(4)


def build_loggers(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None) -> list:
    """The run's loggers; nothing is written until training starts (``save_run_files``, then the first log)."""
    from lightning_gen.loggers import AppendingCSVLogger, WandbLogger

    loggers: list = []
    wandb_cfg = cfg.logger.wandb
    mode = wandb_mode(wandb_cfg.mode)
    if wandb_cfg.enabled and mode != "disabled":
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                group=wandb_cfg.group,
                tags=list(wandb_cfg.tags),
                id=wandb_id or wandb_run_id(run_dir),
                resume="allow",
                offline=mode == "offline",
                name=f"{cfg.experiment}/{run_dir.name}",
                log_model=wandb_cfg.log_model,
            )
        )
    if cfg.logger.csv:
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="", version=""))
    return loggers


def build_strategy(name: str):
    """``fsdp`` is FSDP2 sharding (``lightning_gen.sharding``, CPU and GPU); other names go to Lightning."""
    from lightning_gen.sharding import STRATEGY_NAME, FullyShardedStrategy

    return FullyShardedStrategy() if name == STRATEGY_NAME else name


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    kwargs = {
        k: t[k]
        for k in (
            "accelerator",
            "devices",
            "num_nodes",
            "max_epochs",
            "max_steps",
            "accumulate_grad_batches",
            "gradient_clip_val",
            "check_val_every_n_epoch",
            "log_every_n_steps",
            "sync_batchnorm",
            "deterministic",
            "benchmark",
            "enable_progress_bar",
            "num_sanity_val_steps",
            "detect_anomaly",
        )
    }
    if t.gradient_clip_val is not None:
        kwargs["gradient_clip_algorithm"] = t.gradient_clip_algorithm
    for optional in ("max_time", "val_check_interval", "limit_train_batches", "limit_val_batches"):
        if t[optional] is not None:
            kwargs[optional] = t[optional]
    if isinstance(kwargs["devices"], DictConfig | list) or hasattr(kwargs["devices"], "_content"):
        kwargs["devices"] = list(kwargs["devices"])
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # slurm/job.sbatch asks for --signal=USR1@grace: save and requeue on it
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    precision = resolve_precision(t.precision, t.accelerator)
    try:
        trainer = L.Trainer(
            **kwargs,
            strategy=build_strategy(t.strategy),
            precision=precision,
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=str(run_dir),
            plugins=plugins,
        )
    except (ValueError, MisconfigurationException) as error:
        # e.g. accelerator=gpu without a GPU, 16-mixed with fsdp: Lightning's reason, in our config's words
        chosen = {
            "accelerator": t.accelerator,
            "devices": kwargs["devices"],
            "num_nodes": t.num_nodes,
            "strategy": t.strategy,
            "precision": precision,
        }
        settings = ", ".join(f"trainer.{key}={value}" for key, value in chosen.items())
        raise ConfigError(f"Lightning rejects the trainer settings ({settings}): {error}") from error
    trainer.lgen_channels_last = bool(t.channels_last)
    return trainer


# ------------------------------------------------------------------------------ train


def save_run_files(cfg: DictConfig, run_dir: Path, loggers: list) -> None:
    """Create the run directory with config.yaml and the W&B id: the first thing a run writes."""
    from lightning.pytorch.loggers import WandbLogger

    if rank_zero_only.rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path, text = run_dir / "config.yaml", to_yaml(cfg)
    if path.exists() and path.read_text() != text:  # a resume with changed settings: keep the old one
        path.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    path.write_text(text)
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    if wandb_logger is not None and not (run_dir / "wandb_id").exists():
        (run_dir / "wandb_id").write_text(f"{wandb_logger.version}\n")


def preflight(cfg: DictConfig, datamodule, method: Method, callbacks: list) -> None:
    """What would otherwise fail once the run has started: the dataset's download (``data.download=true``;
    without it ``train`` checked the files first of all), the DataModule's checks against the method
    (``check_method``, where it has them: latents made by another autoencoder), and each callback's own
    checks against the method (``preflight(method)``)."""
    if cfg.data.download and rank_zero_only.rank == 0:
        datamodule.prepare_data()  # global rank 0 only, as Lightning does; then its prepare_data finds the files
    check_method = getattr(datamodule, "check_method", None)
    if check_method is not None:
        check_method(method)
    for callback in callbacks:
        check = getattr(callback, "preflight", None)
        if check is not None:
            check(method)


def train(cfg: DictConfig, extra_callbacks: tuple[L.Callback, ...] = ()) -> Run:
    """Train the experiment ``cfg`` (from ``config.compose``) and return what was built.

    ``extra_callbacks`` (benchmarks, notebooks) run before the run's own, in the order given; one with an
    ``install(trainer)`` method places itself once the Trainer is built."""
    silence_library_notices()
    settled = settle_run(cfg)
    run_id, ckpt_path = settled["run_id"], settled["resume"]
    previous_env = os.environ.get(RUN_ID_ENV)
    os.environ[RUN_ID_ENV] = run_id  # DDP processes launched by Lightning inherit the same run directory
    try:
        cfg.run_id = run_id
        run_dir = run_directory(cfg, run_id)
        L.seed_everything(cfg.seed, workers=True, verbose=False)

        # Everything is built and checked before anything is written: a run that fails here leaves no
        # run directory and no W&B run behind (a later run with the same id starts clean).
        stage1 = stages.plan(
            cfg
        )  # the model method.latents (tokenizer, teacher) names, trained first if need be
        reused = stage1 is not None and stage1.finished
        if stage1 is not None and not reused:
            # stage 2 checked with an untrained model of the stage-1 recipe before stage 1 trains
            untrained = {stage1.input.keyword: stage1.untrained_model()}
            build_checked(cfg, run_dir, settled["wandb_id"], extra_callbacks, **untrained)
            stage1.run()
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # as if stage 1 had been there
        built = build_checked(cfg, run_dir, settled["wandb_id"], extra_callbacks)
        datamodule, method, callbacks, loggers, trainer = built
        if reused:
            stage1.announce_reuse()

        save_run_files(cfg, run_dir, loggers)
        for logger in loggers:
            logger.log_hyperparams(to_dict(cfg))
        announce(cfg, trainer, run_dir, ckpt_path)

        started = time.time()
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
        run = Run(cfg, run_dir, datamodule, method, trainer)
        run.summary = summarize(run, time.time() - started)
        return run
    finally:
        if previous_env is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = previous_env


def build_checked(
    cfg: DictConfig, run_dir: Path, wandb_id: str, extra_callbacks: tuple = (), **method_extra
) -> tuple:
    """DataModule, method, callbacks, loggers and Trainer of a run, with every check that needs no
    training; nothing is written. ``method_extra``: passed to the method's constructor."""
    datamodule = build_datamodule(cfg)
    if not cfg.data.download:  # a missing dataset is named before anything is built from its settings
        datamodule.check_files()
    method = build_method(cfg, datamodule, **method_extra)
    if cfg.trainer.strategy == "fsdp":
        from lightning_gen.sharding import unsupported_reason

        reason = unsupported_reason(method, cfg.trainer.sync_batchnorm or not _multi_process(cfg))
        if reason:
            raise ConfigError(f"trainer.strategy=fsdp: {reason}")
    validates = cfg.trainer.limit_val_batches != 0
    callbacks = [*extra_callbacks, *build_callbacks(cfg, method, run_dir, validates)]
    loggers = build_loggers(cfg, run_dir, wandb_id)
    if getattr(method, "ddp_find_unused_parameters", False) and cfg.trainer.strategy in ("auto", "ddp"):
        # e.g. a GAN's D step leaves G without gradients: DDP must be told (only matters with >1 process)
        cfg.trainer.strategy = (
            "ddp_find_unused_parameters_true" if _multi_process(cfg) else cfg.trainer.strategy
        )
    trainer = build_trainer(cfg, callbacks, loggers, run_dir)
    for (
        callback
    ) in extra_callbacks:  # those that place themselves among the others (host_sync.CountStepSyncs)
        if hasattr(callback, "install"):
            callback.install(trainer)
    preflight(cfg, datamodule, method, callbacks)
    return datamodule, method, callbacks, loggers, trainer


def _multi_process(cfg: DictConfig) -> bool:
    devices = cfg.trainer.devices
    count = (
        len(devices)
        if not isinstance(devices, int | str)
        else (int(devices) if str(devices).isdigit() else 2)
    )
    return count * cfg.trainer.num_nodes > 1


@rank_zero_only
def announce(cfg: DictConfig, trainer: L.Trainer, run_dir: Path, ckpt_path: str | None) -> None:
    per_device = cfg.data.batch_size
    world = trainer.world_size
    accumulate = trainer.accumulate_grad_batches
    rank_zero_info(
        f"[lgen] experiment {cfg.experiment}: method={cfg.method.name} data={cfg.data.name} "
        f"precision={trainer.precision} run_dir={run_dir}"
    )
    rank_zero_info(
        f"[lgen] global batch {per_device * world * accumulate} = {per_device} per device x {world} processes "
        f"({trainer.num_nodes} node(s) x {trainer.num_devices} device(s)) x {accumulate} accumulation step(s)"
    )
    if ckpt_path:
        rank_zero_info(f"[lgen] resuming from {ckpt_path}")


def _metric(trainer: L.Trainer, *names: str) -> float | None:
    for name in names:
        value = trainer.callback_metrics.get(name)
        if value is not None:
            return float(value)
    return None


def summarize(run: Run, seconds: float) -> dict[str, Any]:
    trainer = run.trainer
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.best_model_path), "")
    if best and not run.run_dir.is_absolute():  # Lightning reports it absolute; show it like run_dir
        best = os.path.relpath(best)
    summary: dict[str, Any] = {
        "experiment": run.cfg.experiment,
        "run_dir": str(run.run_dir),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "seconds": round(seconds, 1),
        "last_checkpoint": str(run.run_dir / "checkpoints" / "last.ckpt"),
        "best_checkpoint": best,
    }
    if run.stopped_by is not None:
        summary["stopped_by"] = (
            f"{run.stopped_by.name} at step {trainer.global_step}: checkpoint saved, exit code {run.exit_code}"
        )
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.endswith("_step") or key == "lr":
            continue
        summary[key.removesuffix("_epoch")] = round(float(value), 4)
    wandb_dirs = sorted((run.run_dir / "wandb").glob("offline-run-*"))
    if len(wandb_dirs) == 1:
        summary["wandb_sync"] = f"wandb sync {wandb_dirs[0]}"
    elif wandb_dirs:  # one offline dir per resumed segment (e.g. SLURM requeues), all with the same run id
        segments = f"{run.run_dir / 'wandb'}/offline-run-*"
        summary["wandb_sync"] = f"wandb sync {segments}   ({len(wandb_dirs)} segments of one run)"
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    lines = ["", "=" * 72, "lightning_gen run summary", "-" * 72]
    lines += [f"{k:<{width}}  {v}" for k, v in summary.items()]
    lines.append("=" * 72)
    return "\n".join(lines)
