"""Run one training step of any registered method, as `lgen train` runs it, under ``HostSyncCounter``.

Shared by tests/test_sync_free.py and benchmarks/host_syncs.py. Each method trains on the embedded
digits at 16 px with tiny widths; the counted step is the *second* batch (the first one creates the
optimizer state and every lazily built buffer), and the window runs from ``on_train_batch_start``
to the end of the last callback's ``on_train_batch_end``: the method's hooks, forward, backward,
optimizer step, momentum/EMA updates, the non-finite guard and the signal check. Lightning's own
flush of logged values to the loggers (every ``trainer.log_every_n_steps``) comes after it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_gen import registry, run
from lightning_gen.config import compose
from lightning_gen.host_sync import CountStepSyncs, HostSyncCounter

# method name -> experiment (or method/data selection) and overrides that make it tiny
TINY: dict[str, list[str]] = {
    "autoencoder": ["experiment=ae_digits", "method.width=8", "method.latent_dim=8"],
    "barlow_twins": ["experiment=barlow_twins_digits", "method.proj_hidden_dim=32", "method.proj_dim=32"],
    "byol": [
        "experiment=byol_digits",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
        "method.pred_hidden_dim=32",
    ],
    "colorization": [
        "experiment=colorization_digits",
        "method.backbone.conv_width=8",
        "method.backbone.conv_dim=32",
    ],
    "cpc": ["experiment=cpc_digits", "method.backbone.conv_dim=32", "method.context_dim=32"],
    # the ddpm preset of the diffusion method: DDPM's discrete chain, eps-prediction, guidance
    "diffusion": [
        "experiment=ddpm_cfg_digits",
        "method.width=8",
        "method.mults=[1,2]",
        "method.timesteps=20",
    ],
    "dino": [
        "experiment=dino_digits",
        "method.out_dim=64",
        "method.hidden_dim=32",
        "method.bottleneck_dim=16",
    ],
    "gan": ["experiment=gan_digits", "method.g_width=8", "method.d_width=8", "method.z_dim=8"],
    "inpainting": [
        "experiment=inpainting_digits",
        "method.backbone.conv_width=8",
        "method.backbone.conv_dim=32",
    ],
    "jigsaw": ["experiment=jigsaw_digits", "method.num_permutations=10"],
    "latent_autoencoder": [
        "experiment=latent_autoencoder_digits",
        "method.channels=[8,8]",
        "method.norm_groups=4",
        "method.disc_width=8",
        "method.disc_start_epochs=0",  # the step counted trains the discriminator and the adaptive weight
    ],
    "mae": ["experiment=mae_digits"],
    "moco": [
        "experiment=moco_v2_digits",
        "method.queue_size=64",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
    ],
    "pixelcnn": ["experiment=pixelcnn_digits", "method.width=8", "method.blocks=1"],
    "relative_patch": ["experiment=relative_patch_digits"],
    "rotation": ["experiment=rotation_digits"],
    "simclr": ["experiment=simclr_digits", "method.proj_hidden_dim=32", "method.proj_dim=16"],
    "simsiam": [
        "experiment=simsiam_digits",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
        "method.pred_hidden_dim=16",
    ],
    "supervised": ["method=supervised", "data=digits", "method.backbone.name=conv"],
    "token_ar": ["experiment=token_ar_digits", "method.width=16", "method.depth=1", "method.heads=2"],
    "distill": ["experiment=distill_digits", "method.start_steps=2"],
    "swav": [
        "experiment=swav_digits",
        "method.queue_size=16",
        "method.queue_start_epoch=0",
        "method.num_prototypes=10",
        "method.freeze_prototypes_epochs=0",
    ],
    "vq_autoencoder": [
        "experiment=vq_digits",
        "method.channels=[8,8]",
        "method.norm_groups=4",
        "method.latent_channels=8",
        "method.code_dim=4",
        "method.codebook_size=16",
        "method.disc_width=8",
        "method.disc_start_epochs=0",
    ],
    "vae": ["experiment=vae_digits", "method.width=8", "method.latent_dim=4"],
    "vicreg": ["experiment=vicreg_digits", "method.proj_hidden_dim=32", "method.proj_dim=32"],
}
# variants whose step differs from the method's default: MoCo v3 (no queue, symmetric loss, ViT-free)
VARIANTS: dict[str, list[str]] = {
    "moco_v3": [
        "experiment=moco_v3_digits",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
        "method.pred_hidden_dim=32",
    ],
    "distill_consistency": [
        "experiment=distill_digits",
        "method.algorithm=consistency",
        "method.grid_points=4",
        "method.target_decay=0.9",
    ],
    "gated_pixelcnn": ["experiment=gated_pixelcnn_digits", "method.width=8", "method.blocks=1"],
    # the flow preset (continuous time, velocity target) and the DiT network on a continuous VE process
    "flow": ["experiment=flow_digits", "method.width=8", "method.mults=[1,2]", "method.conditional=true"],
    "diffusion_dit": [
        "experiment=flow_digits",
        "method.net=dit",
        "method.dit.preset=T/4",
        "method.process=ve",
        "method.prediction=x",
        "method.conditional=true",
    ],
    # latent diffusion: the frozen autoencoder (STAGE1) encodes every batch
    "latent_diffusion": [
        "experiment=ldm_dit_digits",
        "method.dit.patch_size=2",
        "method.dit.depth=1",
        "method.dit.width=16",
        "method.dit.heads=2",
    ],
}
# methods built on another model (a tokenizer, a teacher): an untrained one of this recipe, saved as a
# checkpoint that the method's config field names (the model a stage 1 would train)
STAGE1: dict[str, list[str]] = {
    "token_ar": [
        "experiment=vq_digits",
        "method.channels=[8,8]",
        "method.norm_groups=4",
        "method.latent_channels=8",
        "method.code_dim=4",
        "method.codebook_size=16",
        "method.disc_width=8",
    ],
    "latent_diffusion": [
        "experiment=latent_autoencoder_digits",
        "method.channels=[8,8]",
        "method.norm_groups=4",
        "method.latent_channels=2",
    ],
    "distill": [
        "experiment=flow_digits",
        "method.width=8",
        "method.mults=[1,2]",
        "method.conditional=true",
    ],
}
# variants of a method's step: another algorithm
VARIANTS_STAGE1 = {"distill_consistency": "distill"}
# after COMMON: image sizes at which the tiles still move (their random jitter is part of the step)
SIZES: dict[str, list[str]] = {
    "jigsaw": ["method.grid=2"],
    "relative_patch": ["data.image_size=24"],
}
COMMON = [
    "data.image_size=16",
    "data.batch_size=8",
    "data.max_train_samples=64",
    "trainer.limit_train_batches=3",  # LogEveryEpoch caps log_every_n_steps at 3: batch 1 is not an agreement step
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "logger.wandb.enabled=false",
    "logger.csv=false",
]


def untrained_stage1(name: str, run_dir: Path) -> list[str]:
    """The override naming an untrained stage-1 model of ``name``'s recipe, saved in ``run_dir``."""
    recipe = STAGE1.get(VARIANTS_STAGE1.get(name, name))
    if recipe is None:
        return []
    stage_cfg = compose([*recipe, *COMMON])
    model = run.build_method(stage_cfg, run.build_datamodule(stage_cfg))
    path = Path(run_dir) / f"{name}_stage1.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    method = compose(TINY.get(name) or VARIANTS[name]).method.name
    return [f"method.{registry.get('method', method).cls.stage1_input.field}=ckpt:{path}"]


def config(name: str, *extra: str, run_dir: Path | None = None):
    """``run_dir``: where a method built on another model (``STAGE1``) finds an untrained one."""
    overrides = TINY.get(name) or VARIANTS[name]
    if VARIANTS_STAGE1.get(name, name) in STAGE1 and run_dir is None:
        raise ValueError(f"{name} is built on another model: say where to write it (run_dir)")
    stage1 = untrained_stage1(name, run_dir) if run_dir is not None else []
    cfg = compose([*overrides, *COMMON, *SIZES.get(name, []), *stage1, *extra])
    for section in (cfg.callbacks or {}).values():  # evaluation callbacks run at epoch ends, not in a step
        section.enabled = False
    return cfg


def count_training_step(
    name: str, run_dir: Path, raw: bool = False, step: int = 1, extra: tuple[str, ...] = ()
) -> HostSyncCounter:
    """Train ``name`` as `lgen train` would and count the host syncs of batch ``step`` (0-based)."""
    cfg = config(name, *extra, run_dir=run_dir)
    datamodule = run.build_datamodule(cfg)
    method = run.build_method(cfg, datamodule)
    counting = CountStepSyncs(step=step, raw=raw)
    trainer = run.build_trainer(cfg, run.build_callbacks(cfg, method, run_dir, validates=False), [], run_dir)
    counting.install(trainer)
    L.seed_everything(0, verbose=False)
    trainer.fit(method, datamodule=datamodule)
    assert counting.counter is not None and counting.counted, f"{name}: training step {step} never ran"
    return counting.counter
