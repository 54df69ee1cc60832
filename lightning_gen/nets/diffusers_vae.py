"""Read a published KL autoencoder in the diffusers layout from local files, without diffusers.

A diffusers ``AutoencoderKL`` folder (e.g. the ``vae/`` folder of a Stable Diffusion snapshot) holds

    config.json                                    the architecture and the latent scaling
    diffusion_pytorch_model.safetensors  or  .bin  the state dict

``config.json`` keys read: ``in_channels``, ``out_channels``, ``block_out_channels``,
``layers_per_block``, ``latent_channels``, ``norm_num_groups``, ``act_fn`` (silu),
``down_block_types`` / ``up_block_types`` (DownEncoderBlock2D / UpDecoderBlock2D), ``scaling_factor``,
``shift_factor``, ``use_quant_conv``, ``use_post_quant_conv``, ``mid_block_add_attention``,
``sample_size``. Latents for a diffusion model are (z - shift_factor) * scaling_factor (Stable
Diffusion 1/2: scaling 0.18215, no shift).

``.safetensors`` is read here (the format is an 8-byte little-endian header length, a JSON header of
name -> dtype, shape and byte offsets, then the raw tensor bytes), so the safetensors package is not
needed; ``.bin`` files are read with ``torch.load(weights_only=True)``. Older files name the
attention projections ``query``/``key``/``value``/``proj_attn`` (1x1 convs in the original LDM code);
they are renamed and reshaped to this class's linear layers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_gen.checkpoint import CheckpointError
from lightning_gen.config import ConfigError
from lightning_gen.nets.kl_autoencoder import KLAutoencoder

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class PretrainedAutoencoder:
    """A loaded diffusers-layout autoencoder: the network, its latent scaling and where it came from."""

    net: KLAutoencoder
    scaling_factor: float
    shift_factor: float
    config: dict = field(default_factory=dict)
    weights: Path | None = None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (little-endian host assumed, as the format is)."""
    raw = Path(path).read_bytes()
    try:
        (header_size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_size])
    except (struct.error, ValueError) as error:
        raise CheckpointError(f"{path} is not a safetensors file ({error})") from error
    data = bytearray(raw[8 + header_size :])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not supported")
        begin, end = entry["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.reshape(entry["shape"]).clone()
    return tensors


def find_files(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights) for a folder, a pipeline folder with vae/, or a weights file."""
    path = Path(path).expanduser()
    if path.is_file():
        folder, weights = path.parent, path
    else:
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not found:
            raise CheckpointError(
                f"no autoencoder weights in {folder}: expected {' or '.join(WEIGHT_FILES)} "
                f"(the diffusers AutoencoderKL layout)"
            )
        weights = found[0]
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"no config.json beside {weights}: a diffusers AutoencoderKL folder has both")
    return config, weights


def build_from_config(config: dict, where: str = "config.json") -> KLAutoencoder:
    """The network a diffusers AutoencoderKL config describes; unsupported variants are one-line errors."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ConfigError(f"{where} describes a {name}; only AutoencoderKL (the KL autoencoder) is supported")
    if config.get("act_fn", "silu") != "silu":
        raise ConfigError(f"{where}: act_fn {config['act_fn']!r} is not supported (only silu)")
    for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        others = sorted(set(config.get(key, [expected])) - {expected})
        if others:
            raise ConfigError(f"{where}: {key} {others} are not supported (only {expected})")
    widths = tuple(config.get("block_out_channels", (64,)))
    if len(config.get("down_block_types", widths)) != len(widths):
        raise ConfigError(f"{where}: down_block_types and block_out_channels differ in length")
    try:
        return KLAutoencoder(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            block_out_channels=widths,
            layers_per_block=config.get("layers_per_block", 1),
            latent_channels=config.get("latent_channels", 4),
            norm_num_groups=config.get("norm_num_groups", 32),
            mid_block_attention=config.get("mid_block_add_attention", True),
            use_quant_conv=config.get("use_quant_conv", True),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
        )
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error


def rename_deprecated(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old attention names and 1x1-conv attention weights -> this class's names and linear weights."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in DEPRECATED_ATTENTION_NAMES:
            key = ".".join([*parts[:-2], DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
        if ".attentions." in key and key.endswith(".weight") and value.ndim == 4 and "group_norm" not in key:
            value = value[:, :, 0, 0]
        renamed[key] = value
    return renamed


def load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load every tensor; a missing, extra or misshapen one is a CheckpointError naming the first few."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if misshapen:
        first = misshapen[0]
        problems.append(
            f"{len(misshapen)} of another shape (e.g. {first}: {tuple(state[first].shape)} in the file, "
            f"{tuple(expected[first].shape)} in the config's architecture)"
        )
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: tensors {'; '.join(problems)}")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_pretrained_autoencoder(path: str | Path) -> PretrainedAutoencoder:
    """The AutoencoderKL at ``path`` (folder, pipeline folder with vae/, or weights file), in float32."""
    config_path, weights = find_files(path)
    config = json.loads(config_path.read_text())
    net = build_from_config(config, str(config_path))
    if weights.suffix == ".safetensors":
        state = read_safetensors(weights)
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"cannot read {weights} ({type(error).__name__}: {error})") from error
    load_state(net, rename_deprecated(state), weights)
    return PretrainedAutoencoder(
        net.eval(),
        float(config.get("scaling_factor", 0.18215)),
        float(config.get("shift_factor") or 0.0),
        config,
        weights,
    )
