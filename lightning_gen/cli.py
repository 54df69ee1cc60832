"""``lgen``: train, evaluate, sample and submit experiments from OmegaConf configs.

Subcommands other than train/list/prepare live in their own modules and plug in through
``PLUGINS``: a module with ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
from pathlib import Path

from lightning_gen.config import GROUPS, ConfigError, compose, options, to_yaml

EXAMPLES = """\
overrides:
  group=option        pick a config file from conf/<group>/ (groups: method data trainer logger cluster experiment)
  key.sub=value       set any value, e.g. method.lr=0.1 trainer.max_epochs=5 data.batch_size=256

examples:
  lgen train                                         the embedded default: autoencoder on digits, ~1 min on a CPU
  lgen train experiment=ae_digits trainer.max_epochs=3
  lgen train method=autoencoder data=mnist data.root=/datasets method.latent_dim=64
  lgen train experiment=ae_digits trainer.devices=2 trainer.accelerator=cpu      2-process DDP
  lgen train experiment=ae_digits run_id=my-run resume=auto                       continue my-run
  lgen train experiment=ae_digits --print-config                                  show the resolved config
  lgen list                                          what methods, datasets and experiments exist
"""

# `lgen train` stopped at a NaN/inf loss before applying it (the checkpoints saved before are untouched)
NON_FINITE_LOSS_EXIT = 3

PLUGINS = {
    "eval": ("lightning_gen.eval.cli", "evaluate a checkpoint: probe, knn, finetune, cluster"),
    "sample": ("lightning_gen.sample", "draw samples from a generator checkpoint into an image grid"),
    "submit": (
        "lightning_gen.cluster.submit",
        "render and submit a SLURM job for the same overrides as train",
    ),
    "shards": (
        "lightning_gen.data.shard_writer",
        "write an image-folder tree into streaming shards (data=shards), or validate shards",
    ),
    "export": (
        "lightning_gen.export",
        "take a trained encoder out: backbone weights (torchvision names) or embeddings of a split",
    ),
    "latents": (
        "lightning_gen.data.latents",
        "encode a dataset once with a frozen autoencoder, for latent diffusion on data=latents",
    ),
    "fid-extractor": (
        "lightning_gen.eval.fid_extractor",
        "build the domain feature extractor for FID on digits/MNIST ahead of time (training builds it on first use)",
    ),
}


def _plugin_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lgen",
        description="lightning_gen: generative models and self-supervised learning with PyTorch Lightning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lgen <command> --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")

    train = sub.add_parser(
        "train",
        help="train an experiment (no arguments: the embedded digits default)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Compose conf/config.yaml with your overrides, validate it, and train.",
    )
    train.add_argument("overrides", nargs="*", help="group=option and key=value overrides")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )

    listing = sub.add_parser("list", help="list methods, datasets, experiments and config options")
    listing.add_argument(
        "what", nargs="?", choices=["methods", "data", "experiments", "callbacks", "all"], default="all"
    )

    prepare = sub.add_parser(
        "prepare",
        help="download (data.download=true) or check a dataset",
        description="Run the DataModule's prepare_data once: downloads when data.download=true, "
        "otherwise checks the files are in place and says which are missing.",
    )
    prepare.add_argument("overrides", nargs="*")

    for name, (module, summary) in PLUGINS.items():
        if _plugin_available(module):
            plugin = importlib.import_module(module)
            p = sub.add_parser(
                name,
                help=summary,
                description=(plugin.__doc__ or summary).strip(),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            plugin.add_arguments(p)
            p.set_defaults(plugin=plugin)
    return parser


def cmd_train(args) -> int:
    from lightning_gen.run import format_summary, train

    cfg = compose(args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    run = train(cfg)
    if run.stopped_by is not None:
        run.summary["resume_command"] = resume_command(args.overrides, run.cfg.run_id)
    if run.trainer.is_global_zero:
        print(format_summary(run.summary))
    return run.exit_code


def resume_command(overrides: list[str], run_id: str) -> str:
    """The command line that continues run ``run_id`` from its newest checkpoint (same directory)."""
    if Path(sys.argv[0]).name == "lgen":
        program = ["lgen"]
    else:  # python -m lightning_gen, or a script: this interpreter, as module
        program = [sys.executable, "-m", "lightning_gen"]
    kept = [o for o in overrides if not o.startswith(("run_id=", "resume="))]
    again = ["resume=auto"] if any(o.startswith("resume=") for o in overrides) else []
    return shlex.join([*program, "train", *kept, f"run_id={run_id}", *again])


def cmd_list(args) -> int:
    from lightning_gen import registry

    sections = []
    if args.what in ("methods", "all"):
        sections.append(
            ("methods (method=NAME)", {n: e.summary for n, e in registry.entries("method").items()})
        )
    if args.what in ("data", "all"):
        sections.append(("datasets (data=NAME)", {n: e.summary for n, e in registry.entries("data").items()}))
    if args.what in ("experiments", "all"):
        sections.append(
            ("experiments (experiment=NAME)", {n: _experiment_summary(n) for n in options("experiment")})
        )
    if args.what in ("callbacks", "all"):
        sections.append(
            ("callbacks (callbacks.NAME.*)", {n: e.summary for n, e in registry.entries("callback").items()})
        )
    if args.what == "all":
        sections.append(("config options (group=OPTION)", {g: ", ".join(options(g)) for g in GROUPS}))
    for title, rows in sections:
        print(title)
        width = max((len(n) for n in rows), default=0)
        for name, line in rows.items():
            print(f"  {name:<{width}}  {line}")
        print()
    return 0


def _experiment_summary(name: str) -> str:
    """The experiment file's leading comment, all its lines joined (a description may wrap)."""
    from lightning_gen.config import conf_dir

    lines = []
    for line in (conf_dir() / "experiment" / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def cmd_prepare(args) -> int:
    from lightning_gen import registry
    from lightning_gen.config import section_object

    cfg = compose(args.overrides)
    datamodule = registry.build("data", section_object(cfg.data))
    datamodule.prepare_data()
    print(f"{cfg.data.name}: files in place under {datamodule.root.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lightning_gen.callbacks.guards import NonFiniteLossError
    from lightning_gen.checkpoint import CheckpointError
    from lightning_gen.data.base import DatasetMissingError

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "list": cmd_list, "prepare": cmd_prepare}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        if hasattr(args, "plugin"):
            return args.plugin.main(args) or 0
        parser.print_help()
        return 2
    except (ConfigError, DatasetMissingError, CheckpointError) as error:
        print(f"lgen: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:  # every rank stops together; one of them says why
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            print(f"lgen: error: {error}", file=sys.stderr)
        return NON_FINITE_LOSS_EXIT


if __name__ == "__main__":
    sys.exit(main())
