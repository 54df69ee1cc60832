"""``lgen eval gen`` and ``lgen eval stats``: a generator's metrics from a checkpoint or from image files,
and reference statistics in the pytorch-fid / clean-fid ``.npz`` layout.

    lgen eval gen ckpt=runs/ddpm_cfg_fashion_mnist/<run>/checkpoints/last.ckpt n=10000 guidance=1
    lgen eval gen fake=samples/ real=fashion_mnist:test data.image_size=28
    lgen eval gen fake=samples.npz real=reference_images/ extractor=inception resize=legacy
    lgen eval gen fake=samples/ real=stats.npz
    lgen eval stats data=fashion_mnist split=test out=stats.npz

``gen``: the samples are ``n`` seeded draws of a checkpoint (``seed``; sampling options ``sampler``,
``steps``, ``guidance``, ``eta``, ``temperature``) or the images of ``fake=DIR|NPZ``; the reference is
``real=`` (a folder, an .npz of images or of statistics, or ``<dataset>:<split>``, at the fakes'
resolution unless ``data.image_size=`` says otherwise), by default the checkpoint's own data, train
split. ``metrics=`` (default: all that the inputs allow, the others listed with the reason),
``extractor=``, ``resize=``, ``cas_classifier=`` and the metrics' settings are those of
``callbacks.fid``. With a dataset's train split as reference, its ``held_out`` split (test) gives
memorisation's threshold and the real-vs-real floor. Results (and their provenance) go to
``<run>/eval/<checkpoint>/gen.json`` (checkpoints; also added to the run's W&B run) or ``out=``
(default ``gen.json`` here).

``stats``: the mean and covariance of a split's features, with the keys that say how they were made.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.eval.extractors import RESIZE_MODES, ExtractorSettings, load_extractor, parse_spec
from lightning_gen.eval.features import Features
from lightning_gen.eval.gen_metrics import MetricSettings, fid_of, gaussian_statistics
from lightning_gen.eval.generator_eval import GeneratorEvaluation, choose_cas_classifier, requested_metrics
from lightning_gen.eval.image_sources import (
    DatasetImages,
    ImageSource,
    Statistics,
    is_dataset_split,
    open_images,
    write_statistics,
)

SAMPLING_OPTIONS = ("sampler", "steps", "guidance", "eta", "temperature")


@dataclass
class GenEvalConfig(ExtractorSettings, MetricSettings):
    fake: str | None = None  # a folder or .npz of generated images, instead of ckpt=
    real: str | None = (
        None  # folder | .npz (images, or mu/sigma) | <dataset>:<split>; default: the checkpoint's data, train
    )
    held_out: str = (
        "test"  # with a dataset's train split as reference: memorisation's threshold and the floor
    )
    n: int = bounded(10000, 2)  # samples drawn from a checkpoint
    batch_size: int = bounded(250, 1)  # images per sample() call and per extractor batch
    extractor: str = "auto"  # as callbacks.fid.extractor; with real=stats.npz: the file's
    resize: str | None = choice(None, *RESIZE_MODES)  # None: clean, or the statistics file's
    cas_classifier: str = "auto"  # as callbacks.fid.cas_classifier
    sampler: str | None = None  # the checkpoint's sampling options, as lgen sample takes them
    steps: int | None = None
    guidance: float | None = None
    eta: float | None = None
    temperature: float | None = None


@dataclass
class StatsConfig(ExtractorSettings):
    split: str = "test"
    n: int = bounded(0, 0)  # the first n images of the split (0: all)
    batch_size: int = bounded(250, 1)
    extractor: str = "auto"  # as callbacks.fid.extractor
    resize: str = choice("clean", *RESIZE_MODES)


def device_of(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def dataset_images(name: str, split: str, image_size: int | None, data_overrides: list[str]):
    """``<dataset>:<split>`` as images (at ``image_size`` unless ``data.image_size=`` is given) and its module."""
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object

    sized = any(o.startswith("data.image_size=") for o in data_overrides)
    overrides = [
        f"data={name}",
        *data_overrides,
        *([] if sized or not image_size else [f"data.image_size={image_size}"]),
    ]
    datamodule = registry.build("data", section_object(compose(overrides).data))
    datamodule.setup()
    return DatasetImages(datamodule, split), datamodule


def features_of(evaluation: GeneratorEvaluation, source: ImageSource, batch_size: int, device) -> Features:
    feats, labels = [], []
    for images, batch_labels in source.batches(batch_size):
        feats.append(evaluation.features(images.float() / 255, device).cpu())
        labels.append(batch_labels if batch_labels is not None else torch.full((len(images),), -1))
    features = torch.cat(feats)
    return Features(features, torch.cat(labels).long(), torch.arange(len(features)))


def known_classes(data_name: str) -> int:
    """The number of classes of one of this project's datasets (0: unknown)."""
    from lightning_gen import registry

    try:
        return int(registry.get("data", data_name).cls.num_classes) if data_name else 0
    except (KeyError, ConfigError):
        return 0


def load_generator(ckpt: str, options: dict):
    from lightning_gen.methods.base import load_method

    try:
        method = load_method(ckpt)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"ckpt={ckpt}: {error}") from error
    if not getattr(method, "is_generative", False):
        raise ConfigError(
            f"{ckpt} is a {method.registry_name} checkpoint, which is not a generator: "
            "lgen eval gen needs a vae, gan, diffusion or pixelcnn checkpoint (or fake=DIR|NPZ)"
        )
    unsupported = sorted(set(options) - set(method.sample_options))
    if unsupported:
        raise ConfigError(
            f"{method.registry_name} does not take sampling option(s) {', '.join(unsupported)}; "
            f"it takes: {', '.join(method.sample_options) or 'none'}"
        )
    return method


def extractor_spec(g: GenEvalConfig, reference) -> tuple[str, str]:
    """(extractor spec, resize mode): the requested ones, or a statistics file's; a mismatch is an error."""
    spec, resize = g.extractor, g.resize
    meta = reference.meta if isinstance(reference, Statistics) else {}
    if meta.get("extractor"):
        if spec != "auto" and parse_spec(spec)[0] != parse_spec(meta["extractor"])[0]:
            raise ConfigError(
                f"{reference.path} holds statistics of the {meta['extractor']} extractor, not {spec}: "
                f"leave extractor= out to use that one, or write statistics with extractor={spec}"
            )
        spec = meta["extractor"] if spec == "auto" else spec
    if meta.get("resize") and resize and resize != meta["resize"]:
        raise ConfigError(
            f"{reference.path} was measured with resize={meta['resize']}, not {resize}: the features would differ"
        )
    return spec, resize or meta.get("resize") or "clean"


def check_statistics(reference: Statistics, extractor, image_size: int) -> None:
    """The statistics file's extractor weights and image size must be the evaluation's."""
    meta, path = reference.meta, reference.path
    sha = meta.get("weights_sha256")
    if sha and sha != extractor.provenance["weights_sha256"]:
        raise ConfigError(
            f"{path} was measured with other {extractor.name} weights (SHA-256 {sha[:12]}..., these are "
            f"{extractor.provenance['weights_sha256'][:12]}...): use the same weights file"
        )
    if len(reference.mu) != extractor.num_features:
        raise ConfigError(
            f"{path} holds {len(reference.mu)}-d statistics; the {extractor.name} extractor gives "
            f"{extractor.num_features}-d features"
        )
    if meta.get("image_size") and int(meta["image_size"]) != image_size:
        raise ConfigError(
            f"{path} was measured on {meta['image_size']} px images; these are {image_size} px: write "
            f"statistics at this resolution (lgen eval stats ... data.image_size={image_size})"
        )


def open_reference(cfg, method, run_dir, image_size: int, data_overrides: list[str]):
    """(reference images or statistics, held-out images or None, the reference's DataModule or None):
    ``real=``, else the checkpoint's own data, train split. A dataset's train split as reference brings
    its ``held_out`` split (memorisation's threshold, the real-vs-real floor)."""
    g = cfg.gen
    datamodule, real_split = None, None
    if g.real is None:
        from lightning_gen.eval.cli import build_data

        if method is None:
            raise ConfigError(
                "fake= images need a reference: real=DIR|NPZ|<dataset>:<split>, e.g. real=fashion_mnist:test"
            )
        datamodule = build_data(cfg, method, run_dir, data_overrides)
        reference, real_split = DatasetImages(datamodule, "train"), "train"
    elif is_dataset_split(g.real):
        name, real_split = g.real.split(":", 1)
        reference, datamodule = dataset_images(name, real_split, image_size, data_overrides)
    else:
        reference = open_images(g.real, "real")
    held_out = None
    if datamodule is not None and real_split == "train" and g.held_out:
        held_out = DatasetImages(datamodule, g.held_out)
    return reference, held_out, datamodule


def run_gen(cfg, data_overrides: list[str]) -> dict:
    """``lgen eval gen``: returns the JSON payload it wrote."""
    from lightning_gen.eval.wandb_run import run_dir_of_checkpoint
    from lightning_gen.methods.base import DataInfo

    g: GenEvalConfig = cfg.gen
    started, device = time.time(), device_of(cfg.device)
    if bool(cfg.ckpt) == bool(g.fake):
        raise ConfigError(
            "lgen eval gen needs ckpt=PATH (samples of a generator) or fake=DIR|NPZ (images), not both"
        )
    options = {k: getattr(g, k) for k in SAMPLING_OPTIONS if getattr(g, k) is not None}
    if options and not cfg.ckpt:
        raise ConfigError(f"sampling options ({', '.join(options)}) apply to ckpt=, not to fake= images")
    method, fake, run_dir = None, None, None
    if cfg.ckpt:
        method = load_generator(cfg.ckpt, options)
        run_dir = run_dir_of_checkpoint(cfg.ckpt)
        image_size, num_fake, fake_name = method.data_info.image_size, g.n, f"{g.n} samples of {cfg.ckpt}"
        conditional = getattr(method, "conditional", False)
    else:
        fake = open_images(g.fake, "fake")
        if isinstance(fake, Statistics):
            raise ConfigError(f"fake={g.fake} holds statistics (mu, sigma): fake= takes images")
        image_size, num_fake, fake_name = fake.image_size, len(fake), fake.description
        conditional = fake.labels is not None

    reference, held_out, datamodule = open_reference(cfg, method, run_dir, image_size, data_overrides)
    if method is not None:
        info = method.data_info
    else:  # what the images are of: data=, the reference dataset, or the statistics file's data
        data_name = cfg.data or (datamodule.info.name if datamodule is not None else "")
        if not data_name and isinstance(reference, Statistics):
            data_name = str(reference.meta.get("data", ""))
        classes = datamodule.info.num_classes if datamodule is not None else known_classes(data_name)
        info = DataInfo(
            name=data_name, image_size=fake.image_size, channels=fake.channels, num_classes=classes
        )
    data_name = info.name

    spec, resize = extractor_spec(g, reference)
    settings = ExtractorSettings.of(g, resize=resize)
    root = getattr(datamodule.cfg, "root", None) if datamodule is not None else None
    extractor, _ = load_extractor(spec, info, settings, data_root=root)
    statistics = isinstance(reference, Statistics)
    if statistics:
        check_statistics(reference, extractor, info.image_size)

    metric_cfg = SimpleNamespace(
        **{k: v for k, v in asdict(g).items() if k not in ("resize",)},
        resize=resize,
        antialias=None,
        kid=None,
        num_samples=num_fake,
        seed=cfg.seed,
        real_split="train" if held_out is not None else "",
        floor_split=g.held_out if held_out is not None else "",
    )
    evaluation = GeneratorEvaluation(metric_cfg, requested_metrics(g, "metrics=", require_fid=False))
    evaluation.log_name = "eval gen"
    evaluation.held_out_note = (
        "a dataset's train split as the reference (real=<dataset>:train, or a checkpoint's own data)"
    )
    evaluation.where = "metrics="
    classifier = None
    if conditional:
        load = lambda s: load_extractor(s, info, settings, data_root=root)[0]  # noqa: E731
        classifier = choose_cas_classifier(g.cas_classifier, info, extractor, load)
    evaluation.use_extractor(extractor, conditional=conditional, classifier=classifier, real=not statistics)
    evaluation.data_name, evaluation.image_size = data_name, info.image_size
    evaluation.reference_name = getattr(reference, "name", None) or str(
        getattr(reference, "path", "") or g.real
    )
    evaluation.held_out_name = held_out.name if held_out is not None else ""
    evaluation.fit_counts(len(reference) or None)

    print(
        f"[eval gen] {fake_name} vs {getattr(reference, 'description', '') or reference.path}, {extractor.name} features"
    )
    results, floor = {}, None
    if statistics:
        evaluation.set_reference_statistics(reference.mu, reference.sigma, len(reference) or None, device)
    else:
        real = features_of(evaluation, reference, g.batch_size, device)
        kept = features_of(evaluation, held_out, g.batch_size, device) if held_out is not None else None
        evaluation.set_reference(real, device, kept if evaluation.needs_held_out else None)
        if kept is not None:
            floor = fid_of(real.features, kept.features)
    if method is not None:
        method.to(device)
        generated = evaluation.generate(method, **options)
    else:
        generated = evaluation.image_outputs(fake.batches(g.batch_size), device)
    results = evaluation.compute_metrics(generated, device)
    if floor is not None:
        results[f"fid_{extractor.name}_floor"] = floor
    provenance = evaluation.provenance()
    payload = {
        "protocol": "gen",
        "checkpoint": str(cfg.ckpt) if cfg.ckpt else None,
        "fake": g.fake,
        "real": g.real or evaluation.reference_name,
        "seconds": round(time.time() - started, 2),
        "metrics": evaluation.metric_names,
        "skipped": evaluation.skipped,
        "provenance": provenance,
        "sampling_options": options,
        "results": results,
    }
    if cfg.out:
        out = Path(cfg.out)
    elif run_dir is not None:
        out = run_dir / "eval" / Path(cfg.ckpt).stem
    else:
        out = Path(cfg.ckpt).resolve().parent / "eval" if cfg.ckpt else Path(".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gen.json").write_text(json.dumps(payload, indent=2) + "\n")
    payload["written"] = str(out / "gen.json")
    payload["run_dir"] = run_dir
    return payload


def run_stats(cfg, data_overrides: list[str]) -> Path:
    """``lgen eval stats``: writes the statistics file and returns its path."""
    s: StatsConfig = cfg.stats
    if not cfg.data:
        raise ConfigError(
            "lgen eval stats needs data=NAME (e.g. data=fashion_mnist) and split=, out=FILE.npz"
        )
    if not cfg.out or not str(cfg.out).endswith(".npz"):
        raise ConfigError(f"lgen eval stats needs out=FILE.npz (got {cfg.out!r})")
    device = device_of(cfg.device)
    source, datamodule = dataset_images(cfg.data, s.split, None, data_overrides)
    info = datamodule.info
    extractor, provenance = load_extractor(
        s.extractor, info, ExtractorSettings.of(s), data_root=getattr(datamodule.cfg, "root", None)
    )
    extractor.to(device)
    features = []
    for images, _ in source.batches(s.batch_size):
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            features.append(extractor(images.to(device).float() / 255).double().cpu())
        if s.n and sum(map(len, features)) >= s.n:
            break
    features = torch.cat(features)[: s.n or None]
    mu, sigma = gaussian_statistics(features)
    spec = s.extractor if s.extractor != "auto" else extractor.provenance["extractor"]
    meta = {
        "extractor": spec,
        "weights_sha256": provenance["weights_sha256"],
        "resize": provenance["resize"],
        "image_size": info.image_size,
        "n": len(features),
        "data": info.name,
        "split": s.split,
    }
    out = write_statistics(Path(cfg.out), mu, sigma, meta)
    print(
        f"[eval stats] {info.name}:{s.split} ({len(features)} images, {info.image_size} px), "
        f"{extractor.name} features ({extractor.num_features}-d, resize {provenance['resize']}) -> {out}"
    )
    return out


def report(payload: dict) -> None:
    """Print the results table and add them (with their provenance) to the checkpoint's W&B run."""
    from lightning_gen.eval.cli import format_table
    from lightning_gen.eval.wandb_run import append_to_run

    print(
        format_table(
            f"gen - {payload['checkpoint'] or payload['fake']} vs {payload['real']}", payload["results"]
        )
    )
    for metric, why in payload["skipped"].items():
        print(f"  {metric}: not computed, {why}")
    print(f"written: {payload['written']}\n")
    prov = payload["provenance"]
    summary = {f"provenance_{prov['name']}/{k}": v for k, v in prov.items() if not isinstance(v, dict)}
    where = (
        append_to_run(payload["run_dir"], payload["results"], "offline_eval/gen", summary)
        if payload["run_dir"]
        else None
    )
    if where:
        print(f"results added to the run's W&B run: {where}")
