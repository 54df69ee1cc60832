"""Metrics of a generator while it trains (FID, KID, IS, precision/recall, density/coverage,
memorisation; per-class FID and CAS for class-conditional models), on its EMA weights.

Every ``every_n_epochs`` validation epochs the callback generates ``num_samples`` images and
computes each metric named in ``metrics`` (None: all that the extractor and the model allow) from
their features:

- **The same samples for any number of processes and any batch size.** Sample i's noise comes from
  a generator seeded by (``seed``, i // 16): one per small fixed chunk of sample indices
  (``lightning_gen.eval.seeded_sampling``), and a conditional model is asked for class i mod C.
- **Balanced.** Rank r of W generates the contiguous samples ``[N r / W, N (r + 1) / W)`` (N / W
  each, rounded), in the same number of calls of at most ``batch_size`` on every rank; no
  rank is idle and none is left without work to sync (a rank with no sample contributes an empty
  share).
- **Metrics** (``lightning_gen.eval.gen_metrics``, a registry: the interface is documented there)
  receive the real features once and each rank's generated features, class logits and requested
  classes; they sync over ranks like torchmetrics metrics, in float64: FID from summed statistics
  (equal to one process's up to the order of float64 sums), the others from the features gathered
  in sample order (one process's values). Nothing draws from the training streams. ``kid: false``
  (the older key) removes kid from the list.

Real features are extracted once, by every rank on its shard of the split (gathered, padding
dropped), cached on disk under a key of dataset config / split / extractor (name, weights hash,
resize mode) / resolution, and loaded from there on later evaluations, later runs and resumes.

Feature extractors (``extractor``; ``lightning_gen.eval.extractors``), named in the metric keys so
numbers are never confused: ``val/fid_<data>`` for the domain classifier (the default on
digits/MNIST/Fashion-MNIST, built on first use and cached per user; global rank 0 loads or builds it
and every rank receives rank 0's copy), ``val/fid_inception``, ``val/fid_dinov2``, ``val/fid_ckpt``,
``val/fid_timm_<model>`` for networks read from local files (every rank reads its own; the runs
stops if their SHA-256 differ). Images are quantised to 8 bits and resized to the network's input as
``resize`` says (``legacy``, ``clean``, ``antialias``; the older ``antialias`` key picks antialias /
legacy). What every number was measured with (extractor, weights SHA-256, resize mode, image size,
sample and real counts, reference split, seed) goes with it into ``<run>/fid/epochNNN.json`` and the
W&B summary (``val/provenance_<extractor>/<field>``).

The real-vs-real floor (FID of ``real_split`` against the held-out ``floor_split``) is logged once
as ``val/fid_<name>_floor``: no generator can be expected to go below it at that sample count. The
held-out split is also memorisation's reference (the 5th percentile of its distances to the training
images), so ``memorization`` needs ``real_split: train`` and a ``floor_split``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.eval.extractors import (
    DOMAIN_DATASETS,  # noqa: F401  (re-exported: eval/recon.py and older imports)
    RESIZE_MODES,
    ExtractorSettings,
    FeatureExtractor,
    check_extractor,
    domain_extractor,
    domain_extractor_file,
    extractor_name,
    load_extractor,
    resolved_kind,
)
from lightning_gen.eval.features import Features
from lightning_gen.eval.gen_metrics import (
    Inputs,
    MetricSettings,
    check_counts,
    fid_of,
    generative_metrics,
    select_metrics,
)
from lightning_gen.eval.generator_eval import GeneratorEvaluation, choose_cas_classifier, requested_metrics
from lightning_gen.methods.base import DataInfo
from lightning_gen.randomness import isolated
from lightning_gen.registry import register_callback

metric_names = requested_metrics  # the older name


@dataclass
class FIDConfig(CallbackConfig, ExtractorSettings, MetricSettings):
    every_n_epochs: int = 5
    num_samples: int = bounded(1000, 2)  # generated images per evaluation, over all ranks (N / W each)
    batch_size: int = bounded(250, 1)  # at most this many images per sample() call on one rank
    # metrics (inherited, lightning_gen.eval.gen_metrics.MetricSettings): None = all the inputs allow;
    # a list must contain fid, which chooses the best checkpoint
    # auto (domain on digits/MNIST/Fashion-MNIST, else inception) | inception | domain | dinov2 |
    # ckpt:<path> | timm:<name>@<weights file>   (lightning_gen.eval.extractors)
    extractor: str = "auto"
    resize: str = choice(
        "clean", *RESIZE_MODES
    )  # 8-bit quantisation, then legacy (TF1 bilinear) / clean (PIL bicubic) / antialias
    antialias: bool | None = None  # older key: true = resize antialias, false = resize legacy
    # CAS's classifier for class-conditional models: auto (the extractor's head when it classifies the
    # data's classes, else the domain extractor on digits/MNIST/Fashion-MNIST), none, or a spec with a head
    cas_classifier: str = "auto"
    real_split: str = "train"
    floor_split: str = (
        "test"  # held-out real images: the real-vs-real floor and memorisation ("" to skip both)
    )
    kid: bool | None = None  # older key, superseded by metrics: false removes kid, true adds it
    cache_dir: str | None = None  # default <runs_dir>/fid_cache, shared by runs
    seed: int = (
        1234  # the generated samples, KID's subsets, PRDC's real draw; the same for any number of processes
    )


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D) on this process (``fake``: this rank's share when distributed)."""
    return generative_metrics(real, fake, ["fid"])[("fid", "")]


def fid_kid_from_shards(
    real: torch.Tensor,
    fake: torch.Tensor,
    device,
    kid: bool = True,
    kid_subsets: int = 50,
    kid_subset_size: int | None = None,
    seed: int = FIDConfig.seed,
) -> dict[tuple[str, str], float]:
    """FID (and KID) of ``fake`` (this rank's share, in sample order) against ``real`` (the whole
    reference, the same on every rank), synced over ranks when distributed."""
    settings = MetricSettings(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    return generative_metrics(real, fake, ["fid", "kid"] if kid else ["fid"], settings, device, seed)


def InceptionFeatures(weights_path: str, antialias: bool | None = True) -> FeatureExtractor:  # noqa: N802
    """The older constructor of the FID InceptionV3 extractor (float images in [0, 1] -> pool3):
    ``antialias`` true is resize antialias, false legacy, None the default (clean). New code:
    ``eval.extractors.load_extractor("inception", data_info, settings)``."""
    resize = "clean" if antialias is None else ("antialias" if antialias else "legacy")
    settings = ExtractorSettings(inception_path=str(weights_path), resize=resize)
    return load_extractor("inception", DataInfo(name="", image_size=299, channels=3), settings)[0]


@register_callback("fid", FIDConfig)
class FID(L.Callback, GeneratorEvaluation):
    """FID, KID, IS, PRDC, memorisation (``metrics``) of EMA samples every N epochs, real features cached."""

    def __init__(self, cfg: FIDConfig, run_dir: Path):
        # config errors before anything is created
        GeneratorEvaluation.__init__(self, cfg, requested_metrics(cfg))
        self.run_dir = Path(run_dir)
        self.floor: float | None = None
        self.cache_key: str | None = None
        self.last: dict[str, float] = {}
        self.real_source = ""  # "computed" or "cache": how the real features of this process were obtained

    def metric_name(self, data_name: str) -> str:
        """The FID metric this callback logs for a dataset: ``val/fid_<extractor name>``."""
        return f"val/fid_{extractor_name(self.cfg.extractor, data_name)}"

    # ------------------------------------------------------------------ setup
    def preflight(self, module: L.LightningModule) -> str:
        """Checks made before a run creates anything (``run.preflight``) and again in ``setup``: a
        generator, the extractors' files, metrics the model and extractor allow, sample counts.
        Returns the extractor kind."""
        if not getattr(module, "is_generative", False):
            raise ConfigError(
                f"callbacks.fid needs a generator; method {module.registry_name!r} cannot sample. "
                "Disable it with callbacks.fid.enabled=false"
            )
        data = module.data_info
        kind = check_extractor(self.cfg.extractor, data, self.settings)
        if self.cfg.cas_classifier not in ("auto", "none"):
            check_extractor(self.cfg.cas_classifier, data, self.settings)
        if self.requested is not None:
            conditional = getattr(module, "conditional", False)
            inputs = Inputs(  # a timm or ckpt extractor's head, and CAS's classifier, are known once loaded
                held_out=self.has_held_out(),
                logits=kind != "dinov2",
                classifier=self.cfg.cas_classifier != "none",
                conditional=conditional,
            )
            select_metrics(self.requested, inputs)
            check_counts(self.requested, self.cfg, self.cfg.num_samples, None)
        return kind

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        kind = self.preflight(module)
        data = module.data_info
        if kind == "domain":
            extractor = self.domain_extractor(trainer, data)
        else:
            extractor, _ = load_extractor(self.cfg.extractor, data, self.settings)
            self.same_on_every_rank(trainer, extractor)
        conditional = getattr(module, "conditional", False)
        classifier = None
        if conditional:
            load = lambda spec: self.load_classifier(trainer, data, spec)  # noqa: E731
            classifier = choose_cas_classifier(self.cfg.cas_classifier, data, extractor, load)
        self.use_extractor(extractor, conditional=conditional, classifier=classifier)
        self.data_name, self.image_size = data.name, data.image_size
        self.reference_name = f"{data.name}:{self.cfg.real_split}"
        self.held_out_name = f"{data.name}:{self.cfg.floor_split}"

    def load_classifier(self, trainer: L.Trainer, data, spec: str) -> FeatureExtractor:
        """CAS's classifier named by ``spec``: the domain one from rank 0, others from each rank's file."""
        if resolved_kind(spec, data.name) == "domain":
            return self.domain_extractor(trainer, data)
        classifier, _ = load_extractor(spec, data, self.settings)
        self.same_on_every_rank(trainer, classifier)
        return classifier

    def domain_extractor(self, trainer: L.Trainer, data) -> FeatureExtractor:
        """The domain extractor: loaded, or first built, by global rank 0 and sent to every rank."""
        from lightning_gen.eval.extractors import sha256_of
        from lightning_gen.eval.fid_extractor import ensure_extractor

        path = domain_extractor_file(data, self.settings)
        loaded = None
        if trainer.is_global_zero:
            if not self.settings.domain_extractor_path:
                root = getattr(trainer.datamodule.cfg, "root", None) if trainer.datamodule else None
                ensure_extractor(
                    data.name, data.image_size, path, [f"data.root={root}"] if root else [], rank_zero_info
                )
            loaded = (torch.load(path, map_location="cpu", weights_only=False), sha256_of(path))
        blob, sha256 = trainer.strategy.broadcast(loaded, src=0)
        return domain_extractor(blob, path, sha256, self.settings.resize)

    @staticmethod
    def same_on_every_rank(trainer: L.Trainer, extractor: FeatureExtractor) -> None:
        """Every rank read its own weights file: stop on every rank if one differs from rank 0's."""
        mine = extractor.provenance["weights_sha256"]
        first = trainer.strategy.broadcast(mine, src=0)
        if not trainer.strategy.reduce_boolean_decision(mine == first, all=True):
            raise ConfigError(
                f"the {extractor.name} extractor's weights ({extractor.provenance['weights']}) differ between "
                "ranks: give every node the same file"
            )

    def cache_path(self, trainer: L.Trainer, split: str) -> tuple[Path, str]:
        dm_cfg = trainer.datamodule.cfg
        dm = asdict(dm_cfg) if is_dataclass(dm_cfg) else dict(dm_cfg)
        for volatile in ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "download", "root"):
            dm.pop(volatile, None)
        size = trainer.lightning_module.data_info.image_size
        key = json.dumps(
            {"data": dm, "split": split, "extractor": self.extractor_id, "resolution": size}, sort_keys=True
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        folder = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.run_dir.parent.parent / "fid_cache"
        return folder / f"{dm_cfg.name}_{split}_{self.extractor_id}_{size}px_{digest}.pt", key

    @torch.no_grad()
    def real_features(self, trainer: L.Trainer, module: L.LightningModule, split: str) -> Features:
        """Features of a real split: from the cache file, or computed by every rank on its shard
        (gathered, so each rank holds them all), cached by rank 0."""
        path, key = self.cache_path(trainer, split)
        # rank 0's answer for all: every rank joins the (collective) extraction, or none does
        cached = trainer.strategy.broadcast(path.is_file(), src=0)
        if cached:
            blob = torch.load(path, map_location="cpu", weights_only=False)
            if blob.get("key") != key:
                raise RuntimeError(
                    f"FID cache {path} holds features for another setting; delete it to recompute"
                )
            labels = blob.get("labels")
            n = len(blob["features"])
            real = Features(
                blob["features"], labels if labels is not None else torch.full((n,), -1), torch.arange(n)
            )
        else:
            real = self.extract(trainer.datamodule.eval_dataloader(split), module.device)
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                torch.save({"key": key, "features": real.features, "labels": real.labels}, tmp)
                tmp.replace(path)
        if split == self.cfg.real_split:
            self.real_source, self.cache_key = ("cache" if cached else "computed"), key
        rank_zero_info(
            f"[fid] real features of {split!r} ({len(real)} images): "
            f"{'loaded from cache' if cached else 'computed and cached at'} {path}"
        )
        return real

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.cfg.every_n_epochs:
            return
        with isolated():  # belt and braces: sampling and KID draw only from their own seeded generators
            self.evaluate(trainer, module)

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        if self.real is None:
            real = self.real_features(trainer, module, self.cfg.real_split)
            wants_floor = self.floor is None and self.cfg.floor_split
            held_out = (
                self.real_features(trainer, module, self.cfg.floor_split)
                if wants_floor or self.needs_held_out
                else None
            )
            self.set_reference(real, module.device, held_out)
        results = self.measure(module, trainer.world_size, trainer.global_rank)
        if self.floor is None and self.held_out is not None:
            # every rank holds both sets: no sync
            self.floor = fid_of(self.real.features, self.held_out.features)
            results[f"val/fid_{self.name}_floor"] = self.floor
            rank_zero_info(
                f"[fid] real-vs-real floor ({self.cfg.real_split} {len(self.real)} vs {self.cfg.floor_split} "
                f"{len(self.held_out)} images): {self.floor:.3f}"
            )
            if not self.needs_held_out:
                self.held_out = None
        for name, value in results.items():  # equal on every rank: logged as is
            module.log(name, value, sync_dist=False, rank_zero_only=False)
        if trainer.is_global_zero:
            self.write_results(trainer, results)
            self.log_provenance(trainer)
        rank_zero_info(
            f"[fid] epoch {trainer.current_epoch} ({self.cfg.num_samples} samples over {trainer.world_size} "
            f"process(es) vs {len(self.real)} real): " + " ".join(f"{k}={v:.4f}" for k, v in results.items())
        )
        self.last = results
        return results

    def log_provenance(self, trainer: L.Trainer) -> None:
        """The provenance in the W&B summary: ``val/provenance_<extractor>/<field>``."""
        from lightning.pytorch.loggers import WandbLogger

        flat = {}
        for key, value in self.provenance().items():
            if isinstance(value, dict):
                flat.update({f"{key}_{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(
                    {f"val/provenance_{self.name}/{k}": v for k, v in flat.items()}
                )

    def write_results(self, trainer: L.Trainer, results: dict[str, float]) -> Path:
        """``<run>/fid/epochNNN.json``: the values at full precision (the logged ones are float32),
        with what they were measured on."""
        path = self.run_dir / "fid" / f"epoch{trainer.current_epoch:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "results": results,
            "metrics": self.metric_names,
            "skipped": self.skipped,
            "provenance": self.provenance(),
            "extractor": self.extractor_id,
            "num_samples": self.cfg.num_samples,
            "real_split": self.cfg.real_split,
            "num_real": len(self.real),
            "seed": self.cfg.seed,
            "world_size": trainer.world_size,
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"cache_key": self.cache_key, "floor": self.floor}

    def load_state_dict(self, state_dict: dict) -> None:
        # The floor was logged by the run before the resume: not logged again. The real features
        # come back from the cache file named by the key, not recomputed.
        self.floor = state_dict.get("floor")
        self.cache_key = state_dict.get("cache_key")
