"""Train the small domain feature extractor that stands in for Inception in FID on digits/MNIST.

Inception features of 8x8 digits upsampled to 299x299 say little about digits; a small classifier
trained on the domain gives features that do (its penultimate layer, as Inception's pool3 for
ImageNet). The logged metric then says so: ``val/fid_digits``, never confused with ``val/fid_inception``.

Training builds it on first use (the FID callback) into a per-user cache, one file per dataset and
resolution: ``$LGEN_CACHE_DIR/fid_extractors/<data>_<size>px.pt``, where ``$LGEN_CACHE_DIR`` defaults
to ``$XDG_CACHE_HOME/lightning_gen``, else ``~/.cache/lightning_gen``. This command builds it ahead of
time (e.g. on a login node before submitting), or elsewhere with ``out=``:

    lgen fid-extractor data=digits data.image_size=16      -> ~/.cache/lightning_gen/fid_extractors/digits_16px.pt
    lgen fid-extractor data=mnist data.root=/datasets epochs=3 out=my_extractor.pt

Options (key=value, besides config overrides): epochs, lr, width, out, seed. ``epochs`` defaults to
15, fewer on large training sets so that training stops after about ``MAX_DEFAULT_STEPS`` batches
(digits: 15 epochs of 9 batches; Fashion-MNIST: 6 epochs of 429).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXTRACTOR_OPTIONS = {"epochs": int, "lr": float, "width": int, "out": str, "seed": int}
MAX_DEFAULT_STEPS = 2500


def default_epochs(num_train: int, batch: int = 128) -> int:
    """15 epochs, or as many whole epochs as fit in about MAX_DEFAULT_STEPS batches (at least 1)."""
    return max(1, min(15, round(MAX_DEFAULT_STEPS / max(1, num_train // batch))))


CACHE_ENV = "LGEN_CACHE_DIR"


def cache_root() -> Path:
    """The per-user cache: ``$LGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/lightning_gen``, else ``~/.cache/lightning_gen``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lightning_gen"


def default_path(data_name: str, image_size: int, folder: str | Path | None = None) -> Path:
    """Where the extractor of a dataset at a resolution is cached (``folder`` replaces the cache's folder)."""
    folder = Path(folder).expanduser() if folder else cache_root() / "fid_extractors"
    return folder / f"{data_name}_{image_size}px.pt"


class DomainFeatureNet(nn.Module):
    """Conv net: features (N, 4*width) from global average pooling, then a linear classifier.

    ``forward`` takes float images in [0, 1] at any size (resized to the trained one) and returns
    the features; ``classify`` returns class logits.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32):
        super().__init__()
        self.image_size, self.num_features = image_size, 4 * width

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(channels, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2),
            *block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return self.body((x - 0.5) / 0.5)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(x))


def load_extractor(path: str | Path) -> tuple[DomainFeatureNet, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return extractor_from_blob(blob), blob


def extractor_from_blob(blob: dict) -> DomainFeatureNet:
    """The frozen network of a saved extractor (the dict ``save_extractor`` writes)."""
    net = DomainFeatureNet(blob["channels"], blob["image_size"], blob["num_classes"], blob["width"])
    net.load_state_dict(blob["state_dict"])
    return net.eval().requires_grad_(False)


def _images(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(b["image"], b["label"]) for b in loader])
    return torch.cat(xs), torch.cat(ys)


def train_extractor(
    datamodule, epochs: int | None = None, lr: float = 2e-3, width: int = 32, seed: int = 0, log=print
) -> tuple[DomainFeatureNet, float]:
    """Train on the train split (random 1-pixel-per-8 shifts as augmentation); accuracy on the test split.
    ``epochs`` None: ``default_epochs`` of the training set's size.
    Seeded inside a forked RNG: building it in the middle of a training run leaves the run's streams alone
    (CPU only: the extractor trains on the CPU, and seeding CUDA would reseed the run's device streams)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return _train_extractor(datamodule, epochs, lr, width, log)


def _train_extractor(
    datamodule, epochs: int | None, lr: float, width: int, log
) -> tuple[DomainFeatureNet, float]:
    datamodule.setup("fit")
    info = datamodule.info
    x_train, y_train = _images(datamodule.eval_dataloader("train"))
    x_test, y_test = _images(datamodule.eval_dataloader("test"))
    keep = y_train >= 0
    x_train, y_train = x_train[keep].float() / 255, y_train[keep]
    epochs = epochs or default_epochs(len(x_train))
    net = DomainFeatureNet(info.channels, info.image_size, info.num_classes, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(x_train) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    shift = max(1, info.image_size // 8)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train))
        for start in range(0, len(order) - 127, 128):
            idx = order[start : start + 128]
            dx, dy = torch.randint(-shift, shift + 1, (2,)).tolist()
            x = torch.roll(x_train[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net.classify(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"[fid-extractor] epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        accuracy = (net.classify(x_test.float() / 255).argmax(1) == y_test).float().mean().item()
    return net, accuracy


def save_extractor(net: DomainFeatureNet, info, width: int, accuracy: float, out: Path) -> dict:
    """Write the extractor to ``out`` atomically (a reader never sees half a file) and return what was saved."""
    blob = {
        "state_dict": net.state_dict(),
        "channels": info.channels,
        "image_size": info.image_size,
        "num_classes": info.num_classes,
        "width": width,
        "data": info.name,
        "test_accuracy": accuracy,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, out)
    return blob


def build_extractor(data_name: str, image_size: int, out: Path, data_overrides=(), log=print) -> dict:
    """Train the extractor of ``data_name`` at ``image_size`` with the default settings and save it to ``out``."""
    from lightning_gen import registry
    from lightning_gen.config import compose, section_object

    cfg = compose([f"data={data_name}", f"data.image_size={image_size}", *data_overrides])
    datamodule = registry.build("data", section_object(cfg.data))
    net, accuracy = train_extractor(datamodule, log=log)
    return save_extractor(net, datamodule.info, 32, accuracy, out)


def ensure_extractor(data_name: str, image_size: int, path: Path, data_overrides=(), log=print) -> Path:
    """``path``, after building the extractor there if it is not there yet; says which it was."""
    if path.is_file():
        log(f"[fid] {data_name} {image_size} px feature extractor: {path} (cached)")
        return path
    log(
        f"[fid] no {data_name} {image_size} px feature extractor in the cache yet: "
        f"training it once (about a minute on a CPU) -> {path}"
    )
    started = time.time()
    blob = build_extractor(data_name, image_size, path, data_overrides, log=lambda _: None)
    log(
        f"[fid] {data_name} {image_size} px feature extractor built in {time.time() - started:.0f} s "
        f"(test accuracy {blob['test_accuracy']:.3f}) and cached at {path}"
    )
    return path


def add_arguments(parser) -> None:
    parser.add_argument(
        "overrides", nargs="*", help="data=NAME, data.key=value, and epochs= lr= width= out= seed="
    )


def main(args) -> int:
    from lightning_gen import registry
    from lightning_gen.config import ConfigError, compose, section_object

    options, overrides = {}, []
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key in EXTRACTOR_OPTIONS:
            options[key] = EXTRACTOR_OPTIONS[key](value)
        else:
            overrides.append(item)
    if not any(o.startswith("data=") for o in overrides):
        raise ConfigError(
            "say which dataset: lgen fid-extractor data=digits (or data=mnist, data=fashion_mnist)"
        )
    cfg = compose(overrides)
    datamodule = registry.build("data", section_object(cfg.data))
    started = time.time()
    net, accuracy = train_extractor(
        datamodule,
        options.get("epochs"),
        options.get("lr", 2e-3),
        options.get("width", 32),
        options.get("seed", 0),
    )
    info = datamodule.info
    out = Path(options.get("out") or default_path(info.name, info.image_size))
    save_extractor(net, info, options.get("width", 32), accuracy, out)
    print(
        f"[fid-extractor] {info.name} {info.image_size}px: test accuracy {accuracy:.4f}, "
        f"{net.num_features}-d features, {time.time() - started:.0f}s -> {out}"
    )
    return 0
