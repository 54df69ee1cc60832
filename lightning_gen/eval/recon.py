"""``lgen eval recon``: how well an autoencoder reconstructs a split: MSE, PSNR and FID of reconstructions.

    lgen eval recon ckpt=runs/latent_autoencoder_digits/<run>/checkpoints/last.ckpt
    lgen eval recon ckpt=runs/vq_digits/<run>/checkpoints/last.ckpt               (a VQ tokenizer)
    lgen eval recon ckpt=path/to/sd-vae data=cifar10 data.root=/datasets   (a diffusers AutoencoderKL folder)

Every image of ``recon.split`` (default test; ``recon.max_images`` for the first N) is encoded to its
posterior mean (a VQ tokenizer: to its codes) and decoded. MSE is per pixel on [0, 1]; PSNR = 10
log10(1 / MSE) per image, averaged.
FID compares the extractor features of the reconstructions with those of the same real images: the
domain extractor on digits/MNIST/Fashion-MNIST (as the FID callback; built once and cached), the FID
Inception from a local file elsewhere. Results go to ``<run>/eval/<checkpoint>/recon.json`` (or ``out=``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_gen.eval import EvalError


@dataclass
class ReconConfig:
    split: str = "test"
    max_images: int | None = None  # the first N images of the split (None: all)
    fid: bool = True
    extractor: str = "auto"  # auto: domain for digits/MNIST/Fashion-MNIST, else inception
    domain_extractor_path: str | None = None  # default: the cached extractor of the data and resolution
    inception_path: str = "weights/weights-inception-2015-12-05-6726825d.pth"
    antialias: bool = True


def feature_extractor(cfg: ReconConfig, data_name: str, image_size: int, root: str | None):
    """The FID feature network: (name, module taking [0, 1] float images)."""
    from lightning_gen.config import ConfigError
    from lightning_gen.eval.extractors import ExtractorSettings, load_extractor
    from lightning_gen.methods.base import DataInfo

    if cfg.extractor not in ("auto", "domain", "inception"):
        raise EvalError(f"recon.extractor must be auto, domain or inception, got {cfg.extractor!r}")
    settings = ExtractorSettings.of(cfg, resize="antialias" if cfg.antialias else "legacy")
    try:
        extractor, _ = load_extractor(
            cfg.extractor, DataInfo(name=data_name, image_size=image_size), settings, data_root=root
        )
    except ConfigError as error:
        raise EvalError(f"recon: {error}") from error
    return extractor.name, extractor


@torch.no_grad()
def reconstruction_metrics(module, loader, device, extractor=None, max_images: int | None = None) -> dict:
    """MSE and PSNR (per image, on [0, 1]) of ``module.reconstruct`` over ``loader``, and the FID of the
    reconstructions against the same real images when an extractor is given."""
    from lightning_gen.callbacks.fid import fid_from_features

    was_training = module.training
    module.eval()
    squared, psnr, real_features, fake_features, seen = [], [], [], [], 0
    for batch in loader:
        images = batch["image"]
        if max_images is not None:
            images = images[: max_images - seen]
        if not len(images):
            break
        real = images.to(device).float() / 255
        fake = module.reconstruct(images.to(device)).float()
        per_image = (fake - real).square().flatten(1).mean(1)
        squared.append(per_image.cpu())
        psnr.append((-10 * torch.log10(per_image.clamp_min(1e-10))).cpu())
        if extractor is not None:
            real_features.append(extractor(real).double().cpu())
            fake_features.append(extractor(fake).double().cpu())
        seen += len(images)
    module.train(was_training)
    if not seen:
        raise EvalError("the split to reconstruct is empty")
    results = {
        "mse": float(torch.cat(squared).mean()),
        "psnr": float(torch.cat(psnr).mean()),
        "images": seen,
    }
    if extractor is not None:
        results["fid"] = fid_from_features(torch.cat(real_features), torch.cat(fake_features))
    return results


def load_reconstructor(path: str):
    """A VQ tokenizer checkpoint, or a latent autoencoder (checkpoint or diffusers folder)."""
    from pathlib import Path

    from lightning_gen.checkpoint import load_checkpoint
    from lightning_gen.methods.generative.latent_autoencoder import load_latent_autoencoder
    from lightning_gen.methods.generative.vq_autoencoder import load_tokenizer

    if (
        Path(path).is_file()
        and load_checkpoint(path).get("hyper_parameters", {}).get("method") == "vq_autoencoder"
    ):
        return load_tokenizer(path)
    return load_latent_autoencoder(path)


def evaluate(cfg, data_overrides: list[str]) -> tuple[dict, object, str]:
    """(results, output folder, data name) of ``lgen eval recon`` for the EvalConfig ``cfg``."""
    from pathlib import Path

    from lightning_gen.config import ConfigError
    from lightning_gen.eval.cli import build_data
    from lightning_gen.eval.wandb_run import run_dir_of_checkpoint

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    module = load_reconstructor(cfg.ckpt)
    run_dir = run_dir_of_checkpoint(cfg.ckpt) if Path(cfg.ckpt).is_file() else None
    pretrained = not module.data_info.name
    if pretrained and cfg.data is None:
        raise ConfigError(
            f"{cfg.ckpt} is a pretrained autoencoder: say which data to reconstruct, e.g. data=cifar10"
        )
    if pretrained and not any(o.startswith("data.image_size=") for o in data_overrides):
        data_overrides = [*data_overrides, "data.image_size=null"]  # the dataset's own size
    datamodule = build_data(cfg, module, run_dir, data_overrides)
    module.check_data(datamodule.info, str(cfg.ckpt))
    module.to(device)
    recon = cfg.recon
    extractor = None
    if recon.fid:
        _, extractor = feature_extractor(
            recon, datamodule.info.name, datamodule.info.image_size, getattr(datamodule.cfg, "root", None)
        )
        extractor = extractor.to(device)
    results = reconstruction_metrics(
        module, datamodule.eval_dataloader(recon.split), device, extractor, recon.max_images
    )
    base = run_dir / "eval" if run_dir else Path(cfg.ckpt).resolve().parent / "eval"
    out = Path(cfg.out) if cfg.out else base / Path(cfg.ckpt).stem
    return results, out, datamodule.info.name
