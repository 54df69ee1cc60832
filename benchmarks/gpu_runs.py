"""The training stages of ``benchmarks/gpu_check.sh``, and ``plan``: every config they use, composed and checked.

    python benchmarks/gpu_runs.py plan --gpus 2             # no GPU needed: compose every run's config, print the plan
    python benchmarks/gpu_runs.py methods --out gpu_check   # every method family, a few steps (see FAMILIES)
    python benchmarks/gpu_runs.py fsdp --out gpu_check --gpus 1
    python benchmarks/gpu_runs.py nccl --out gpu_check --gpus 2

- ``methods``: one digits experiment of every method family trains 4 steps and validates, in this one
  process, under ``trainer.precision=auto``, the generators with the FID callback on, and every
  training step after the first (``on_train_batch_start`` to ``on_train_batch_end``: forward,
  backward, optimizer step) inside ``torch.cuda.set_sync_debug_mode("error")``: an operation that
  waits for the GPU fails the run and names itself. ``host_sync.CountStepSyncs`` also counts the
  second step's host synchronisations (on CPU runs too, where they are simulated). One row per run.
- ``fsdp``: ``lgen train experiment=mae_digits trainer.strategy=fsdp`` on min(2, GPUs) GPUs, stopped
  mid-epoch, resumed to its end and exported; on one GPU also ``distributed_equality.py`` on one rank
  (FSDP on CUDA vs the plain model).
- ``nccl`` (2 GPUs or more): ``distributed_equality.py`` on 2 NCCL ranks (one process vs 2 DDP vs 2
  FSDP ranks: losses, gradients, weights) and a 2-GPU DDPM run whose FID has fewer sample chunks than
  ranks.

``--cpu`` runs the same on CPU processes with tiny settings, to try the plumbing without a GPU (the
numbers then mean nothing; the sync check is a no-op).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_gen.host_sync import CountStepSyncs  # noqa: E402

# (run, family, overrides): one run per method family, on digits (no download, seconds per run on a GPU)
FAMILIES = [
    ("ae_digits", "autoencoder", []),
    ("vae_digits", "variational autoencoder", []),
    ("latent_autoencoder_digits", "latent-diffusion autoencoder (KL, PatchGAN)", []),
    ("gan_digits", "GAN (two optimizers, manual optimization)", []),
    ("ddpm_digits", "diffusion, DDPM preset (U-Net)", []),
    ("flow_digits", "diffusion, rectified-flow preset (U-Net)", []),
    (
        "dit_flow_digits",
        "diffusion transformer (DiT, flow preset)",
        ["experiment=flow_digits", "method.net=dit"],
    ),
    ("pixelcnn_digits", "autoregressive", []),
    ("simclr_digits", "contrastive", []),
    ("moco_v2_digits", "contrastive, momentum encoder and queue", []),
    ("cpc_digits", "contrastive predictive coding", []),
    ("byol_digits", "non-contrastive, momentum target", []),
    ("barlow_twins_digits", "redundancy reduction", []),
    ("swav_digits", "clustering (Sinkhorn)", []),
    ("dino_digits", "self-distillation, multi-crop", []),
    ("rotation_digits", "pretext classification", []),
    ("jigsaw_digits", "pretext permutations", []),
    ("colorization_digits", "pretext dense prediction", []),
    ("inpainting_digits", "pretext inpainting (adversarial)", []),
    ("mae_digits", "masked image modelling (ViT)", []),
    # two-stage experiments: stage 1 (autoencoder, tokenizer, teacher) trains first for as few steps
    ("ldm_dit_digits", "latent diffusion (DiT on a frozen KL autoencoder)", ["experiment=ldm_dit_digits"]),
    ("token_ar_digits", "VQ tokenizer + autoregressive Transformer", ["experiment=token_ar_digits"]),
    ("distill_digits", "few-step distillation of a diffusion teacher", ["experiment=distill_digits"]),
]
TWO_STAGE = {"ldm_dit_digits", "token_ar_digits", "distill_digits"}
GENERATORS = {
    "vae_digits",
    "gan_digits",
    "ddpm_digits",
    "flow_digits",
    "dit_flow_digits",
    "pixelcnn_digits",
    *TWO_STAGE,
}
STEPS = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.precision=auto",
    "logger.wandb.enabled=false",
    "callbacks.embedding_plot.enabled=false",  # t-SNE: CPU seconds that say nothing about the GPU
    "resume=never",
]
FID = [
    "callbacks.fid.enabled=true",
    "callbacks.fid.every_n_epochs=1",
    "callbacks.fid.num_samples=200",
    "callbacks.fid.batch_size=100",
    "callbacks.fid.kid_subsets=5",
]
CPU = [
    "trainer.accelerator=cpu",
    "data.batch_size=16",
    "trainer.limit_train_batches=2",
]  # --cpu: plumbing only
CPU_FID = ["callbacks.fid.num_samples=20", "callbacks.fid.batch_size=20"]
# stage 1 of a two-stage experiment: a few steps, no FID (its own stage-2 run is what is checked)
STAGE1 = [
    "stage1.trainer.max_epochs=1",
    "stage1.trainer.limit_train_batches=4",
    "stage1.trainer.limit_val_batches=2",
    "stage1.trainer.num_sanity_val_steps=0",
]


class SyncDebug(L.Callback):
    """Every training step but the first (batch start to batch end) inside
    ``torch.cuda.set_sync_debug_mode(mode)``: the first one builds the optimizer state and the lazily
    made buffers (``host_sync.CountStepSyncs`` counts from the second one too)."""

    def __init__(self, mode: str = "error"):
        self.mode = mode

    def _set(self, mode: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(mode)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step > 0 or batch_idx > 0:
            self._set(self.mode)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._set("default")

    def on_exception(self, trainer, module, exception):
        self._set("default")


def lgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_gen", *args]


def equality(ranks: int, device: str) -> list[str]:
    """benchmarks/distributed_equality.py on ``ranks`` processes."""
    script = str(REPO / "benchmarks" / "distributed_equality.py")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*run, script, f"--device={device}"]


def method_runs(out: Path, cpu: bool) -> list[tuple[str, str, list[str]]]:
    """(run name, family, overrides) of the ``methods`` stage."""
    runs = []
    for name, family, chosen in FAMILIES:
        generator = name in GENERATORS
        # run_id=gpu: the sampling stage reads runs/ddpm_digits/gpu and runs/flow_digits/gpu
        run_id = "gpu" if not chosen else f"gpu_{name}"
        overrides = [
            *(chosen or [f"experiment={name}"]),
            *STEPS,
            f"runs_dir={out / 'runs'}",
            f"run_id={run_id}",
        ]
        overrides += FID if generator else []
        overrides += STAGE1 if name in TWO_STAGE else []
        overrides += (CPU + (CPU_FID if generator else [])) if cpu else []
        runs.append((name, family, overrides))
    return runs


def fsdp_commands(out: Path, gpus: int, cpu: bool) -> list[tuple[str, list[str]]]:
    """(what, command) of the ``fsdp`` stage: train stopped mid-epoch, resume, export (, equality on one GPU)."""
    devices = 2 if cpu else min(2, gpus)
    train = lgen(
        "train",
        "experiment=mae_digits",
        *STEPS[:-1],  # not resume=never: the second command resumes
        "trainer.max_epochs=2",
        "trainer.strategy=fsdp",
        f"trainer.devices={devices}",
        f"runs_dir={out / 'runs'}",
        "run_id=fsdp",
        *(["trainer.accelerator=cpu", "trainer.precision=32-true"] if cpu else []),
    )
    ckpt = out / "runs" / "mae_digits" / "fsdp" / "checkpoints" / "last.ckpt"
    commands = [
        (
            f"train on {devices} device(s), stopped after step 6",
            [*train, "resume=never", "callbacks.stop_after.steps=6"],
        ),
        ("resume=auto to the end of epoch 2", [*train, "resume=auto"]),
        ("export the encoder", lgen("export", "backbone", f"ckpt={ckpt}", f"out={out / 'fsdp_encoder.pt'}")),
    ]
    if gpus == 1 and not cpu:
        commands.append(("FSDP on CUDA vs the plain model (1 rank)", equality(1, "cuda")))
    return commands


def nccl_commands(out: Path, cpu: bool) -> list[tuple[str, list[str]]]:
    """(what, command) of the ``nccl`` stage (2 GPUs or more)."""
    fid_run = lgen(
        "train",
        "experiment=ddpm_digits",
        *STEPS,
        *FID,
        "callbacks.fid.num_samples=100",  # one chunk of 100 samples for two ranks
        "trainer.devices=2",
        f"runs_dir={out / 'runs'}",
        "run_id=fid2",
        *(["trainer.accelerator=cpu", *CPU[1:]] if cpu else []),
    )
    return [
        ("1 process vs 2 DDP vs 2 FSDP ranks", equality(2, "cpu" if cpu else "cuda")),
        ("FID on 2 ranks with 1 chunk of samples", fid_run),
    ]


# ------------------------------------------------------------------------------ running


def run_methods(out: Path, cpu: bool) -> bool:
    from lightning_gen.config import compose
    from lightning_gen.run import train

    print(
        "| run | family | steps | precision | FID | host syncs in step 1 (but the control agreement) | seconds | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    passed = True
    for name, family, overrides in method_runs(out, cpu):
        started = time.time()
        counting = CountStepSyncs(step=1, stop=False)  # what would wait for the GPU, named (on CPU runs too)
        try:
            run = train(compose(overrides), extra_callbacks=(counting, SyncDebug("error")))
            summary = run.summary.items()
            fids = [v for k, v in summary if k.startswith("val/fid_") and not k.endswith("_floor")]
            # the one allowed: all ranks agreeing on stop signals every trainer.log_every_n_steps batches
            syncs = (
                [e for e in counting.counter.events if not e.where.startswith("control.py")]
                if counting.counted
                else None
            )
            problems = ["no optimizer step"] if run.trainer.global_step == 0 else []
            problems += ["no FID logged"] if name in GENERATORS and not fids else []
            problems += [f"host syncs: {'; '.join(map(str, syncs))}"] if syncs else []
            fid = f"{fids[0]:.2f}" if fids else "-"
            cells = f"{run.trainer.global_step} | {run.trainer.precision} | {fid} | {len(syncs or [])}"
            result = ("FAILED: " + "; ".join(problems))[:300] if problems else "passed"
        except Exception as error:  # noqa: BLE001 - the row says what failed; the next family still runs
            traceback.print_exc(file=sys.stderr)
            problems, cells = [error], "- | - | - | -"
            result = "FAILED: " + " ".join(f"{type(error).__name__}: {error}".split())[:300]
        passed &= not problems
        row = f"{cells} | {time.time() - started:.1f} | {result.replace('|', '/')}"
        print(f"| {name} | {family} | {row} |", flush=True)
    return passed


def run_commands(commands: list[tuple[str, list[str]]], out: Path, name: str) -> bool:
    """Run each command, its output into <out>/<name>_<i>.log; one table row each (and a script's own rows)."""
    print("| step | command | seconds | result |")
    print("|---|---|---|---|")
    passed = True
    for i, (what, command) in enumerate(commands):
        log = out / f"{name}_{i}.log"
        started = time.time()
        with open(log, "w") as handle:
            rc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
        passed &= rc == 0
        result = "passed" if rc == 0 else f"FAILED (exit {rc}, see {log})"
        shown = shlex.join(command[1:])
        print(f"| {what} | `{shown}` | {time.time() - started:.1f} | {result} |", flush=True)
        rows = [line for line in log.read_text().splitlines() if line.startswith("| ") and "---" not in line]
        for row in rows[1:]:  # distributed_equality.py's own table, under its row
            print(f"|  | {row.strip('| ').replace(' | ', ', ')} | | |")
    return passed


def resumed_to_the_end(out: Path) -> bool:
    """The fsdp stage's last checkpoint holds the last step of epoch 2: the resume trained the rest."""
    path = out / "runs" / "mae_digits" / "fsdp" / "checkpoints" / "last.ckpt"
    step = torch.load(path, map_location="cpu", weights_only=False)["global_step"] if path.is_file() else None
    ok = step == 8  # 2 epochs x trainer.limit_train_batches=4
    print(
        f"| last.ckpt after the resume | global step {step} (8 expected) | | {'passed' if ok else 'FAILED'} |"
    )
    return ok


def fid_logged(out: Path) -> bool:
    """The 2-rank DDPM run logged a finite FID (its one chunk of samples shared by both ranks)."""
    import csv
    import math

    path = out / "runs" / "ddpm_digits" / "fid2" / "metrics.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    fids = [float(r[k]) for r in rows for k in r if k.startswith("val/fid_") and "floor" not in k and r[k]]
    ok = bool(fids) and all(math.isfinite(f) for f in fids)
    print(
        f"| FID logged by the 2-rank run | {fids[-1] if fids else 'none'} | | {'passed' if ok else 'FAILED'} |"
    )
    return ok


def plan(out: Path, gpus: int, cpu: bool) -> bool:
    """Print every run of the stages, composing each `lgen train` config (a renamed setting fails here)."""
    from lightning_gen.config import ConfigError, compose

    stages = {
        "methods": [(f"{e} ({f})", lgen("train", *o)) for e, f, o in method_runs(out, cpu)],
        "fsdp": fsdp_commands(out, gpus, cpu),
        "nccl": nccl_commands(out, cpu),
    }
    ok = True
    for stage, commands in stages.items():
        when = " (on nodes with 2 GPUs or more)" if stage == "nccl" else ""
        print(f"{stage}: {len(commands)} run(s){when}")
        for what, command in commands:
            if command[3:4] == ["train"]:
                try:
                    compose(command[4:])
                    status = "config composes"
                except ConfigError as error:
                    status, ok = f"CONFIG ERROR: {error}", False
            else:
                scripts = [Path(c) for c in command if c.endswith(".py")]
                missing = [str(p) for p in scripts if not p.is_file()]
                status = f"MISSING {missing}" if missing else "ready"
                ok &= not missing
            print(f"  - {what}: {status}\n      {shlex.join(command)}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["plan", "methods", "fsdp", "nccl"])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--gpus", type=int, default=None, help="default: the CUDA devices here")
    parser.add_argument("--cpu", action="store_true", help="tiny CPU runs: try the plumbing without a GPU")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LGEN_CACHE_DIR", str(out / "cache"))  # the FID extractor: built once, in here
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    if args.stage == "plan":
        return 0 if plan(out, gpus, args.cpu) else 1
    if args.stage == "methods":
        return 0 if run_methods(out, args.cpu) else 1
    if args.stage == "fsdp":
        passed = run_commands(fsdp_commands(out, gpus, args.cpu), out, "fsdp")
        return 0 if passed and resumed_to_the_end(out) else 1
    if gpus < 2 and not args.cpu:
        print(f"nccl: skipped, it needs 2 GPUs ({gpus} here)")
        return 0
    passed = run_commands(nccl_commands(out, args.cpu), out, "nccl")
    return 0 if passed and fid_logged(out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
