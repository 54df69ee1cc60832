"""Metrics of a generator while it trains (FID and KID by default), on its EMA weights.

Every ``every_n_epochs`` validation epochs the callback generates ``num_samples`` images and
computes each metric named in ``metrics`` from their features:

- **The same samples for any number of processes and any batch size.** Sample i's noise comes from
  a generator seeded by (``seed``, i // 16): one per small fixed chunk of sample indices
  (``lightning_gen.eval.seeded_sampling``), and a conditional model is asked for class i mod C.
- **Balanced.** Rank r of W generates the contiguous samples ``[N r / W, N (r + 1) / W)`` (N / W
  each, rounded), in the same number of calls of at most ``batch_size`` images on every rank; no
  rank is idle and none is left without work to sync (a rank with no sample contributes an empty
  share).
- **Metrics** (``lightning_gen.eval.gen_metrics``, a registry: the interface is documented there)
  receive the real features once and each rank's generated features; they sync over ranks like
  torchmetrics metrics, in float64: FID from summed statistics (equal to one process's up to the
  order of float64 sums), KID from the features gathered in sample order with subsets drawn from a
  generator seeded by ``seed`` (bitwise one process's value). Nothing draws from the training
  streams. ``kid: false`` (the older key) removes kid from the list.

Real features are extracted once, by every rank on its shard of the split (gathered, padding
dropped), cached on disk under a key of dataset config / split / extractor / resolution, and loaded
from there on later evaluations, later runs and resumes.

Feature extractors, named in the metric so numbers are never confused:
- ``domain`` (the default for digits/MNIST/Fashion-MNIST): a small classifier trained on the domain
  -> ``val/fid_<data>`` and ``val/kid_<data>``. It is built on first use (about a minute on a CPU)
  and cached per user, one file per dataset and resolution (``lightning_gen.eval.fid_extractor``);
  global rank 0 loads or builds it and every rank receives rank 0's copy, so all ranks measure with
  the same network whatever their file systems hold;
- ``inception``: torchmetrics' FID InceptionV3 (torch-fidelity's port) with weights from the local
  file ``inception_path`` (air-gapped clusters) -> ``val/fid_inception``. Images are resized to
  299x299 inside the network: ``antialias=true`` (torchmetrics >= 1.8 default: bilinear with
  antialiasing) differs from torch-fidelity / the original TF FID (``antialias=false``: TF1-style
  bilinear without antialiasing), and changes FID noticeably on small images. The setting is part
  of the cache key and logged as ``val/fid_inception_antialias``.
The real-vs-real floor (FID of ``real_split`` against the held-out ``floor_split``) is logged once
as ``val/fid_<name>_floor``: no generator can be expected to go below it at that sample count.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.eval.features import Features, sharded_features
from lightning_gen.eval.gen_metrics import build_metrics, check_metric_names, fid_of, generative_metrics
from lightning_gen.eval.seeded_sampling import call_ranges, calls_per_rank, seeded_samples
from lightning_gen.randomness import isolated
from lightning_gen.registry import register_callback
from lightning_gen.sharding import is_sharded

DOMAIN_DATASETS = ("digits", "mnist", "fashion_mnist")
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


@dataclass
class FIDConfig(CallbackConfig):
    every_n_epochs: int = 5
    num_samples: int = bounded(1000, 2)  # generated images per evaluation, over all ranks (N / W each)
    batch_size: int = bounded(250, 1)  # at most this many images per sample() call on one rank
    # computed from the same samples (lightning_gen.eval.gen_metrics); fid is required (it picks the best checkpoint)
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid"])
    extractor: str = choice(
        "auto", "auto", "domain", "inception"
    )  # auto: domain for digits/MNIST, else inception
    domain_extractor_path: str | None = None  # a given file; default: <extractor_dir>/<data>_<size>px.pt
    extractor_dir: str | None = None  # the cache of domain extractors; default $LGEN_CACHE_DIR/fid_extractors
    inception_path: str = "weights/weights-inception-2015-12-05-6726825d.pth"
    antialias: bool = True  # Inception resize; false matches torch-fidelity / TF FID
    real_split: str = "train"
    floor_split: str = "test"  # held-out real images for the real-vs-real floor ("" to skip)
    kid: bool | None = None  # older key, superseded by metrics: false removes kid, true adds it
    kid_subsets: int = bounded(50, 1)
    kid_subset_size: int = bounded(1000, 2)  # capped at the number of samples
    cache_dir: str | None = None  # default <runs_dir>/fid_cache, shared by runs
    seed: int = 1234  # the generated samples and KID's subsets; the same for any number of processes


def metric_names(cfg: FIDConfig) -> list[str]:
    """``cfg.metrics`` checked, with the older ``kid`` key applied (false removes kid, true adds it)."""
    names = check_metric_names(list(cfg.metrics))
    if cfg.kid is False:
        names = [n for n in names if n != "kid"]
    elif cfg.kid and "kid" not in names:
        names.append("kid")
    if "fid" not in names:
        raise ConfigError(
            f"callbacks.fid.metrics={names} leaves out fid, which chooses the best checkpoint; "
            f"add it, e.g. callbacks.fid.metrics=[fid,{','.join(names) or 'kid'}]"
        )
    return names


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D) on this process (``fake``: this rank's share when distributed)."""
    return generative_metrics(real, fake, ["fid"], FIDConfig())[("fid", "")]


def fid_kid_from_shards(
    real: torch.Tensor,
    fake: torch.Tensor,
    device,
    kid: bool = True,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
    seed: int = FIDConfig.seed,
) -> dict[tuple[str, str], float]:
    """FID (and KID) of ``fake`` (this rank's share, in sample order) against ``real`` (the whole
    reference, the same on every rank), synced over ranks when distributed."""
    cfg = FIDConfig(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    return generative_metrics(real, fake, ["fid", "kid"] if kid else ["fid"], cfg, device)


class InceptionFeatures(nn.Module):
    """pool3 (2048-d) features of torchmetrics' FID InceptionV3, weights from a local file."""

    num_features = 2048

    def __init__(self, weights_path: str, antialias: bool):
        super().__init__()
        self.check_weights(weights_path)
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], weights_path, antialias=antialias)
        except ModuleNotFoundError as error:
            raise ConfigError(
                f"Inception FID needs torch-fidelity: pip install torch-fidelity ({error})"
            ) from error

    @staticmethod
    def check_weights(weights_path: str) -> None:
        if not Path(weights_path).is_file():
            raise ConfigError(
                f"Inception weights for FID not found at {weights_path} (callbacks.fid.inception_path). "
                f"Download {INCEPTION_URL} (torch-fidelity's FID Inception, the file torchmetrics uses) "
                f"to that path on a machine with internet access, "
                f"or use callbacks.fid.extractor=domain on digits/MNIST."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.net((x.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(len(x), -1)


@register_callback("fid", FIDConfig)
class FID(L.Callback):
    """FID and KID (``metrics``) of EMA samples every N epochs (domain or local Inception features), real features cached."""

    def __init__(self, cfg: FIDConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.metric_names = metric_names(cfg)  # a config error before anything is created
        self.metrics = []
        self.extractor: nn.Module | None = None
        self.name = ""
        self.extractor_id = ""
        self.real: Features | None = None
        self.floor: float | None = None
        self.cache_key: str | None = None
        self.last: dict[str, float] = {}
        self.real_source = ""  # "computed" or "cache": how the real features of this process were obtained

    def extractor_kind(self, data_name: str) -> str:
        if self.cfg.extractor == "auto":
            return "domain" if data_name in DOMAIN_DATASETS else "inception"
        return self.cfg.extractor

    def metric_name(self, data_name: str) -> str:
        """The FID metric this callback logs for a dataset: ``val/fid_<data>`` or ``val/fid_inception``."""
        return f"val/fid_{data_name if self.extractor_kind(data_name) == 'domain' else 'inception'}"

    # ------------------------------------------------------------------ setup
    def preflight(self, module: L.LightningModule) -> str:
        """Checks made before a run creates anything (``run.preflight``) and again in ``setup``; returns
        the extractor kind, domain or inception."""
        if not getattr(module, "is_generative", False):
            raise ConfigError(
                f"callbacks.fid needs a generator; method {module.registry_name!r} cannot sample. "
                "Disable it with callbacks.fid.enabled=false"
            )
        data = module.data_info
        kind = self.extractor_kind(data.name)
        given = self.cfg.domain_extractor_path
        if kind == "domain" and given and not Path(given).expanduser().is_file():
            raise ConfigError(
                f"callbacks.fid.domain_extractor_path={given}: no such file. Leave the setting out to use "
                f"(and on first use build) the cached extractor of {data.name} at {data.image_size} px, "
                f"or build one there with `lgen fid-extractor data={data.name} "
                f"data.image_size={data.image_size} out={given}`"
            )
        if kind == "inception":
            InceptionFeatures.check_weights(self.cfg.inception_path)
        return kind

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        kind = self.preflight(module)
        if kind == "domain":
            from lightning_gen.eval.fid_extractor import extractor_from_blob

            blob, digest = self.domain_extractor(trainer, module.data_info)
            self.use_extractor(
                extractor_from_blob(blob), blob["data"], f"{blob['data']}{blob['image_size']}-{digest[:10]}"
            )
        else:
            self.use_extractor(
                InceptionFeatures(self.cfg.inception_path, self.cfg.antialias),
                "inception",
                f"inception-antialias{int(self.cfg.antialias)}",
            )

    def use_extractor(self, extractor: nn.Module, name: str, extractor_id: str) -> None:
        """Measure with ``extractor`` (a module with ``num_features``), named ``name`` in the metric keys."""
        self.extractor, self.name, self.extractor_id = extractor, name, extractor_id
        self.metrics = build_metrics(self.metric_names, self.cfg, extractor.num_features)
        self.real = None  # the reference is (re)loaded in this extractor's features at the next evaluation

    def domain_extractor(self, trainer: L.Trainer, data) -> tuple[dict, str]:
        """(saved extractor, sha1 of its file): loaded, or first built, by global rank 0 and sent to every rank."""
        from lightning_gen.eval.fid_extractor import default_path, ensure_extractor

        given = self.cfg.domain_extractor_path
        path = (
            Path(given).expanduser()
            if given
            else default_path(data.name, data.image_size, self.cfg.extractor_dir)
        )
        loaded = None
        if trainer.is_global_zero:
            root = getattr(trainer.datamodule.cfg, "root", None) if trainer.datamodule else None
            ensure_extractor(
                data.name, data.image_size, path, [f"data.root={root}"] if root else [], rank_zero_info
            )
            loaded = (
                torch.load(path, map_location="cpu", weights_only=False),
                hashlib.sha1(path.read_bytes()).hexdigest(),
            )
        return trainer.strategy.broadcast(loaded, src=0)

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
    def features(self, images: torch.Tensor, device) -> torch.Tensor:
        """Extractor features (float64, on ``device``) of float images in [0, 1], in float32 whatever the autocast."""
        self.extractor.to(device)
        with torch.autocast(torch.device(device).type, enabled=False):
            return torch.cat([self.extractor(x.to(device).float()).double() for x in images.split(250)])

    def extract(self, loader, device) -> Features:
        """Features of every image of ``loader``'s dataset (uint8 batches), on the CPU: each rank
        extracts its shard and every rank receives all of them, in index order."""
        return sharded_features(lambda x: self.features(x.float() / 255, device), loader, device).to("cpu")

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

    def set_reference(self, real: Features, device) -> None:
        """The real features every metric compares with (the same full set on every rank)."""
        self.real = real
        for metric in self.metrics:
            metric.to(device)
            metric.set_reference(real.features, real.labels)

    def generate_features(
        self, module: L.LightningModule, world_size: int = 1, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (float64) of this rank's share of the samples, in sample order, and the classes
        they were asked for (None for an unconditional model)."""
        feats, labels = [], []
        was_training = module.training
        module.eval()
        with torch.autocast(module.device.type, enabled=False):
            calls = call_ranges(self.cfg.num_samples, self.cfg.batch_size, world_size, rank)
            for indices in calls:
                images, asked = seeded_samples(module, indices, self.cfg.seed)
                feats.append(self.features(images, module.device))
                labels.append(asked)
            if is_sharded(module):  # each sample() call is a collective (trainer.strategy=fsdp): a rank
                # with fewer calls joins the others' last ones with calls whose samples it drops
                for _ in range(
                    calls_per_rank(self.cfg.num_samples, self.cfg.batch_size, world_size) - len(calls)
                ):
                    module.sample(1, generator=torch.Generator(module.device).manual_seed(self.cfg.seed))
        module.train(was_training)
        if not feats:  # fewer samples than ranks: an empty share still joins the metrics' sync
            empty = torch.zeros(0, self.extractor.num_features, dtype=torch.float64, device=module.device)
            asked = torch.zeros(0, dtype=torch.long, device=module.device)
            return empty, asked if getattr(module, "conditional", False) else None
        return torch.cat(feats), None if labels[0] is None else torch.cat(labels)

    def measure(self, module: L.LightningModule, world_size: int = 1, rank: int = 0) -> dict[str, float]:
        """Every metric of this rank's share of generated samples against the reference; a collective
        under torch.distributed (every rank calls it), the same values on every rank."""
        fake, labels = self.generate_features(module, world_size, rank)
        results = {}
        with torch.autocast(module.device.type, enabled=False):
            for metric in self.metrics:
                metric.to(module.device)
                metric.update(fake, labels)
                computed = metric.compute()
                metric.reset()
                results.update(
                    {f"val/{stem}_{self.name}{suffix}": v for (stem, suffix), v in computed.items()}
                )
        return results

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        if self.real is None:
            self.set_reference(self.real_features(trainer, module, self.cfg.real_split), module.device)
        results = self.measure(module, trainer.world_size, trainer.global_rank)
        if self.floor is None and self.cfg.floor_split:
            held_out = self.real_features(trainer, module, self.cfg.floor_split)
            self.floor = fid_of(self.real.features, held_out.features)  # every rank holds both sets: no sync
            results[f"val/fid_{self.name}_floor"] = self.floor
            rank_zero_info(
                f"[fid] real-vs-real floor ({self.cfg.real_split} {len(self.real)} vs {self.cfg.floor_split} "
                f"{len(held_out)} images): {self.floor:.3f}"
            )
        if self.name == "inception":
            results["val/fid_inception_antialias"] = float(self.cfg.antialias)
        for name, value in results.items():  # equal on every rank: logged as is
            module.log(name, value, sync_dist=False, rank_zero_only=False)
        if trainer.is_global_zero:
            self.write_results(trainer, results)
        rank_zero_info(
            f"[fid] epoch {trainer.current_epoch} ({self.cfg.num_samples} samples over {trainer.world_size} "
            f"process(es) vs {len(self.real)} real): " + " ".join(f"{k}={v:.4f}" for k, v in results.items())
        )
        self.last = results
        return results

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
