"""Take a trained encoder out: backbone weights as a plain state dict, or the embeddings of a split.

    lgen export backbone   ckpt=runs/simclr_cifar10/<run>/checkpoints/last.ckpt out=simclr_resnet18.pt
    lgen export embeddings ckpt=... split=test out=test.npz        (.pt, .npz, or .npy + _labels.npy)

``backbone`` writes the encoder's weights with torch.save as a plain ``{name: tensor}`` dict (it loads
with ``torch.load(..., weights_only=True)``) and, next to it, a .json that says how to rebuild the
network and what input it expects. A ResNet backbone is saved under torchvision's own names, so it
loads into ``torchvision.models.resnet18`` / ``resnet50`` with the classifier removed
(``model.fc = nn.Identity()``) and these differences applied, which the .json and the printed
snippet spell out:

- CIFAR stem (on by default for images <= 64 px): ``conv1`` is a 3x3 stride-1 convolution and there
  is no max-pool (``model.conv1 = nn.Conv2d(C, 64, 3, 1, 1, bias=False)``, ``model.maxpool = nn.Identity()``);
- images with C != 3 channels (digits, MNIST): ``conv1`` takes C channels;
- ``norm=layer``: GroupNorm with one group instead of BatchNorm
  (``resnet18(norm_layer=lambda c: nn.GroupNorm(1, c))``).

Other backbones (ViT, the small conv encoder) are saved as the state dict of lightning_gen's module,
named in the .json. The features are the backbone's output, before any projection head; for DINO
the exported backbone is the teacher, the network its ``embed`` (probe, kNN) uses.

``embeddings`` runs the method's ``embed`` (its own preprocessing) over a split of the run's dataset
(or ``data=NAME``, ``data.KEY=VALUE`` as in ``lgen eval``) and writes features (N, D) float32, labels
(N,) int64 (-1 = unlabeled) and the sample indices in the split.

Arguments are key=value: ckpt (required), out, split (default test), device (default auto), data, data.*.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_gen.eval import EvalError

WHAT = ("backbone", "embeddings")


@dataclass
class ExportConfig:
    ckpt: str | None = None
    out: str | None = None  # default: <run_dir>/export/<checkpoint>_<what>.pt
    split: str = "test"  # embeddings: which split of the data
    device: str = "auto"  # embeddings: auto = cuda when available
    data: str | None = None  # embeddings: a conf/data option; default the checkpoint run's data


# ------------------------------------------------------------------------------ backbone


def backbone_of(method) -> nn.Module:
    """The network behind a method's ``embed``: the module its ``embed_module`` names (DINO: the teacher),
    else its ``backbone`` (SSL methods) or ``encoder``."""
    for name in (getattr(method, "embed_module", None), "backbone", "encoder"):
        if name is None:
            continue
        module = getattr(method, name, None)
        if isinstance(module, nn.Module):
            return module
    raise EvalError(
        f"method {method.registry_name!r} has no backbone or encoder to export; "
        f"`lgen export embeddings` exports what its embed() computes"
    )


def export_backbone(method) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, description) of the method's backbone; ResNets under torchvision's names."""
    from lightning_gen.nets.backbones import ResNetBackbone

    module = backbone_of(method)
    data = method.data_info
    described = {
        "method": method.registry_name,
        "input": {
            "channels": data.channels,
            "image_size": data.image_size,
            "value_range": method.embed_value_range,  # standard: (x / 255 - mean) / std per channel
            "mean": list(data.mean),
            "std": list(data.std),
        },
    }
    if isinstance(module, ResNetBackbone):
        net = module.net
        cifar_stem = net.conv1.kernel_size == (3, 3)
        norm = "layer" if isinstance(net.bn1, nn.GroupNorm) else "batch"
        architecture = {2048: "resnet50", 512: "resnet18"}[module.out_dim]
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        described.update(
            format="torchvision",
            architecture=architecture,
            cifar_stem=cifar_stem,
            in_channels=net.conv1.in_channels,
            norm=norm,
            num_features=module.out_dim,
            torchvision=torchvision_snippet(architecture, net.conv1.in_channels, cifar_stem, norm),
        )
    else:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        described.update(
            format="lightning_gen",
            module=f"{type(module).__module__}.{type(module).__qualname__}",
            num_features=getattr(module, "out_dim", None),
        )
    return state, described


def torchvision_snippet(architecture: str, in_channels: int, cifar_stem: bool, norm: str) -> str:
    """Python that builds the torchvision model these weights load into (strictly)."""
    norm_arg = "norm_layer=lambda c: nn.GroupNorm(1, c)" if norm == "layer" else ""
    lines = [
        "import torch, torchvision",
        "from torch import nn",
        f"model = torchvision.models.{architecture}({norm_arg})",
        "model.fc = nn.Identity()  # the features, as trained (no classifier)",
    ]
    if cifar_stem:
        lines += [
            f"model.conv1 = nn.Conv2d({in_channels}, 64, 3, 1, 1, bias=False)  # CIFAR stem: 3x3, stride 1",
            "model.maxpool = nn.Identity()  # CIFAR stem: no max-pool",
        ]
    elif in_channels != 3:
        lines.append(
            f"model.conv1 = nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False)  # {in_channels} channels"
        )
    lines.append("model.load_state_dict(torch.load(PATH, weights_only=True))")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ embeddings


def save_embeddings(features, out: Path) -> list[Path]:
    """Write features/labels/indices to ``out`` by its suffix; returns the files written."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "features": features.features.float().cpu(),
        "labels": features.labels.long().cpu(),
        "indices": features.indices.long().cpu(),
    }
    if out.suffix == ".pt":
        torch.save(arrays, out)
        return [out]
    if out.suffix == ".npz":
        np.savez(out, **{k: v.numpy() for k, v in arrays.items()})
        return [out]
    if out.suffix == ".npy":
        labels = out.with_name(f"{out.stem}_labels.npy")
        np.save(out, arrays["features"].numpy())
        np.save(labels, arrays["labels"].numpy())
        return [out, labels]
    raise EvalError(f"out={out}: write embeddings to a .pt, .npz or .npy file")


# ------------------------------------------------------------------------------ CLI plugin


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=WHAT, help="backbone weights, or embeddings of a split")
    parser.add_argument(
        "overrides", nargs="*", help="ckpt=PATH (required), out=PATH, split=, data=, data.KEY=V"
    )


def parse(args: list[str]) -> tuple[ExportConfig, list[str]]:
    from omegaconf import OmegaConf

    from lightning_gen.config import ConfigError, _check_keys, _typed

    dotted, data_overrides = [], []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(
                f"cannot read argument {arg!r}: arguments look like key=value, e.g. ckpt=last.ckpt"
            )
        (data_overrides if arg.startswith("data.") else dotted).append(arg)
    node = OmegaConf.from_dotlist(dotted)
    _check_keys(node, ExportConfig, "")
    cfg = OmegaConf.to_object(_typed(node, ExportConfig, ""))
    if not cfg.ckpt:
        raise ConfigError(
            "ckpt=PATH is required: the checkpoint to export from, e.g. runs/<exp>/<run>/checkpoints/last.ckpt"
        )
    return cfg, data_overrides


def default_out(cfg: ExportConfig, what: str, suffix: str) -> Path:
    from lightning_gen.eval.wandb_run import run_dir_of_checkpoint

    run_dir = run_dir_of_checkpoint(cfg.ckpt)
    folder = run_dir / "export" if run_dir else Path(cfg.ckpt).resolve().parent
    name = f"{Path(cfg.ckpt).stem}_{what if what == 'backbone' else cfg.split + '_embeddings'}{suffix}"
    return folder / name


def main(args) -> int:
    from lightning_gen.checkpoint import CheckpointError
    from lightning_gen.config import ConfigError
    from lightning_gen.methods.base import load_method

    try:
        cfg, data_overrides = parse(list(args.overrides))
        method = load_method(cfg.ckpt)
        if args.what == "backbone":
            state, described = export_backbone(method)
            out = Path(cfg.out) if cfg.out else default_out(cfg, "backbone", ".pt")
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, out)
            described["checkpoint"] = str(cfg.ckpt)
            out.with_suffix(".json").write_text(json.dumps(described, indent=2) + "\n")
            print(
                f"backbone of {method.registry_name}: {len(state)} tensors -> {out} (description: {out.with_suffix('.json')})"
            )
            if described["format"] == "torchvision":
                print(
                    "load it into torchvision:\n" + described["torchvision"].replace("PATH", repr(str(out)))
                )
            else:
                print(f"a {described['module']} state dict (not a torchvision architecture)")
            return 0
        from lightning_gen.eval.cli import EvalConfig, build_data
        from lightning_gen.eval.features import require_embed, split_features
        from lightning_gen.eval.wandb_run import run_dir_of_checkpoint

        require_embed(method)
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        datamodule = build_data(
            EvalConfig(ckpt=cfg.ckpt, data=cfg.data), method, run_dir_of_checkpoint(cfg.ckpt), data_overrides
        )
        if cfg.split not in datamodule.datasets and cfg.split != "train":
            raise EvalError(
                f"split={cfg.split}: {datamodule.registry_name} has {', '.join(datamodule.datasets)}"
            )
        features = split_features(method.to(device), datamodule, cfg.split, device)
        out = Path(cfg.out) if cfg.out else default_out(cfg, "embeddings", ".pt")
        written = save_embeddings(features, out)
        print(
            f"{len(features)} {cfg.split} embeddings of {features.features.shape[1]} dimensions "
            f"({method.registry_name} on {datamodule.registry_name}) -> {', '.join(map(str, written))}"
        )
    except (EvalError, ConfigError, CheckpointError) as error:
        print(f"lgen export: error: {error}", file=sys.stderr)
        return 2
    return 0
