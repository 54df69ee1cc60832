"""Sharded training (``trainer.strategy=fsdp``): FSDP2's ``fully_shard`` under Lightning's ModelParallelStrategy.

Every parameter, gradient and optimizer state is split over the ranks (ZeRO-3): a rank holds 1/W of
the model and gathers one block's weights at a time for its forward and backward. It is data
parallelism, as DDP is: each rank trains on its own batch and the gradients are averaged, so the
losses and gradients equal DDP's and one process's on the same global batch.

- **Units.** Every transformer block (ViT, DiT) and U-Net block (``sharded_block_types``) is gathered
  and freed on its own; everything else (patch and time embeddings, heads, the online probe) is one
  unit, the method itself. Momentum, teacher and EMA copies are sharded exactly like the networks
  they follow, so ``ema_update`` works shard by shard, without communication.
- **Entry points.** FSDP gathers a unit's weights when its ``forward`` runs. A method is not called
  through ``forward``: ``training_step``, ``validation_step``, ``embed``, ``sample``,
  ``images_for_logging`` ... are its entry points (``ENTRY_POINTS``), and each gathers the method's own
  unit. Every rank must run them together, the same number of times (a sharded forward is a
  collective): the image-grid callback runs on every rank and rank 0 saves, and the FID callback
  makes the same number of ``sample()`` calls on every rank.
- **Checkpoints.** One file, as with any other strategy: the full state is gathered onto rank 0's CPU
  (parameter by parameter) and written by ``AtomicCheckpointIO``, the optimizer state numbered as a
  plain optimizer numbers it; so resume, ``lgen eval``, ``lgen sample`` and ``lgen export`` read it
  like any checkpoint, and it resumes sharded or under DDP, on the same or another number of processes.
- **Buffers** are not sharded and, unlike DDP, not re-broadcast from rank 0 before each forward:
  BatchNorm must be global (``method.global_bn=true`` or ``trainer.sync_batchnorm=true``).

Lightning's own ``strategy="fsdp"`` (FSDP1) refuses CPUs; this one trains with gloo on CPU processes as
it does with NCCL on GPUs, which is how it is tested here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

STRATEGY_NAME = "fsdp"

# Methods a sharded run calls from outside (Lightning's loops, callbacks, samplers): each one gathers the
# method's own unit on entry. Calls nested inside one of them (validation_step -> embed) gather nothing more.
ENTRY_POINTS = (
    "training_step",
    "validation_step",
    "test_step",
    "predict_step",
    "forward",
    "embed",
    "embed_images",
    "sample",
    "images_for_logging",
)
# After these the method's own unit is freed again (after training_step it stays gathered for backward,
# which frees it).
_NO_BACKWARD = frozenset(ENTRY_POINTS) - {"training_step"}


def sharded_block_types() -> tuple[type[nn.Module], ...]:
    """The blocks that are gathered and freed one at a time: transformer blocks (ViT, DiT), U-Net blocks."""
    from lightning_gen.nets.dit import DiTBlock
    from lightning_gen.nets.unet import Attention, ResBlock
    from lightning_gen.nets.vit import Block

    return (Block, DiTBlock, ResBlock, Attention)


def shardable_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of ``module`` (its momentum / EMA copies included) that becomes its own FSDP unit."""
    types = sharded_block_types()
    return [m for m in module.modules() if isinstance(m, types)]


def unsupported_reason(method: nn.Module, batchnorm_agrees: bool = False) -> str | None:
    """Why ``method`` cannot train sharded, in a user's words; None when it can.

    ``batchnorm_agrees``: every BatchNorm sees the same statistics on every rank anyway (one process,
    or trainer.sync_batchnorm)."""
    from lightning_gen.nets.norm import GlobalBatchNorm

    name = getattr(method, "registry_name", type(method).__name__)
    if not shardable_blocks(method):
        return (
            f"method {name!r} has no transformer or U-Net blocks to shard (trainer.strategy=fsdp shards ViT "
            "methods - MAE, DINO, MoCo v3 with method.backbone.name=vit - and the diffusion networks, "
            "U-Net and DiT); use trainer.strategy=ddp"
        )
    if getattr(method, "automatic_optimization", True) is False:
        return f"method {name!r} steps its optimizers itself, which trainer.strategy=fsdp does not support"
    local_bn = [
        n
        for n, m in method.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm)
    ]
    if local_bn and not (batchnorm_agrees or getattr(getattr(method, "cfg", None), "global_bn", False)):
        return (
            f"method {name!r} has BatchNorm layers ({local_bn[0]}, ...) whose statistics would differ between "
            "ranks under trainer.strategy=fsdp (it does not broadcast buffers as DDP does): set "
            "method.global_bn=true or trainer.sync_batchnorm=true"
        )
    return None


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: data-parallel over every process, no tensor parallelism.

    Checkpoints are single files assembled on rank 0 (``save_distributed_checkpoint=False``), written
    through the trainer's CheckpointIO (atomic), so everything that reads checkpoints reads these."""

    strategy_name = STRATEGY_NAME

    def __init__(self, **kwargs: Any):
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        # Every process is one data-parallel rank; the mesh's size is only known once the devices are.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0, keyed as ``torch.optim.Optimizer.state_dict`` keys it.

        Lightning numbers the parameters in the model's order; a plain optimizer numbers them in its
        parameter groups' order. In that layout a checkpoint of a sharded run resumes under DDP or on one
        process, and theirs resume sharded."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.global_rank != 0:
            return state  # empty: only rank 0 writes
        return FullyShardedDataParallel.rekey_optim_state_dict(
            state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a single-file checkpoint (of this strategy, DDP or one process) into the sharded model and
        optimizers; returns the rest of the checkpoint for Lightning's loops and callbacks."""
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        path = self.broadcast(checkpoint_path)
        # weights_only=False: the checkpoint holds the random streams' NumPy and Python states (a file
        # written by lgen train, read as AtomicCheckpointIO reads every other strategy's)
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=False)
        strict = self.lightning_module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            by_name = FullyShardedDataParallel.rekey_optim_state_dict(
                state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer
            )
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name, options=options)
        return checkpoint


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (a method) has been sharded by ``shard_method``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_method(method: nn.Module, mesh) -> None:
    """``fully_shard`` every block of ``method``, then the method itself, over the 1-D ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(method):  # configure_model runs again for every trainer.fit / validate
        return
    # FSDP shards contiguous parameters only: conv weights go back from channels_last to the default layout
    # (channels_last activations still make the convolutions run channels_last)
    method.to(memory_format=torch.contiguous_format)
    for block in shardable_blocks(method):
        fully_shard(block, mesh=mesh)
    fully_shard(method, mesh=mesh)
    for name in ENTRY_POINTS:
        if hasattr(method, name):
            _gather_on_entry(method, name)


def _gather_on_entry(method: nn.Module, name: str) -> None:
    """Make ``method.<name>`` an FSDP forward of the method's own unit (outermost call only).

    ``torch.distributed.fsdp.register_fsdp_forward_method`` does the same for one method; here the
    entry points call each other (validation_step -> embed), and a nested call must neither gather
    again nor end the outer call's forward."""
    original = getattr(method, name)
    state = method._get_fsdp_state()

    @functools.wraps(original)
    def entry(*args, **kwargs):
        if method.__dict__.get("_lgen_fsdp_depth", 0):
            return original(*args, **kwargs)
        method.__dict__["_lgen_fsdp_depth"] = 1
        try:
            args, kwargs = state._pre_forward(method, args, kwargs)
            out = state._post_forward(method, args, original(*args, **kwargs))
        finally:
            method.__dict__["_lgen_fsdp_depth"] = 0
        if name in _NO_BACKWARD and not torch.is_grad_enabled():
            method.reshard()  # no backward will free the gathered weights: free them now
        return out

    method.__dict__[name] = entry
