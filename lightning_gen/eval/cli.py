"""Evaluate a checkpoint's representation: linear probe, kNN, semi-supervised fine-tuning, clustering.

    lgen eval probe    ckpt=runs/ae_digits/<run>/checkpoints/last.ckpt
    lgen eval knn      ckpt=... knn.k=[10,20,200] knn.temperature=0.07
    lgen eval probe    ckpt=... augment=true epochs=90 the papers' augmented linear evaluation
    lgen eval finetune ckpt=... finetune.fractions=[0.01,0.1] seed=0
    lgen eval finetune ckpt=... freeze=3               RotNet's semi-frozen protocol: first 3 stages fixed
    lgen eval cluster  ckpt=... data=cifar10 data.root=/datasets
    lgen eval all      ckpt=...                       all four, features extracted once
    lgen eval bpd      ckpt=... split=test n=1000     bits/dim of a likelihood model (eval/likelihood.py)
    lgen eval nll      ckpt=... k=64                  the same per image, ranked: most/least likely grid (eval/nll.py)
    lgen eval recon    ckpt=...                       an autoencoder's reconstruction MSE, PSNR and FID
    lgen eval gen      ckpt=... | fake=DIR|NPZ real=DIR|NPZ|<data>:<split>   a generator's metrics (eval/gen_cli.py)
    lgen eval stats    data=fashion_mnist split=test out=stats.npz          reference statistics (.npz)

Arguments are key=value. The data is the run's own (its config.yaml next to checkpoints/) unless
``data=NAME`` picks another dataset; ``data.KEY=VALUE`` overrides its settings. Protocol settings
live under ``probe.``, ``knn.``, ``finetune.``, ``cluster.``; for a single command the prefix may be
left out (``lgen eval knn ckpt=... k=[20]``). Results go to ``<run>/eval/<checkpoint>/<command>.json``
(or ``out=DIR``) with the fine-tuning subsets' indices beside them, a table is printed, and when the
run has a W&B run the results are added to it (offline runs: a resumed offline run with the same
id, uploaded into the same run by ``wandb sync``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lightning_gen.eval import EvalError
from lightning_gen.eval.clustering import KMeansConfig, cluster_features
from lightning_gen.eval.features import Features, require_embed, split_features
from lightning_gen.eval.finetune import FinetuneConfig, balanced_subset, finetune
from lightning_gen.eval.gen_cli import GenEvalConfig, StatsConfig
from lightning_gen.eval.knn import KNNConfig, check_k, knn_accuracy
from lightning_gen.eval.likelihood import LikelihoodConfig
from lightning_gen.eval.nll import NLLConfig
from lightning_gen.eval.probe import ProbeConfig, augmented_linear_probe, linear_probe
from lightning_gen.eval.recon import ReconConfig

COMMANDS = ("probe", "knn", "finetune", "cluster")  # the representation evaluations `all` runs
SECTIONS = (*COMMANDS, "recon", "bpd", "nll", "gen", "stats")  # every command with its own settings section
WITHOUT_CKPT = ("gen", "stats")  # commands that may run without ckpt= (gen: fake=; stats: data=)


@dataclass
class EvalConfig:
    ckpt: str | None = None
    data: str | None = None  # a conf/data option; default: the data of the checkpoint's run
    train_split: str = "train"  # fitted on (probe, kNN bank, fine-tuning subsets)
    eval_split: str = "val"  # scored on
    device: str = "auto"  # auto: cuda when available
    out: str | None = None  # default: <run_dir>/eval/<checkpoint name>
    seed: int = 0  # probe initialisation, fine-tuning subsets and order, k-means seeding
    wandb: bool = True  # add the results to the run's W&B run when it has one
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: KMeansConfig = field(default_factory=KMeansConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    bpd: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    nll: NLLConfig = field(default_factory=NLLConfig)
    gen: GenEvalConfig = field(default_factory=GenEvalConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)


def add_arguments(parser) -> None:
    parser.add_argument(
        "protocol",
        choices=[*COMMANDS, "all", "recon", "bpd", "nll", "gen", "stats"],
        help="which evaluation to run",
    )
    parser.add_argument("overrides", nargs="*", help="ckpt=PATH (required), data=NAME, data.KEY=V, KEY=VALUE")


def parse(protocol: str, args: list[str]) -> tuple[Any, list[str]]:
    """The validated EvalConfig and the ``data.*`` overrides, from key=value arguments."""
    from lightning_gen.config import ConfigError, _check_keys, _typed

    dotted, data_overrides = [], []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(
                f"cannot read argument {arg!r}: arguments look like key=value, e.g. ckpt=path/last.ckpt"
            )
        key = arg.split("=", 1)[0]
        if key.startswith("data."):
            data_overrides.append(arg)
        elif (
            "." not in key
            and key not in {f for f in EvalConfig.__dataclass_fields__}
            and protocol in SECTIONS
        ):
            dotted.append(f"{'cluster' if protocol == 'cluster' else protocol}.{arg}")  # lgen eval knn k=[20]
        else:
            dotted.append(arg)
    node = OmegaConf.from_dotlist(dotted)
    _check_keys(node, EvalConfig, "")
    cfg = OmegaConf.to_object(_typed(node, EvalConfig, ""))
    if not cfg.ckpt and protocol not in WITHOUT_CKPT:
        raise ConfigError(
            "ckpt=PATH is required: the checkpoint to evaluate, e.g. runs/<exp>/<run>/checkpoints/last.ckpt"
        )
    return cfg, data_overrides


def build_data(cfg: EvalConfig, method, run_dir: Path | None, data_overrides: list[str]):
    from lightning_gen import registry
    from lightning_gen.config import _check_keys, _typed, compose, section_object

    if cfg.data is None and run_dir is not None:
        section = OmegaConf.load(run_dir / "config.yaml").data
    else:
        section = compose([f"data={cfg.data or method.data_info.name}"]).data
        section = OmegaConf.create(OmegaConf.to_container(section))
    if not any(o.startswith("data.image_size=") for o in data_overrides):
        section.image_size = method.data_info.image_size  # the network was built for this size
    section = OmegaConf.merge(
        section, OmegaConf.from_dotlist([o.removeprefix("data.") for o in data_overrides])
    )
    schema = registry.get("data", section.name).config
    _check_keys(section, schema, "data")
    datamodule = registry.build("data", section_object(_typed(section, schema, "data")))
    datamodule.setup()
    return datamodule


class Evaluation:
    """One checkpoint on one dataset; features of each split are extracted once and reused."""

    def __init__(self, cfg: EvalConfig, data_overrides: list[str]):
        from lightning_gen.eval.wandb_run import run_dir_of_checkpoint
        from lightning_gen.methods.base import load_method

        self.cfg = cfg
        self.device = torch.device(
            "cuda"
            if cfg.device == "auto" and torch.cuda.is_available()
            else ("cpu" if cfg.device == "auto" else cfg.device)
        )
        self.method = load_method(cfg.ckpt)
        require_embed(self.method)
        self.method.to(self.device)
        self.run_dir = run_dir_of_checkpoint(cfg.ckpt)
        self.datamodule = build_data(cfg, self.method, self.run_dir, data_overrides)
        self.num_classes = self.datamodule.num_classes
        if self.num_classes <= 0:
            raise EvalError(
                f"dataset {self.datamodule.registry_name!r} has no classes: these evaluations need labels"
            )
        base = self.run_dir / "eval" if self.run_dir else Path(cfg.ckpt).resolve().parent / "eval"
        self.out = Path(cfg.out) if cfg.out else base / Path(cfg.ckpt).stem
        self._features: dict[str, Features] = {}

    def features(self, split: str, what: str) -> Features:
        if split not in self._features:
            self._features[split] = split_features(self.method, self.datamodule, split, self.device)
        return self._features[split].labeled(what)

    def probe(self) -> dict[str, float]:
        train, test = (
            self.features(self.cfg.train_split, "the linear probe"),
            self.features(self.cfg.eval_split, "the linear probe"),
        )
        probe_cfg = ProbeConfig(**{**asdict(self.cfg.probe), "seed": self.cfg.seed})
        if probe_cfg.augment:
            train_set = self.datamodule.eval_dataloader(self.cfg.train_split).dataset
            return augmented_linear_probe(
                self.method,
                train_set,
                train.features,
                test.features,
                test.labels,
                self.num_classes,
                probe_cfg,
                self.device,
            )
        return linear_probe(
            train.features, train.labels, test.features, test.labels, self.num_classes, probe_cfg
        )

    def knn(self) -> dict[str, float]:
        bank = self.features(self.cfg.train_split, "kNN")
        check_k(self.cfg.knn.k, len(bank))
        queries = self.features(self.cfg.eval_split, "kNN")
        return knn_accuracy(
            bank.features, bank.labels, queries.features, queries.labels, self.num_classes, self.cfg.knn
        )

    def cluster(self) -> dict[str, float]:
        feats = self.features(self.cfg.eval_split, "clustering metrics")
        kmeans_cfg = KMeansConfig(**{**asdict(self.cfg.cluster), "seed": self.cfg.seed})
        return cluster_features(feats.features, feats.labels, self.num_classes, kmeans_cfg)

    def finetune(self) -> dict[str, float]:
        ft = self.cfg.finetune
        if len(ft.epochs) != len(ft.fractions):
            raise EvalError(f"finetune.epochs {ft.epochs} needs one entry per fraction in {ft.fractions}")
        train_set = self.datamodule.eval_dataloader(self.cfg.train_split).dataset
        labels = getattr(train_set, "labels", None)  # in-memory datasets: no decoding of every image
        if labels is None:
            labels = [train_set[i]["label"] for i in range(len(train_set))]
        labels = torch.as_tensor(labels).long().flatten()
        if int(labels.min()) < 0:
            raise EvalError(
                "fine-tuning with a fraction of the labels needs a labeled train split (found label -1)"
            )
        results = {}
        for fraction, epochs in zip(ft.fractions, ft.epochs):
            subset = balanced_subset(labels, fraction, self.cfg.seed, self.num_classes)
            tag = f"{fraction * 100:g}pct"
            self.write(
                f"finetune_subset_{tag}.json",
                {
                    "fraction": fraction,
                    "seed": self.cfg.seed,
                    "split": self.cfg.train_split,
                    "per_class": torch.bincount(labels[subset], minlength=self.num_classes).tolist(),
                    "indices": subset.tolist(),
                },
            )
            images = torch.stack([train_set[i]["image"] for i in subset.tolist()])
            result = finetune(
                self.method,
                images,
                labels[subset],
                self.datamodule.eval_dataloader(self.cfg.eval_split),
                self.num_classes,
                epochs,
                FinetuneConfig(**{**asdict(ft), "seed": self.cfg.seed}),
                self.device,
            )
            results.update({f"{tag}_{k}": v for k, v in result.items()})
        return results

    def write(self, name: str, payload: dict) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / name
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    def run(self, protocol: str) -> dict[str, float]:
        started = time.time()
        results = getattr(self, protocol)()
        config = {k: v for k, v in asdict(self.cfg).items() if k not in set(SECTIONS) - {protocol}}
        self.write(
            f"{protocol}.json",
            {
                "protocol": protocol,
                "checkpoint": str(self.cfg.ckpt),
                "method": self.method.registry_name,
                "data": self.datamodule.registry_name,
                "train_split": self.cfg.train_split,
                "eval_split": self.cfg.eval_split,
                "seconds": round(time.time() - started, 2),
                "config": config,
                "results": results,
            },
        )
        return results


def format_table(title: str, rows: dict[str, float]) -> str:
    width = max([len(k) for k in rows] + [6])
    lines = [title, "-" * (width + 12)]
    for key, value in rows.items():
        is_fraction = any(t in key for t in ("top1", "top5", "accuracy"))
        shown = f"{100 * value:8.2f} %" if is_fraction else f"{value:10.4g}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def main(args) -> int:
    from lightning_gen.config import ConfigError
    from lightning_gen.eval.wandb_run import append_to_run

    try:
        cfg, data_overrides = parse(args.protocol, list(args.overrides))
        if args.protocol == "recon":
            return reconstruction(cfg, data_overrides)
        if args.protocol == "bpd":
            from lightning_gen.eval import likelihood

            likelihood.run(cfg, data_overrides)
            return 0
        if args.protocol == "nll":
            from lightning_gen.eval import nll

            nll.run(cfg, data_overrides)
            return 0
        if args.protocol in WITHOUT_CKPT:
            from lightning_gen.eval import gen_cli

            if args.protocol == "stats":
                gen_cli.run_stats(cfg, data_overrides)
            else:
                gen_cli.report(gen_cli.run_gen(cfg, data_overrides))
            return 0
        evaluation = Evaluation(cfg, data_overrides)
        protocols = COMMANDS if args.protocol == "all" else (args.protocol,)
        everything = {}
        for protocol in protocols:
            results = evaluation.run(protocol)
            everything.update({f"{protocol}/{k}": v for k, v in results.items()})
            print(
                format_table(
                    f"{protocol} - {Path(cfg.ckpt).name} on {evaluation.datamodule.registry_name} "
                    f"({cfg.train_split} -> {cfg.eval_split})",
                    results,
                )
            )
            print(f"written: {evaluation.out / (protocol + '.json')}\n")
        where = append_to_run(evaluation.run_dir, everything, "offline_eval") if cfg.wandb else None
        if where:
            print(f"results added to the run's W&B run: {where}")
    except (EvalError, ConfigError) as error:
        print(f"lgen: error: {error}", file=sys.stderr)
        return 2
    return 0


def reconstruction(cfg: EvalConfig, data_overrides: list[str]) -> int:
    """``lgen eval recon``: reconstruction metrics of an autoencoder, printed, written and added to W&B."""
    from lightning_gen.eval import recon
    from lightning_gen.eval.wandb_run import append_to_run, run_dir_of_checkpoint

    started = time.time()
    results, out, data_name = recon.evaluate(cfg, data_overrides)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": "recon",
        "checkpoint": str(cfg.ckpt),
        "data": data_name,
        "split": cfg.recon.split,
        "seconds": round(time.time() - started, 2),
        "config": {k: v for k, v in asdict(cfg).items() if k not in COMMANDS},
        "results": results,
    }
    (out / "recon.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(format_table(f"recon - {Path(cfg.ckpt).name} on {data_name} ({cfg.recon.split})", results))
    print(f"written: {out / 'recon.json'}\n")
    run_dir = run_dir_of_checkpoint(cfg.ckpt) if Path(cfg.ckpt).is_file() else None
    where = (
        append_to_run(run_dir, {f"recon/{k}": v for k, v in results.items()}, "offline_eval")
        if cfg.wandb
        else None
    )
    if where:
        print(f"results added to the run's W&B run: {where}")
    return 0
