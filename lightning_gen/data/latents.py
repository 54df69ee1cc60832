"""``lgen latents``: a dataset's latents, encoded once by a frozen autoencoder, and ``data=latents`` to train on them.

    lgen latents ckpt=runs/latent_autoencoder_fashion_mnist/stage1-seed0/checkpoints/last.ckpt \\
        data=fashion_mnist data.image_size=28 out=latents/fashion_mnist_28
    lgen train experiment=ldm_dit_fashion_mnist data=latents data.path=latents/fashion_mnist_28
    lgen latents ckpt=weights/sd-vae-ft-ema data=folder data.root=/datasets/imagenet data.image_size=256 \\
        data.resize_scale=1.0 out=/datasets/imagenet-sd-latents dtype=float16

Encoding every image at every step of latent diffusion costs as much as a DiT-XL/2 step itself on
ImageNet 256 (the fast-DiT practice is to encode once). This command runs the autoencoder (an lgen
latent_autoencoder checkpoint or a diffusers AutoencoderKL folder, as ``method.latents=ckpt:`` takes)
over the train, val and test splits of ``data`` as that DataModule makes them (the same held-out
validation images), in eval mode and float32, and writes to ``out``:

- ``<split>.pt``: ``mean`` and ``std`` of the posterior q(z|x) of every image, unscaled (N, C, h, w; in
  ``dtype``), and ``label`` (N,);
- ``latents.json``, written last (its presence means the cache is complete): the source data config
  and its DataInfo, the latent shape, the split sizes, the autoencoder's source and its ``fingerprint``
  (a SHA-1 of its weights and latent scale).

``data=latents data.path=<out>`` reads it back: training and validation batches hold ``latent_mean``,
``latent_std``, ``label`` and ``index``, and the diffusion method draws z ~ N(mean, std^2) and scales it
with its own autoencoder's scale, the same operations as encoding on the fly. The method must use the
same autoencoder (checked by fingerprint before anything is created); it still decodes with it, and
images (FID's real features, the grids) come from the source dataset, rebuilt from the stored config.
Other options: ``splits`` (default train,val,test), ``batch`` (256), ``device`` (auto), ``dtype``
(float32 | float16 | bfloat16), ``overwrite`` (false).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_gen.config import ConfigError, compose, section_object, to_dict
from lightning_gen.data.base import DataConfig, DatasetMissingError, ImageDataModule
from lightning_gen.methods.base import DataInfo
from lightning_gen.registry import register_datamodule

META = "latents.json"
OPTIONS = {
    "ckpt": str,
    "out": str,
    "splits": str,
    "batch": int,
    "device": str,
    "dtype": str,
    "overwrite": bool,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fingerprint(autoencoder) -> str:
    """SHA-1 of the weights and buffers latents depend on (the discriminator is not one of them)."""
    digest = hashlib.sha1()
    for name, value in sorted(autoencoder.state_dict().items()):
        if name.startswith("discriminator."):
            continue
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- writing: lgen latents


def parse(items: list[str]) -> tuple[dict, list[str]]:
    options, data = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and (key == "data" or key.startswith("data.")):
            data.append(item)
            continue
        if not sep or key not in OPTIONS:
            raise ConfigError(
                f"lgen latents: cannot read {item!r}; use key=value with keys {', '.join(OPTIONS)} "
                "and data=<name> / data.<key>=<value>"
            )
        kind = OPTIONS[key]
        options[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    if "ckpt" not in options:
        raise ConfigError(
            "lgen latents: say which autoencoder: ckpt=<latent_autoencoder checkpoint or diffusers folder>"
        )
    if not any(d.startswith("data=") for d in data):
        raise ConfigError(
            "lgen latents: say which dataset: data=<name> (and data.<key>=<value> as for lgen train)"
        )
    return options, data


def add_arguments(parser) -> None:
    parser.add_argument(
        "options",
        nargs="*",
        help="ckpt=<autoencoder> data=<name> [data.<key>=...] out= splits= batch= device= dtype=",
    )


def main(args) -> int:
    from lightning_gen import registry
    from lightning_gen.methods.generative.latent_autoencoder import frozen_autoencoder

    options, data_args = parse(args.options)
    dtype = options.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"lgen latents: dtype={dtype}: use one of {', '.join(DTYPES)}")
    data_cfg = compose(data_args).data
    if data_cfg.name == "latents":
        raise ConfigError("lgen latents: data=latents holds latents already; name the images' dataset")
    datamodule = registry.build("data", section_object(data_cfg))
    datamodule.check_files()
    info = datamodule.info
    autoencoder = frozen_autoencoder(f"ckpt:{options['ckpt']}", info)
    splits = options.get("splits", "train,val,test").split(",")
    default_out = f"latents/{info.name}_{info.image_size}px_{Path(options['ckpt'].rstrip('/')).stem}"
    out = Path(options.get("out", default_out))
    if (out / META).exists() and not options.get("overwrite"):
        raise ConfigError(f"lgen latents: {out} holds latents already; give another out= or overwrite=true")
    device = options.get("device", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    datamodule.setup()
    unknown = [s for s in splits if s not in datamodule.datasets]
    if unknown:
        raise ConfigError(
            f"lgen latents: {info.name} has no split {unknown[0]!r}; splits: {', '.join(datamodule.datasets)}"
        )
    identity = fingerprint(autoencoder)
    autoencoder.to(device)
    started, sizes = time.time(), {}
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # incomplete until it is written again, last
    for split in splits:
        loader = torch.utils.data.DataLoader(
            datamodule.eval_dataloader(split).dataset, batch_size=options.get("batch", 256), shuffle=False
        )
        means, stds, labels = [], [], []
        with torch.autocast(device.type, enabled=False):
            for batch in loader:
                x = autoencoder.to_float(batch["image"].to(device), "symmetric")
                mean, std = autoencoder.posterior(x)
                means.append(mean.to(DTYPES[dtype]).cpu())
                stds.append(std.to(DTYPES[dtype]).cpu())
                labels.append(batch["label"])
        blob = {"mean": torch.cat(means), "std": torch.cat(stds), "label": torch.cat(labels)}
        tmp = out / f"{split}.pt.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, out / f"{split}.pt")
        sizes[split] = len(blob["label"])
        print(
            f"[latents] {split}: {sizes[split]} images -> {tuple(blob['mean'].shape[1:])} latents", flush=True
        )
    meta = {
        "autoencoder": str(options["ckpt"]),
        "fingerprint": identity,
        "latent_shape": list(autoencoder.latent_shape),
        "data": to_dict(data_cfg),
        "data_info": asdict(info),
        "splits": sizes,
        "dtype": dtype,
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[latents] {out}/ in {time.time() - started:.1f} s: train on it with data=latents data.path={out}")
    return 0


# ---------------------------------------------------------------------------- reading: data=latents


@dataclass
class LatentsConfig(DataConfig):
    path: str = "latents"  # the folder `lgen latents` wrote (its splits are used as they are)


class LatentTensorDataset(Dataset):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor):
        self.mean, self.std, self.labels = mean, std, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "latent_mean": self.mean[i],
            "latent_std": self.std[i],
            "label": int(self.labels[i]),
            "index": i,
        }


@register_datamodule("latents", LatentsConfig)
class LatentsDataModule(ImageDataModule):
    """Latents cached by `lgen latents` (posterior mean and std per image); images from the source dataset."""

    def __init__(self, cfg: LatentsConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.path = Path(cfg.path).expanduser()
        self._meta: dict | None = None
        self._source: ImageDataModule | None = None

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self.check_files()
            self._meta = json.loads((self.path / META).read_text())
            size = self._meta["data_info"]["image_size"]
            if self.cfg.image_size not in (None, size):
                raise ConfigError(
                    f"data.path={self.cfg.path} holds latents of {size} px images, but data.image_size="
                    f"{self.cfg.image_size}: leave it out or set it to {size}"
                )
        return self._meta

    def expected_files(self) -> list[Path]:
        return [self.path / META]

    def check_files(self) -> None:
        if not (self.path / META).is_file():
            raise DatasetMissingError(
                f"no complete latents under data.path={self.cfg.path} (no {META}): write them with "
                "lgen latents ckpt=<autoencoder> data=<dataset> out=<folder>"
            )

    @property
    def info(self) -> DataInfo:
        return DataInfo(**{**self.meta["data_info"], "batch_size": self.cfg.batch_size})

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def source(self) -> ImageDataModule:
        """The DataModule of the images the latents were encoded from (FID's real images, the grids)."""
        if self._source is None:
            from lightning_gen import registry

            cfg = compose([f"data={self.meta['data']['name']}"]).data
            for key, value in self.meta["data"].items():
                cfg[key] = value
            self._source = registry.build("data", section_object(cfg))
        return self._source

    def load(self, split: str) -> Dataset:
        blob = torch.load(self.path / f"{split}.pt", map_location="cpu", weights_only=True, mmap=True)
        return LatentTensorDataset(blob["mean"], blob["std"], blob["label"])

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets = {split: self.load(split) for split in self.meta["splits"]}

    def eval_dataloader(self, split: str = "train"):
        return self.source.eval_dataloader(split)

    def check_method(self, method) -> None:
        """Before anything is created: the method must encode with the autoencoder that made these latents."""
        autoencoder = getattr(method, "autoencoder", None) if getattr(method, "latent", False) else None
        if autoencoder is None:
            raise ConfigError(
                f"data=latents holds an autoencoder's latents: train a latent diffusion model on them, with "
                f"method.latents=ckpt:{self.meta['autoencoder']}"
            )
        if fingerprint(autoencoder) != self.meta["fingerprint"]:
            raise ConfigError(
                f"data.path={self.cfg.path} holds the latents of another autoencoder ({self.meta['autoencoder']}) "
                f"than method.latents={method.cfg.latents}: encode them again with that one, or name it"
            )
