"""Metrics of a generator's samples without a Trainer: the machinery the FID callback and ``lgen eval gen`` share.

``GeneratorEvaluation`` holds a feature extractor (``eval/extractors.py``), an optional classifier for
CAS and the metrics (``eval/gen_metrics.py``) that they and the model allow. It generates its share
of seeded samples (``eval/seeded_sampling.py``: the same samples for any world size and batch size),
turns them into features, class logits and classifier logits, and computes every metric against
the real references, synced over ranks when torch.distributed is initialised. ``cfg`` is any object
with the fields of ``callbacks.fid.FIDConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_gen.config import ConfigError
from lightning_gen.eval.extractor_backbones import BareBackbone, DomainBackbone
from lightning_gen.eval.extractors import DOMAIN_DATASETS, ExtractorSettings, FeatureExtractor
from lightning_gen.eval.features import Features, sharded_features
from lightning_gen.eval.fid_extractor import DomainFeatureNet
from lightning_gen.eval.gen_metrics import (
    Inputs,
    MetricSettings,
    build_metrics,
    check_counts,
    check_metric_names,
    select_metrics,
)
from lightning_gen.eval.seeded_sampling import call_ranges, calls_per_rank, seeded_samples
from lightning_gen.sharding import is_sharded


def requested_metrics(
    cfg: Any, where: str = "callbacks.fid.metrics", require_fid: bool = True
) -> list[str] | None:
    """``cfg.metrics`` checked (None: all the inputs allow), with the older ``kid`` key applied to a list.
    The callback requires fid in a list: it chooses the best checkpoint."""
    if cfg.metrics is None:
        return None
    names = check_metric_names(list(cfg.metrics), where)
    kid = getattr(cfg, "kid", None)  # the callback's older key
    if kid is False:
        names = [n for n in names if n != "kid"]
    elif kid and "kid" not in names:
        names.append("kid")
    if require_fid and "fid" not in names:
        raise ConfigError(
            f"callbacks.fid.metrics={names} leaves out fid, which chooses the best checkpoint; "
            f"add it, e.g. callbacks.fid.metrics=[fid,{','.join(names) or 'kid'}]"
        )
    return names


def extractor_settings(cfg: Any) -> ExtractorSettings:
    """The extractor settings of ``cfg``, the older ``antialias`` key applied."""
    resize = cfg.resize if cfg.antialias is None else ("antialias" if cfg.antialias else "legacy")
    return ExtractorSettings.of(cfg, resize=resize)


def choose_cas_classifier(spec: str, data_info, extractor: FeatureExtractor, load) -> FeatureExtractor | None:
    """CAS's classifier for a conditional model on ``data_info``: ``none``; ``auto`` = the extractor's
    head when it classifies the data's classes, else the domain extractor on digits/MNIST/Fashion-MNIST
    (else none); or the extractor ``load(spec)`` returns, which must classify the data's classes."""
    if spec == "none":
        return None
    if spec == "auto":
        if extractor.num_classes == data_info.num_classes:
            return extractor
        if data_info.name not in DOMAIN_DATASETS:
            return None
        spec = "domain"
    classifier = load(spec)
    if classifier.num_classes != data_info.num_classes:
        raise ConfigError(
            f"cas_classifier={spec} classifies {classifier.num_classes} classes; "
            f"{data_info.name or 'the data'} has {data_info.num_classes}"
        )
    return classifier


DEFAULTS = MetricSettings()


def counts_fit(name: str, settings: Any, num_fake: int, num_real: int | None) -> bool:
    try:
        check_counts([name], settings, num_fake, num_real)
    except ConfigError:
        return False
    return True


@dataclass
class Generated:
    """What a rank's share of samples gives the metrics, in sample order."""

    features: torch.Tensor  # (n, D) float64
    labels: torch.Tensor | None  # requested classes (None: unconditional)
    logits: torch.Tensor | None  # the extractor's class logits, when a metric needs them
    classifier_logits: torch.Tensor | None  # CAS's classifier, when a metric needs it


class GeneratorEvaluation:
    """Extractor, classifier and metrics of one evaluation setting; references set once, samples measured often."""

    def __init__(self, cfg: Any, requested: list[str] | None):
        self.cfg, self.requested = cfg, requested
        self.settings = extractor_settings(cfg)
        self.metric_names: list[str] = []
        self.skipped: dict[str, str] = {}
        self.metrics = []
        self.extractor: FeatureExtractor | None = None
        self.classifier: FeatureExtractor | None = None  # CAS's; may be the extractor itself
        self.name = ""
        self.extractor_id = ""
        self.real: Features | None = None
        self.held_out: Features | None = None
        self.data_name, self.image_size = "", 0  # of the generated images, for the provenance
        self.reference_name = self.held_out_name = ""  # e.g. fashion_mnist:train (provenance)

    @property
    def needs_held_out(self) -> bool:
        return any(m.needs_held_out for m in self.metrics)

    def has_held_out(self) -> bool:
        """Memorisation compares with the training images, its threshold with held-out ones."""
        return bool(self.cfg.floor_split) and self.cfg.real_split == "train"

    held_out_note = "callbacks.fid.real_split must be train and floor_split a held-out split"
    real_note = ""

    def use_extractor(
        self,
        extractor,
        name: str | None = None,
        extractor_id: str | None = None,
        conditional: bool = False,
        classifier: FeatureExtractor | None = None,
        real: bool = True,
    ) -> None:
        """Measure with ``extractor`` (a FeatureExtractor, or a bare domain network, as tests pass),
        named ``name`` in the metric keys; choose the metrics it, the model and the reference allow
        (``real`` False: a reference of mean and covariance only)."""
        if not isinstance(extractor, FeatureExtractor):  # a network in memory (tests): no weights file
            kind = "domain" if isinstance(extractor, DomainFeatureNet) else "module"
            backbone = DomainBackbone(extractor) if kind == "domain" else BareBackbone(extractor)
            provenance = {"extractor": kind, "name": name, "weights": None, "weights_sha256": None}
            extractor = FeatureExtractor(backbone, self.settings.resize, provenance)
        self.extractor, self.classifier = extractor, classifier
        self.name = name or extractor.name
        sha = extractor.provenance.get("weights_sha256") or "memory"
        self.extractor_id = extractor_id or f"{self.name}-{sha[:10]}-{extractor.resize}"
        inputs = Inputs(
            real=real,
            held_out=self.has_held_out(),
            logits=extractor.num_classes > 0,
            classifier=classifier is not None,
            conditional=conditional,
            notes={"held_out": self.held_out_note, "real": self.real_note},
        )
        names, skipped = select_metrics(self.requested, inputs, self.where)
        if self.requested is None and self.cfg.kid is False:
            names = [n for n in names if n != "kid"]
        self.metric_names, self.skipped = names, skipped
        self.metrics = build_metrics(
            names, self.cfg, extractor.num_features, self.cfg.num_samples, self.cfg.seed
        )
        self.fit_counts(None)
        self.real = self.held_out = None  # references are (re)loaded in these features next time
        for metric, why in skipped.items():
            rank_zero_info(f"[{self.log_name}] {metric} left out: {why}")

    log_name = "fid"  # in messages: [fid] ..., and the settings' name
    where = "callbacks.fid.metrics"

    def fit_counts(self, num_real: int | None) -> None:
        """Sample counts a metric cannot work with: an error for a listed metric, or for one whose own
        settings (kid_subset_size, prdc_k, ...) ask for more than there is; a metric that came with
        "all the inputs allow" and that even its default settings cannot run on so few images is left
        out instead, with the reason."""
        if self.requested is not None:
            check_counts(self.metric_names, self.cfg, self.cfg.num_samples, num_real)
            return
        for metric in list(self.metrics):
            try:
                check_counts([metric.name], self.cfg, self.cfg.num_samples, num_real)
            except ConfigError as error:
                if counts_fit(metric.name, DEFAULTS, self.cfg.num_samples, num_real):
                    raise  # the metric's settings, not the number of images, are at fault
                self.metrics.remove(metric)
                self.metric_names.remove(metric.name)
                self.skipped[metric.name] = str(error)
                rank_zero_info(f"[{self.log_name}] {metric.name} left out: {error}")

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, device, logits: bool = False, classifier: bool = False):
        """(features float64, extractor logits or None, classifier logits or None) of float images in
        [0, 1] on ``device``, in float32 whatever the autocast."""
        self.extractor.to(device)
        if classifier and self.classifier is not None:
            self.classifier.to(device)
        feats, heads, judged = [], [], []
        with torch.autocast(torch.device(device).type, enabled=False):
            for x in images.split(250):
                x = x.to(device).float()
                features, head = (
                    self.extractor.features_and_logits(x) if logits else (self.extractor(x), None)
                )
                feats.append(features.double())
                heads.append(head)
                if classifier:
                    same = self.classifier is self.extractor and head is not None
                    judged.append(head if same else self.classifier.logits(x))
        return (
            torch.cat(feats),
            torch.cat(heads).double() if logits else None,
            torch.cat(judged).double() if classifier else None,
        )

    def features(self, images: torch.Tensor, device) -> torch.Tensor:
        """Extractor features (float64, on ``device``) of float images in [0, 1]."""
        return self.outputs(images, device)[0]

    def extract(self, loader, device) -> Features:
        """Features of every image of ``loader``'s dataset (uint8 batches), on the CPU: each rank
        extracts its shard and every rank receives all of them, in index order."""
        return sharded_features(lambda x: self.features(x.float() / 255, device), loader, device).to("cpu")

    def set_reference(self, real: Features, device, held_out: Features | None = None) -> None:
        """The real features every metric compares with (the same full sets on every rank)."""
        self.real, self.held_out = real, held_out
        labels = real.labels if bool((real.labels >= 0).any()) else None
        self.fit_counts(len(real))
        for metric in self.metrics:
            metric.to(device)
            metric.set_reference(real.features, labels, held_out.features if held_out is not None else None)

    def set_reference_statistics(self, mu: torch.Tensor, sigma: torch.Tensor, count: int, device) -> None:
        """A reference of mean and covariance only (an .npz): FID uses it; IS and CAS need none."""
        self.real_count = count
        for metric in self.metrics:
            metric.to(device)
            if hasattr(metric, "set_reference_statistics"):
                metric.set_reference_statistics(mu, sigma)
            else:
                metric.set_reference(None)

    real_count: int | None = None  # the reference's size when it is statistics only

    @property
    def wants(self) -> tuple[bool, bool]:
        """(extractor logits, classifier logits): whether any metric needs them."""
        return any(m.needs_logits for m in self.metrics), any(m.needs_classifier for m in self.metrics)

    def generate(self, module: L.LightningModule, world_size: int = 1, rank: int = 0, **options) -> Generated:
        """What this rank's share of the samples gives the metrics, in sample order (``options``: the
        model's sampling options, e.g. guidance)."""
        logits, classifier = self.wants
        parts, asked = [], []
        was_training = module.training
        module.eval()
        with torch.autocast(module.device.type, enabled=False):
            calls = call_ranges(self.cfg.num_samples, self.cfg.batch_size, world_size, rank)
            for indices in calls:
                images, labels = seeded_samples(module, indices, self.cfg.seed, **options)
                parts.append(self.outputs(images, module.device, logits, classifier))
                asked.append(labels)
            if is_sharded(module):  # each sample() call is a collective (trainer.strategy=fsdp): a rank
                # with fewer calls joins the others' last ones with calls whose samples it drops
                for _ in range(
                    calls_per_rank(self.cfg.num_samples, self.cfg.batch_size, world_size) - len(calls)
                ):
                    module.sample(1, generator=torch.Generator(module.device).manual_seed(self.cfg.seed))
        module.train(was_training)
        conditional = getattr(module, "conditional", False)
        if not parts:  # fewer samples than ranks: an empty share still joins the metrics' sync
            device = module.device
            empty = torch.zeros(0, self.extractor.num_features, dtype=torch.float64, device=device)
            classes = torch.zeros(0, dtype=torch.long, device=device) if conditional else None
            head = torch.zeros(0, self.extractor.num_classes, dtype=torch.float64, device=device)
            judge = torch.zeros(
                0, getattr(self.classifier, "num_classes", 0), dtype=torch.float64, device=device
            )
            return Generated(empty, classes, head if logits else None, judge if classifier else None)
        features, heads, judged = zip(*parts)
        return Generated(
            torch.cat(features),
            None if asked[0] is None else torch.cat(asked),
            torch.cat(heads) if logits else None,
            torch.cat(judged) if classifier else None,
        )

    def generate_features(
        self, module: L.LightningModule, world_size: int = 1, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (float64) of this rank's share of the samples, in sample order, and the classes
        they were asked for (None for an unconditional model)."""
        generated = self.generate(module, world_size, rank)
        return generated.features, generated.labels

    def image_outputs(self, batches, device) -> Generated:
        """What images (uint8 batches with their labels or None) give the metrics, in order."""
        logits, classifier = self.wants
        parts, labels = [], []
        for images, batch_labels in batches:
            parts.append(self.outputs(images.float() / 255, device, logits, classifier))
            labels.append(batch_labels)
        features, heads, judged = zip(*parts)
        return Generated(
            torch.cat(features),
            None if labels[0] is None else torch.cat(labels).to(device),
            torch.cat(heads) if logits else None,
            torch.cat(judged) if classifier else None,
        )

    def compute_metrics(self, generated: Generated, device, prefix: str = "") -> dict[str, float]:
        """Every metric of ``generated`` (this rank's share) against the reference, keyed
        ``<prefix><metric>_<extractor><suffix>``; a collective under torch.distributed."""
        results = {}
        with torch.autocast(torch.device(device).type, enabled=False):
            for metric in self.metrics:
                metric.to(device)
                metric.update(
                    generated.features, generated.labels, generated.logits, generated.classifier_logits
                )
                computed = metric.compute()
                metric.reset()
                results.update(
                    {f"{prefix}{stem}_{self.name}{suffix}": v for (stem, suffix), v in computed.items()}
                )
        return results

    def measure(self, module: L.LightningModule, world_size: int = 1, rank: int = 0) -> dict[str, float]:
        """Every metric of this rank's share of generated samples against the reference; a collective
        under torch.distributed (every rank calls it), the same values on every rank."""
        return self.compute_metrics(self.generate(module, world_size, rank), module.device, "val/")

    def provenance(self) -> dict:
        """What the numbers were measured with: the extractor's provenance and the evaluation's."""
        classifier = None
        if self.classifier is not None:
            classifier = (
                "the extractor's head" if self.classifier is self.extractor else self.classifier.provenance
            )
        return {
            **self.extractor.provenance,
            "image_size": self.image_size or None,
            "num_fake": self.cfg.num_samples,
            "num_real": len(self.real) if self.real is not None else self.real_count,
            "reference": self.reference_name,
            "held_out": self.held_out_name if self.held_out is not None else None,
            "seed": self.cfg.seed,
            "cas_classifier": classifier,
        }
