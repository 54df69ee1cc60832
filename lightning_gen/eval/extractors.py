"""Feature extractors of generative metrics, chosen by a spec, with the provenance of every number.

    auto | inception | domain | dinov2 | ckpt:<path> | timm:<name>@<weights file>

- ``domain``: the small classifier trained on digits / MNIST / Fashion-MNIST (``eval/fid_extractor.py``),
  its pooled features and its class logits; ``auto`` picks it on those datasets, else ``inception``.
- ``inception``: the FID InceptionV3 (torch-fidelity's port of the TensorFlow graph), pool3 (2048-d)
  and, for the Inception Score, the logits without the bias, as the original IS code computes them.
- ``dinov2``: a DINOv2 ViT (``nets/dinov2.py``; ViT-S/14 by default) from an official weights file,
  the normalised [CLS] token at 224 px (Stein et al. 2023 recommend this space).
- ``ckpt:<path>``: a checkpoint of this project's representation methods, its ``embed`` (a supervised
  checkpoint also brings its classifier, usable for CAS).
- ``timm:<name>@<file>``: any timm architecture with weights from a local file (``.pth``/``.safetensors``),
  its pre-logits features and, when the file has one, its classifier.

Nothing is downloaded: a missing file is an error that says where the weights come from. Every
extractor takes float images in [0, 1] and first makes them what a saved image would be, then what
the network expects (``resize`` names how; it is recorded with every number):

- ``legacy``: 8-bit quantisation, then bilinear resizing as TensorFlow 1 does it (no antialiasing):
  what torch-fidelity and the original TF FID / IS code do;
- ``clean``: 8-bit quantisation, then bicubic resizing with antialiasing as PIL does it (clean-fid,
  Parmar et al. 2022, arXiv:2104.11222), without quantising again;
- ``antialias``: 8-bit quantisation, then bilinear resizing with antialiasing (torchmetrics >= 1.8).

At the network's own input size nothing is resized (the domain extractor at its resolution).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.config import ConfigError, did_you_mean
from lightning_gen.eval.extractor_backbones import (
    DinoV2Backbone,
    DomainBackbone,
    InceptionBackbone,
    MethodBackbone,
    TimmBackbone,
)

DOMAIN_DATASETS = ("digits", "mnist", "fashion_mnist")
KINDS = ("auto", "inception", "domain", "dinov2", "ckpt:<path>", "timm:<name>@<weights file>")
RESIZE_MODES = ("clean", "legacy", "antialias")
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"


@dataclass
class ExtractorSettings:
    """Where an extractor's weights are and how images are resized (fields shared with ``callbacks.fid``)."""

    resize: str = "clean"
    inception_path: str = "weights/weights-inception-2015-12-05-6726825d.pth"
    dinov2_path: str = "weights/dinov2_vits14_pretrain.pth"
    domain_extractor_path: str | None = None
    extractor_dir: str | None = None

    @classmethod
    def of(cls, cfg: Any = None, **overrides) -> ExtractorSettings:
        """The settings of ``cfg`` (any object with some of these fields, e.g. FIDConfig), then ``overrides``."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        return cls(**{**values, **overrides})


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ images in


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> the float values 0..255 of their 8-bit versions (round to nearest)."""
    return (images.float().clamp(0, 1) * 255).round()


def tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's ``resize_bilinear`` (align_corners=False): output pixel i samples the input at
    i * in / out (no half-pixel offset), linearly between its two neighbours (the last one repeated)."""

    def axis(length: int):
        position = torch.arange(size, device=x.device, dtype=torch.float32) * (length / size)
        low = position.long()
        return low, (low + 1).clamp_max(length - 1), position - low.float()

    (top, bottom, dy), (left, right, dx) = axis(x.shape[-2]), axis(x.shape[-1])
    rows_top, rows_bottom = x[:, :, top], x[:, :, bottom]
    upper = rows_top[..., left] + (rows_top[..., right] - rows_top[..., left]) * dx
    lower = rows_bottom[..., left] + (rows_bottom[..., right] - rows_bottom[..., left]) * dx
    return upper + (lower - upper) * dy[:, None]


def resize_images(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Float images of values 0..255 (N, C, H, W) resized to size x size in ``mode`` (module docstring)."""
    if x.shape[-2:] == (size, size):
        return x
    if mode == "legacy":
        return tf1_bilinear(x, size)
    if (
        mode == "clean"
    ):  # torch's antialiased bicubic is PIL's filter (a = -0.5, support scaled when shrinking)
        return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(
            0, 255
        )
    if mode == "antialias":
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    raise ConfigError(
        f"unknown resize mode {mode!r}{did_you_mean(mode, RESIZE_MODES)}: {', '.join(RESIZE_MODES)}"
    )


# ------------------------------------------------------------------------------ the wrapper


class FeatureExtractor(nn.Module):
    """Float images in [0, 1] -> features (N, D) (and class logits when the backbone has a head).

    ``backbone``: a module with ``input_size``, ``channels``, ``num_features``, ``num_classes`` (0:
    no head), ``features(x)`` of images of values 0..255 at its input size, and ``head(features)``."""

    def __init__(self, backbone: nn.Module, resize: str, provenance: dict[str, Any]):
        super().__init__()
        if resize not in RESIZE_MODES:
            resize_images(torch.zeros(1, 1, 1, 1), 2, resize)  # the error
        self.backbone, self.resize = backbone.eval().requires_grad_(False), resize
        self.num_features, self.num_classes = backbone.num_features, backbone.num_classes
        self.name = provenance["name"]
        self.provenance = {**provenance, "resize": resize, "input_size": backbone.input_size}

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # frozen: BatchNorm statistics never move

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = quantize(images)
        channels = self.backbone.channels
        if channels is None:  # a bare module: any size, any channels
            return x
        if x.shape[1] != channels:
            if x.shape[1] != 1 or channels != 3:
                raise ConfigError(
                    f"the {self.name} feature extractor takes {channels}-channel images; these have {x.shape[1]}"
                )
            x = x.expand(-1, 3, -1, -1)
        return resize_images(x, self.backbone.input_size, self.resize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(self.prepare(images)).float()

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.backbone.features(self.prepare(images))
        logits = self.backbone.head(features).float() if self.num_classes else None
        return features.float(), logits

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.num_classes:
            raise ConfigError(f"the {self.name} feature extractor has no classifier head")
        return self.features_and_logits(images)[1]


# ------------------------------------------------------------------------------ specs and files


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``(kind, timm model name, path)`` of an extractor spec; a ConfigError naming the forms otherwise."""
    spec = str(spec)
    if spec in ("auto", "inception", "domain", "dinov2"):
        return spec, None, None
    if spec.startswith("ckpt:") and len(spec) > len("ckpt:"):
        return "ckpt", None, spec[len("ckpt:") :]
    if spec.startswith("timm:"):
        name, at, path = spec[len("timm:") :].partition("@")
        if name and at and path:
            return "timm", name, path
        raise ConfigError(
            f"extractor {spec!r}: a timm extractor is timm:<model name>@<weights file>, "
            "e.g. timm:resnet50@weights/resnet50.safetensors"
        )
    raise ConfigError(
        f"unknown feature extractor {spec!r}{did_you_mean(spec, KINDS[:4])}; one of: {', '.join(KINDS)}"
    )


def resolved_kind(spec: str, data_name: str) -> str:
    """The extractor kind of ``spec`` for a dataset: ``auto`` is domain on digits/MNIST/Fashion-MNIST, else inception."""
    kind = parse_spec(spec)[0]
    if kind == "auto":
        return "domain" if data_name in DOMAIN_DATASETS else "inception"
    return kind


def extractor_name(spec: str, data_name: str) -> str:
    """The name metrics carry for an extractor (``val/fid_<name>``), known before any file is read:
    the dataset's for the domain extractor, else inception, dinov2, ckpt, timm_<model>."""
    kind, name, _ = parse_spec(spec)
    kind = resolved_kind(spec, data_name)
    if kind == "domain":
        return data_name
    return "timm_" + name.replace(".", "_").replace("/", "_") if kind == "timm" else kind


def domain_extractor_file(data_info, settings: ExtractorSettings) -> Path:
    """The domain extractor's file: the given one (which must exist), else the per-user cache's."""
    from lightning_gen.eval.fid_extractor import default_path

    if settings.domain_extractor_path:
        path = Path(settings.domain_extractor_path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"domain_extractor_path={path}: no such file. Leave the setting out to use (and on first use "
                f"build) the cached extractor of {data_info.name} at {data_info.image_size} px, or build one "
                f"there with `lgen fid-extractor data={data_info.name} data.image_size={data_info.image_size} "
                f"out={path}`"
            )
        return path
    if data_info.name not in DOMAIN_DATASETS:
        raise ConfigError(
            f"there is no domain feature extractor for {data_info.name!r} (only {', '.join(DOMAIN_DATASETS)}): "
            "use extractor=inception, dinov2, ckpt:<path> or timm:<name>@<file>, or give domain_extractor_path"
        )
    return default_path(data_info.name, data_info.image_size, settings.extractor_dir)


def weights_file(
    kind: str, spec_path: str | None, settings: ExtractorSettings, name: str | None = None
) -> Path:
    """The weights file of a file-based extractor; one ConfigError with where the weights come from."""
    path = Path(
        {"inception": settings.inception_path, "dinov2": settings.dinov2_path}.get(kind) or spec_path
    ).expanduser()
    if path.is_file():
        return path
    source = {
        "inception": f"download {INCEPTION_URL} (torch-fidelity's FID Inception) to that path on a machine "
        "with internet access, or set inception_path",
        "dinov2": f"download an official DINOv2 backbone, e.g. {DINOV2_URL} (ViT-S/14; vitb14, vitl14 and "
        "the _reg models are read too), to that path on a machine with internet access, or set dinov2_path",
        "timm": f"save the weights of timm's {name} there (e.g. model.safetensors of the Hugging Face hub "
        f"repository timm/{name}, or torch.save(model.state_dict()))",
        "ckpt": "give a checkpoint written by `lgen train` of a representation method (one with embed)",
    }[kind]
    raise ConfigError(f"{kind} feature extractor weights not found at {path}: {source}")


def check_extractor(spec: str, data_info, settings: ExtractorSettings | None = None) -> str:
    """Checks made before anything is created (a run's preflight): the spec parses, its files exist (a
    missing domain extractor in the cache is fine: it is built on first use). Returns the kind."""
    settings = settings or ExtractorSettings()
    kind, name, path = parse_spec(spec)
    kind = resolved_kind(spec, data_info.name)
    resize_images(torch.zeros(1, 1, 1, 1), 1, settings.resize)  # an unknown mode is an error
    if kind == "domain":
        domain_extractor_file(data_info, settings)
    else:
        weights_file(kind, path, settings, name)
    if kind == "timm":
        try:
            import timm  # noqa: F401
        except ModuleNotFoundError as error:
            raise ConfigError(
                f"timm:<name>@<file> extractors need timm: pip install timm ({error})"
            ) from error
    return kind


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file (unwrapping ``state_dict`` / ``model``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    return state


def domain_extractor(blob: dict, path: str | Path, sha256: str, resize: str) -> FeatureExtractor:
    """The FeatureExtractor of a saved domain extractor (the dict ``fid_extractor.save_extractor`` writes)."""
    from lightning_gen.eval.fid_extractor import extractor_from_blob

    provenance = {
        "extractor": "domain",
        "name": blob["data"],
        "arch": f"domain conv net, width {blob['width']}, {blob['image_size']} px",
        "weights": str(Path(path).resolve()),
        "weights_sha256": sha256,
    }
    return FeatureExtractor(DomainBackbone(extractor_from_blob(blob)), resize, provenance)


def load_extractor(
    spec: str, data_info, settings: ExtractorSettings | None = None, data_root: str | None = None, log=print
) -> tuple[FeatureExtractor, dict[str, Any]]:
    """(frozen extractor on the CPU, its provenance) for ``spec`` on data described by ``data_info``
    (``name``, ``image_size``, ``channels``: a ``methods.base.DataInfo``). Files are read, never downloaded;
    the domain extractor is built into the per-user cache on first use (about a minute on a CPU, from
    the dataset under ``data_root``)."""
    from lightning_gen.eval.fid_extractor import ensure_extractor

    settings = settings or ExtractorSettings()
    kind = check_extractor(spec, data_info, settings)
    _, name, spec_path = parse_spec(spec)
    if kind == "domain":
        path = domain_extractor_file(data_info, settings)
        if not settings.domain_extractor_path:
            root = [f"data.root={data_root}"] if data_root else []
            ensure_extractor(data_info.name, data_info.image_size, path, root, log)
        blob = wrong_architecture(
            path, "a domain feature extractor (lgen fid-extractor)", lambda: _blob(path)
        )
        extractor = domain_extractor(blob, path, sha256_of(path), settings.resize)
        return extractor, extractor.provenance
    path = weights_file(kind, spec_path, settings, name)
    if kind == "inception":
        backbone = wrong_architecture(path, "the FID InceptionV3's weights", lambda: InceptionBackbone(path))
        provenance = {"extractor": "inception", "name": "inception", "arch": "inception-v3-compat"}
    elif kind == "dinov2":
        backbone = wrong_architecture(
            path, "a DINOv2 ViT in the official layout", lambda: DinoV2Backbone(read_state_dict(path))
        )
        provenance = {"extractor": "dinov2", "name": "dinov2", "arch": f"dinov2_{backbone.arch}"}
    elif kind == "timm":
        backbone = wrong_architecture(
            path, f"weights of timm's {name}", lambda: TimmBackbone(name, read_state_dict(path))
        )
        provenance = {"extractor": f"timm:{name}", "name": extractor_name(spec, data_info.name), "arch": name}
    else:  # ckpt
        method = _representation_method(path)
        backbone = MethodBackbone(method)
        provenance = {"extractor": f"ckpt:{path}", "name": "ckpt", "arch": method.registry_name}
    extractor = FeatureExtractor(
        backbone,
        settings.resize,
        {**provenance, "weights": str(path.resolve()), "weights_sha256": sha256_of(path)},
    )
    return extractor, extractor.provenance


def _blob(path: Path) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or "state_dict" not in blob or "image_size" not in blob:
        raise ValueError("it has no state_dict / image_size entries")
    return blob


def wrong_architecture(path: Path, what: str, build):
    """``build()``, with a file that does not hold ``what`` turned into one ConfigError."""
    try:
        return build()
    except ConfigError:
        raise
    except (
        Exception
    ) as error:  # unpickling, missing / unexpected keys, shape mismatches: all mean "wrong file"
        detail = " ".join(str(error).split())
        raise ConfigError(
            f"{path} does not hold {what}: {detail[:300]}{'...' if len(detail) > 300 else ''}"
        ) from error


def _representation_method(path: Path):
    from lightning_gen.eval import EvalError
    from lightning_gen.eval.features import require_embed
    from lightning_gen.methods.base import load_method

    method = wrong_architecture(path, "a checkpoint written by lgen train", lambda: load_method(str(path)))
    try:
        require_embed(method)
    except EvalError as error:
        raise ConfigError(f"ckpt:{path}: {error}") from error
    return method
