"""Shared machinery of every method: config, optimizer groups, LR scaling and schedules, online probe.

A method subclasses ``Method``, declares its config dataclass (subclass of ``MethodConfig``) and
registers both with ``@register_method``. What a method file then has to write is only what its
paper says: the networks, ``training_step`` and ``embed`` (representations) or ``sample``
(generators).

Images arrive as uint8 tensors (N, C, H, W) straight from the DataModule; ``to_float`` moves them
to the method's value range on the device, where augmentations run batched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_gen import schedules
from lightning_gen.config import bounded, choice
from lightning_gen.device_constants import device_constant
from lightning_gen.losses.classification import labeled_cross_entropy


@dataclass
class DataInfo:
    """What a method needs to know about its data before seeing a batch."""

    name: str = "digits"
    channels: int = 1
    image_size: int = 32
    num_classes: int = 10
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    batch_size: int = 128  # per device


@dataclass
class MethodConfig:
    name: str = ""
    optimizer: str = choice("adamw", "adam", "adamw", "sgd", "lars")
    lr: float = bounded(
        1e-3, 0
    )  # at the reference batch size `base_batch_size` when `lr_scaling` is not "none"
    lr_scaling: str = choice("none", "none", "linear", "sqrt")  # against the *global* batch
    base_batch_size: int = bounded(256, 1)
    weight_decay: float = bounded(0.0, 0)
    momentum: float = bounded(0.9, 0, 1, high_open=True)  # SGD / LARS momentum
    betas: tuple[float, float] = bounded((0.9, 0.999), 0, 1, high_open=True)  # Adam(W)'s moment decays
    exclude_bias_norm: bool = True  # no weight decay (and no LARS adaptation) on biases and norms
    schedule: str = choice("cosine", "cosine", "constant", "step")
    warmup_epochs: float = bounded(0.0, 0)
    min_lr_ratio: float = bounded(0.0, 0, 1)
    # schedule=step: the LR is multiplied by lr_step_factor at each of these fractions of training
    # (MoCo v1: epochs 120 and 160 of 200)
    lr_steps: list[float] = field(default_factory=lambda: [0.6, 0.8])
    lr_step_factor: float = bounded(0.1, 0, 1)
    online_probe: bool = True  # linear classifier on detached features, trained alongside
    probe_lr: float = bounded(1e-2, 0)


class Method(L.LightningModule):
    """Base LightningModule of all methods (not registered itself)."""

    config_class: type[MethodConfig] = MethodConfig  # each method names its own config dataclass
    # metric and mode the best checkpoint is chosen by (None: no logged number measures quality)
    monitor: tuple[str, str] | None = ("val/loss", "min")
    is_generative: bool = False
    # The networks that dominate a training step, where a method has them: trainer.compile=true compiles
    # these (encoders, momentum/teacher copies, the U-Net), not the small heads or the losses.
    compiled_networks: tuple[str, ...] = ("backbone", "backbone_k", "teacher_backbone", "encoder", "net")

    def __init__(self, cfg: MethodConfig, data: DataInfo | None = None):
        super().__init__()
        if isinstance(cfg, dict):  # the plain-dict form stored in checkpoints
            cfg = _dataclass_from_dict(self.config_class, cfg)
        if isinstance(data, dict):
            data = _dataclass_from_dict(DataInfo, data)
        self.cfg = cfg
        self.data_info = data or DataInfo()
        # Plain dicts in the checkpoint: `load_method` rebuilds the exact method from them alone.
        self.save_hyperparameters(
            {
                "method": self.registry_name,
                "cfg": dataclasses.asdict(cfg),
                "data": dataclasses.asdict(self.data_info),
            }
        )
        self.online_probe: nn.Module | None = None

    @classmethod
    def from_hyperparameters(cls, cfg: MethodConfig, data: DataInfo, hparams: dict) -> Method:
        """The method as ``load_method`` builds it from a checkpoint's hyperparameters, before loading its
        state dict. A method whose networks depend on more than its config and data (latent diffusion: the
        frozen autoencoder's architecture, stored beside them) reads the rest of ``hparams`` here."""
        return cls(cfg, data)

    def compile_networks(self) -> list[str]:
        """``torch.compile`` the networks in ``compiled_networks`` in place; returns their names.

        ``nn.Module.compile`` keeps the parameter names (checkpoints load both ways) and the
        parameters themselves, so momentum/EMA updates and optimizers are unaffected.
        """
        names = [n for n in self.compiled_networks if isinstance(getattr(self, n, None), nn.Module)]
        for name in names:
            getattr(self, name).compile()
        return names

    # ---------------------------------------------------------------- data in
    def to_float(self, images: torch.Tensor, value_range: str = "unit") -> torch.Tensor:
        """uint8 (N, C, H, W) -> float. ``unit``: [0, 1]; ``symmetric``: [-1, 1]; ``standard``: mean/std."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if value_range == "symmetric":
            x = x * 2.0 - 1.0
        elif value_range == "standard":
            mean = device_constant(self.data_info.mean, x.device).view(1, -1, 1, 1)
            std = device_constant(self.data_info.std, x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        if self._use_channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _use_channels_last(self) -> bool:
        trainer = self._trainer
        return bool(trainer is not None and getattr(trainer, "lgen_channels_last", False))

    # ---------------------------------------------------------------- what evaluation uses
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Representation (N, D) of float images as produced by ``to_float``. Representation methods override."""
        raise NotImplementedError(
            f"method {self.registry_name!r} does not expose embed(x): it learns no encoder"
        )

    def log_value(self, name: str, value: float, **kwargs) -> None:
        """``self.log`` for a Python number (a scheduled LR, τ, temperature) without a host-to-device copy.

        Lightning turns a number into ``torch.tensor(value, device=self.device)``, a blocking copy on
        a GPU at every step; ``torch.full`` writes it on the device from a kernel argument instead."""
        self.log(name, torch.full((), float(value), device=self.device), **kwargs)

    def log_loss(self, stage: str, loss: torch.Tensor) -> None:
        """``<stage>/loss``: per step and epoch while training (rank-local, no sync in the hot loop),
        the epoch mean over all ranks in validation."""
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=True, sync_dist=not train)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Representation of uint8 images, with this method's own preprocessing."""
        return self.embed(self.to_float(images, self.embed_value_range))

    embed_value_range = "standard"

    def sample(self, n: int, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``n`` images in [0, 1], shape (n, C, H, W). Generative methods override."""
        raise NotImplementedError(f"method {self.registry_name!r} is not a generator: it cannot sample")

    def images_for_logging(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named image batches in [0, 1] that the image-grid callback saves (reconstructions, samples...)."""
        return {}

    # ---------------------------------------------------------------- online linear probe
    def setup_online_probe(self, feature_dim: int) -> None:
        """Call in ``__init__`` of representation methods: a linear head on detached features."""
        if self.cfg.online_probe and self.data_info.num_classes > 0:
            self.online_probe = nn.Linear(feature_dim, self.data_info.num_classes)

    def probe_loss(self, features: torch.Tensor, labels: torch.Tensor, stage: str) -> torch.Tensor:
        """Cross-entropy of the online probe on *detached* features (unlabeled samples have label -1).

        The probe is a parameter group of the method's own optimizer, so it needs no second
        optimizer and no second DDP wrapper; detaching keeps its gradient out of the backbone.
        Loss and accuracy are over the labeled samples of the batch (``labeled_cross_entropy``;
        a batch without labels logs accuracy 0, and trains nothing).
        """
        if self.online_probe is None:
            return features.new_zeros(())
        logits = self.online_probe(features.detach().float())
        loss, acc = labeled_cross_entropy(logits, labels)
        on_step = stage == "train"
        self.log(
            f"{stage}/probe_acc",
            acc,
            on_step=on_step,
            on_epoch=True,
            sync_dist=not on_step,
            prog_bar=stage == "val",
        )
        self.log(f"{stage}/probe_loss", loss, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        return loss

    # ---------------------------------------------------------------- optimisation
    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: per-device batch x devices x nodes x accumulation."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.data_info.batch_size * self.world_size * accumulate

    def lr_scale(self, global_batch: int) -> float:
        """The factor ``lr_scaling`` applies to a learning rate given at ``base_batch_size``."""
        ratio = global_batch / self.cfg.base_batch_size
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.cfg.lr_scaling]

    def scaled_lr(self, lr: float | None = None) -> float:
        lr = self.cfg.lr if lr is None else lr
        return lr * self.lr_scale(self.global_batch_size)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the main optimizer trains (momentum/EMA copies and the probe excluded)."""
        skip = {"online_probe", *self.frozen_module_names()}
        return {name: m for name, m in self.named_children() if name not in skip}

    def frozen_module_names(self) -> set[str]:
        """Children updated without gradients (momentum encoders, EMA copies)."""
        return set()

    def buffers_identical_on_all_ranks(self) -> list[str]:
        """Buffers every rank maintains identically by construction (MoCo's queue, EMA counters).

        DDP re-broadcasts every buffer from rank 0 before each forward; these are left out of that
        (MoCo's 65536 x 128 queue would be 32 MB per step for nothing)."""
        return []

    def setup(self, stage: str) -> None:
        # Read by DDP when Lightning wraps the module, which happens after this hook.
        self._ddp_params_and_buffers_to_ignore = list(self.buffers_identical_on_all_ranks())

    def configure_model(self) -> None:
        """trainer.strategy=fsdp: shard the networks over the data-parallel ranks (``lightning_gen.sharding``).

        Lightning calls this once the process group is up; its device mesh exists only under that strategy."""
        if self.device_mesh is not None:
            from lightning_gen.sharding import shard_method

            shard_method(self, self.device_mesh["data_parallel"])

    def parameter_groups(self, modules: dict[str, nn.Module], lr: float, weight_decay: float) -> list[dict]:
        decay, no_decay = [], []
        for module in modules.values():
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                is_bias_or_norm = p.ndim <= 1 or name.endswith(".bias")
                (no_decay if self.cfg.exclude_bias_norm and is_bias_or_norm else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "base_lr": lr}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "exclude_lars": True})
        return [g for g in groups if g["params"]]

    def build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        from lightning_gen.optim import build_optimizer

        return build_optimizer(self.cfg, groups)

    def configure_optimizers(self):
        groups = self.parameter_groups(self.trainable_modules(), self.scaled_lr(), self.cfg.weight_decay)
        if self.online_probe is not None:
            groups.append(
                {
                    "params": list(self.online_probe.parameters()),
                    "weight_decay": 0.0,
                    "base_lr": self.cfg.probe_lr,
                    "exclude_lars": True,
                    "fixed_lr": True,
                }
            )
        return self.build_optimizer(groups)

    def progress(self) -> schedules.Progress:
        """How far training is (``schedules.training_progress``): what every schedule is a function of."""
        return schedules.training_progress(self.trainer)

    def lr_factor(self, progress: schedules.Progress) -> float:
        warmup = progress.steps(self.cfg.warmup_epochs)
        if self.cfg.schedule == "step":
            return schedules.warmup_step_decay(
                progress.step, progress.total, warmup, self.cfg.lr_steps, self.cfg.lr_step_factor
            )
        return schedules.LR_SCHEDULES[self.cfg.schedule](
            progress.step, progress.total, warmup, self.cfg.min_lr_ratio
        )

    def on_train_batch_start(self, batch, batch_idx):
        # Stateless LR: a function of training progress, so a resumed run lands on the same values,
        # on the allocation it started with or on another one.
        factor = self.lr_factor(self.progress())
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                base = group.setdefault("base_lr", group["lr"])
                group["lr"] = base if group.get("fixed_lr") else base * factor
        self.log_value("lr", self._optimizers()[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ---------------------------------------------------------------- resuming on another allocation
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["global_batch_size"] = self.global_batch_size  # what the saved peak LR was scaled for

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_global_batch = checkpoint.get("global_batch_size")

    def on_train_start(self) -> None:
        # The optimizer state (with each group's peak LR) is restored by now: rescale it if the
        # checkpoint was written at another global batch (another world size, batch or accumulation).
        old, new = getattr(self, "_resumed_global_batch", None), self.global_batch_size
        self._resumed_global_batch = None
        if old is None or old == new:
            return
        factor = self.lr_scale(new) / self.lr_scale(old)
        groups = [g for opt in self._optimizers() for g in opt.param_groups if not g.get("fixed_lr")]
        if not groups:
            return
        before = groups[0].setdefault("base_lr", groups[0]["lr"])
        for group in groups:
            group["base_lr"] = group.setdefault("base_lr", group["lr"]) * factor
        rank_zero_warn(
            f"[lgen] the checkpoint was trained at a global batch of {old}, this run's is {new} "
            f"(method.lr_scaling={self.cfg.lr_scaling}): peak learning rate {before:.6g} -> "
            f"{groups[0]['base_lr']:.6g}; every schedule continues at the same training progress"
        )

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = self.optimizers(use_pl_optimizer=False)
        return optimizers if isinstance(optimizers, list) else [optimizers]


def _dataclass_from_dict(cls: type, values: dict[str, Any]):
    """Rebuild a (possibly nested) config dataclass from the plain dict stored in a checkpoint."""
    from omegaconf import OmegaConf

    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in values.items() if k in names}  # tolerate keys of older versions
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), known))


def load_method(checkpoint_path: str, map_location: str = "cpu") -> Method:
    """Rebuild a method from a checkpoint written by `lgen train` (any method, no config needed)."""
    from lightning_gen import registry
    from lightning_gen.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path, map_location=map_location)
    hparams = checkpoint.get("hyper_parameters", {})
    if "method" not in hparams:
        raise ValueError(
            f"{checkpoint_path} was not written by lightning_gen: it has no method name in its hyperparameters"
        )
    entry, cfg = registry.checkpoint_method(hparams["method"], hparams["cfg"])
    model = entry.cls.from_hyperparameters(
        _dataclass_from_dict(entry.config, cfg), _dataclass_from_dict(DataInfo, hparams["data"]), hparams
    )
    model.on_load_checkpoint(checkpoint)  # as Lightning does: before the state dict, which it may adapt
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float | torch.Tensor) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameters and float buffers alike.

    Used by momentum encoders (MoCo's key encoder and head, DINO's teacher) and EMA weights of
    generators. Integer buffers (BatchNorm's num_batches_tracked) are copied. ``momentum`` may be a
    0-d device tensor (a generator's warm-up decay), so that no step reads it back into Python.
    """
    weight = 1.0 - momentum
    weights: dict[torch.dtype, float | torch.Tensor] = {}

    def weight_for(t: torch.Tensor) -> float | torch.Tensor:
        if not isinstance(weight, torch.Tensor):
            return weight
        if t.dtype not in weights:  # lerp_ takes a tensor weight of the target's own dtype
            weights[t.dtype] = weight.to(t.dtype)
        return weights[t.dtype]

    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s.detach(), weight_for(t))
    for t, s in zip(target.buffers(), source.buffers()):
        if t.dtype.is_floating_point:
            t.lerp_(s.detach(), weight_for(t))
        else:
            t.copy_(s)
