"""FID and KID of a generator while it trains (torchmetrics), on its EMA weights.

Every ``every_n_epochs`` validation epochs each rank generates its share of ``num_samples`` images
(chunk c of ``batch_size`` images is drawn with a generator seeded by (seed, c) and chunks are dealt
round-robin to ranks, so the set of samples is the same for any number of processes); torchmetrics
sums (FID) or concatenates (KID) the states across ranks in ``compute``. Real features are
computed once, cached on disk under a key of dataset config / split / extractor / resolution, and
loaded from there on later evaluations, later runs and resumes; each rank feeds its own slice of
them so the synced real statistics count every real image once.

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
import math
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_gen.callbacks import CallbackConfig
from lightning_gen.config import ConfigError, choice
from lightning_gen.randomness import isolated
from lightning_gen.registry import register_callback

DOMAIN_DATASETS = ("digits", "mnist", "fashion_mnist")
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


@dataclass
class FIDConfig(CallbackConfig):
    every_n_epochs: int = 5
    num_samples: int = 1000  # generated images per evaluation, over all ranks
    batch_size: int = 250  # images generated per call on one rank
    extractor: str = choice(
        "auto", "auto", "domain", "inception"
    )  # auto: domain for digits/MNIST, else inception
    domain_extractor_path: str | None = None  # a given file; default: <extractor_dir>/<data>_<size>px.pt
    extractor_dir: str | None = None  # the cache of domain extractors; default $LGEN_CACHE_DIR/fid_extractors
    inception_path: str = "weights/weights-inception-2015-12-05-6726825d.pth"
    antialias: bool = True  # Inception resize; false matches torch-fidelity / TF FID
    real_split: str = "train"
    floor_split: str = "test"  # held-out real images for the real-vs-real floor ("" to skip)
    kid: bool = True
    kid_subsets: int = 50
    kid_subset_size: int = 1000  # capped at the number of samples
    cache_dir: str | None = None  # default <runs_dir>/fid_cache, shared by runs
    seed: int = 1234


class PrecomputedFeatures(nn.Module):
    """Identity 'network' so torchmetrics accumulates features we extracted (and cached) ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid_metrics(num_features: int, kid: bool, kid_subsets: int, kid_subset_size: int):
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(num_features), reset_real_features=True)
    kid_metric = None
    if kid:
        kid_metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(num_features),
            subsets=kid_subsets,
            subset_size=kid_subset_size,
            reset_real_features=True,
        )
    return fid, kid_metric


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D) through torchmetrics, synced over ranks when distributed."""
    fid, _ = fid_kid_metrics(real.shape[1], False, 1, 1)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def fid_kid_from_shards(
    real: torch.Tensor,
    fake: torch.Tensor,
    device,
    kid: bool = True,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
) -> dict[tuple[str, str], float]:
    """FID (and KID) from this rank's share of real and fake features; torchmetrics syncs the states
    over ranks in ``compute`` (FID: sums, KID: concatenation), so every rank gets the global value
    as long as each feature sits on exactly one rank."""
    fid, kid_metric = fid_kid_metrics(real.shape[1], kid, kid_subsets, kid_subset_size)
    for metric in filter(None, (fid, kid_metric)):
        metric.to(device)  # states live where the process group can reduce them (NCCL: on the GPU)
        metric.update(real.to(device), real=True)
        if len(fake):
            metric.update(fake.to(device), real=False)
    results = {("fid", ""): float(fid.compute())}
    if kid_metric is not None:
        kid_mean, kid_std = kid_metric.compute()
        results.update({("kid", ""): float(kid_mean), ("kid", "_std"): float(kid_std)})
    return results


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
    """FID and KID of EMA samples every N epochs (domain or local Inception features), real stats cached."""

    def __init__(self, cfg: FIDConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.extractor: nn.Module | None = None
        self.name = ""
        self.extractor_id = ""
        self.real: torch.Tensor | None = None
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
            self.extractor = extractor_from_blob(blob)
            self.name = blob["data"]
            self.extractor_id = f"{blob['data']}{blob['image_size']}-{digest[:10]}"
        else:
            self.extractor = InceptionFeatures(self.cfg.inception_path, self.cfg.antialias)
            self.name = "inception"
            self.extractor_id = f"inception-antialias{int(self.cfg.antialias)}"

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
        """Extractor features of float images in [0, 1]."""
        self.extractor.to(device)
        return torch.cat([self.extractor(x.to(device).float()).double().cpu() for x in images.split(250)])

    def real_features(self, trainer: L.Trainer, module: L.LightningModule, split: str) -> torch.Tensor:
        """Features of a real split: from the cache file, or computed on rank 0, cached, then read by all."""
        path, key = self.cache_path(trainer, split)
        source = "cache"
        if trainer.is_global_zero and not path.is_file():
            images = torch.cat([b["image"] for b in trainer.datamodule.eval_dataloader(split)]).float() / 255
            feats = self.features(images, module.device)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"key": key, "features": feats}, tmp)
            tmp.replace(path)
            source = "computed"
        trainer.strategy.barrier()
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob.get("key") != key:
            raise RuntimeError(f"FID cache {path} holds features for another setting; delete it to recompute")
        if split == self.cfg.real_split:
            self.real_source, self.cache_key = source, key
        rank_zero_info(
            f"[fid] real features of {split!r} ({len(blob['features'])} images): "
            f"{'computed and cached at' if source == 'computed' else 'loaded from cache'} {path}"
        )
        return blob["features"]

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.cfg.every_n_epochs:
            return
        with (
            isolated()
        ):  # sampling uses its own seeded generators; nothing else may touch the training streams
            self.evaluate(trainer, module)

    def generate_features(self, trainer: L.Trainer, module: L.LightningModule) -> torch.Tensor:
        rank, world = trainer.global_rank, trainer.world_size
        chunks = math.ceil(self.cfg.num_samples / self.cfg.batch_size)
        feats = []
        was_training = module.training
        module.eval()
        with torch.autocast(module.device.type, enabled=False):
            for c in range(rank, chunks, world):
                n = min(self.cfg.batch_size, self.cfg.num_samples - c * self.cfg.batch_size)
                generator = torch.Generator(module.device).manual_seed(self.cfg.seed * 100003 + c)
                feats.append(self.features(module.sample(n, generator=generator), module.device))
        module.train(was_training)
        return torch.cat(feats) if feats else torch.zeros(0, self.extractor.num_features, dtype=torch.float64)

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        if self.real is None:
            self.real = self.real_features(trainer, module, self.cfg.real_split)
        rank, world = trainer.global_rank, trainer.world_size
        fake = self.generate_features(trainer, module)
        n_real = len(self.real)
        results = {
            f"val/{k}_{self.name}{suffix}": v
            for (k, suffix), v in fid_kid_from_shards(
                self.real[rank::world],
                fake,
                module.device,
                self.cfg.kid,
                self.cfg.kid_subsets,
                min(self.cfg.kid_subset_size, n_real, self.cfg.num_samples),
            ).items()
        }
        if self.floor is None and self.cfg.floor_split:
            held_out = self.real_features(trainer, module, self.cfg.floor_split)
            self.floor = self._local_fid(self.real, held_out)
            results[f"val/fid_{self.name}_floor"] = self.floor
            rank_zero_info(
                f"[fid] real-vs-real floor ({self.cfg.real_split} {n_real} vs {self.cfg.floor_split} "
                f"{len(held_out)} images): {self.floor:.3f}"
            )
        if self.name == "inception":
            results["val/fid_inception_antialias"] = float(self.cfg.antialias)
        for name, value in results.items():
            module.log(name, value, sync_dist=False, rank_zero_only=False)
        rank_zero_info(
            f"[fid] epoch {trainer.current_epoch} ({self.cfg.num_samples} samples vs {n_real} real): "
            + " ".join(f"{k}={v:.4f}" for k, v in results.items())
        )
        self.last = results
        return results

    @staticmethod
    def _local_fid(real: torch.Tensor, other: torch.Tensor) -> float:
        """FID of two full feature sets held by this rank, with no cross-rank sync (every rank has both)."""
        fid, _ = fid_kid_metrics(real.shape[1], False, 1, 1)
        fid.sync_on_compute = False
        fid.update(real, real=True)
        fid.update(other, real=False)
        return float(fid.compute())

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"cache_key": self.cache_key, "floor": self.floor}

    def load_state_dict(self, state_dict: dict) -> None:
        # The floor was logged by the run before the resume: not logged again. The real features
        # come back from the cache file named by the key, not recomputed.
        self.floor = state_dict.get("floor")
        self.cache_key = state_dict.get("cache_key")
