"""Host synchronisations per training step of every method, the cost of the one allowed exception,
and what computing the losses in float32 under bf16 autocast costs.

    python benchmarks/host_syncs.py [--methods simclr diffusion ...] [--skip-steps] [--repeats 200]

1. For every registered method (tests/sync_steps.py: the tiny configs of tests/test_sync_free.py), the
   ops of one training step that would make the host wait for a GPU, counted two ways by
   ``lightning_gen.host_sync.HostSyncCounter``: ``naive`` counts every scalar read, boolean mask,
   data-dependent shape and tensor built from Python values wherever the tensor lives (Adam's step
   counters, on the host, included); ``on a GPU`` keeps those whose tensor would be on the device.
2. The allowed exception: the agreement of ``lightning_gen.control`` (stop signals, SLURM requeue,
   non-finite loss), one all-reduce and one read every ``trainer.log_every_n_steps`` batches. Its
   host-side time here, per agreement and per step; on a GPU add the wait for the queued work, which
   the next logging flush of Lightning would pay at the same step anyway.
3. Each loss at a realistic size under CPU bf16 autocast: as shipped (``full_precision``: float32
   inside) and undecorated (matmuls in bf16), median milliseconds per call, and how far the
   undecorated value (Sinkhorn: the codes) and gradient (w.r.t. the first input) are from float32
   (relative, in norm; the shipped ones equal float32, tests/test_loss_precision.py). VICReg's
   variance and covariance terms are guarded functions of their own, so its undecorated form still
   computes them in float32; Sinkhorn-Knopp has no matmul, only exponentials of float32 scores.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.sync_steps

import torch  # noqa: E402

from lightning_gen import control  # noqa: E402


def host_sync_table(names: list[str]) -> None:
    from tests.sync_steps import TINY, VARIANTS, count_training_step

    print("| method | naive count | on a GPU |\n|---|---|---|")
    for name in names or [*TINY, *VARIANTS]:
        counts = []
        for raw in (True, False):
            with tempfile.TemporaryDirectory() as run_dir:
                counts.append(len(count_training_step(name, Path(run_dir), raw=raw).events))
        print(f"| {name} | {counts[0]} | {counts[1]} |", flush=True)


class _Voter:
    def __init__(self, votes):
        self.votes = votes

    def control_votes(self):
        return self.votes

    def control_act(self, trainer, pl_module, agreed):
        pass


def _time_agreements(repeats: int) -> float:
    device = torch.device("cpu")
    seen = torch.zeros((), dtype=torch.long)
    voters = [_Voter([seen, torch.full((), -(2**62))]), _Voter([0]), _Voter([0])]
    trainer = SimpleNamespace(callbacks=voters, fit_loop=SimpleNamespace(total_batch_idx=0), global_step=0)
    module = SimpleNamespace(device=device)
    for i in range(10):
        control.agree(trainer, module, ("warm-up", i))
    start = time.perf_counter()
    for i in range(repeats):
        control.agree(trainer, module, ("bench", i))
    return (time.perf_counter() - start) / repeats


def _two_ranks(rank: int, repeats: int, port: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    per = _time_agreements(repeats)
    if rank == 0:
        out.put(per)
    dist.destroy_process_group()


def agreement_cost(repeats: int, every: int = 10) -> None:
    """One agreement with the votes of the three participants lgen train has (signal, requeue, non-finite)."""
    import socket

    import torch.multiprocessing as mp

    rows = [("1 process", _time_agreements(repeats))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_two_ranks, args=(repeats, port, queue), nprocs=2)
    rows.append(("2 processes (gloo all-reduce)", queue.get()))
    print(f"\n| control agreement (CPU) | per agreement | per step (every {every} batches) |\n|---|---|---|")
    for name, per in rows:
        print(f"| {name} | {per * 1e6:.0f} µs | {per / every * 1e6:.1f} µs |")


def loss_cost(repeats: int) -> None:
    from lightning_gen.losses.contrastive import moco_loss, nt_xent
    from lightning_gen.losses.noncontrastive import barlow_twins_loss, vicreg_loss
    from lightning_gen.losses.swav import sinkhorn_knopp

    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 128, generator=g)  # SimCLR: 2 x 256 views, 128-d projections
    q, k, queue = (
        torch.randn(256, 128, generator=g),
        torch.randn(256, 128, generator=g),
        torch.randn(8192, 128, generator=g),
    )
    a, b = torch.randn(256, 2048, generator=g), torch.randn(256, 2048, generator=g)  # Barlow/VICReg 2048-d
    scores = torch.randn(256, 3000, generator=g)  # SwAV: 3000 prototypes
    cases = {
        "NT-Xent 512 x 128": (nt_xent, (z, torch.arange(256).repeat(2)), {"gather": False}),
        "MoCo 256 x 128, queue 8192": (moco_loss, (q, k, queue), {}),
        "Barlow Twins 256 x 2048": (barlow_twins_loss, (a, b), {"gather": False}),
        "VICReg 256 x 2048": (vicreg_loss, (a, b), {"gather": False}),
        "Sinkhorn-Knopp 256 x 3000": (sinkhorn_knopp, (scores,), {}),
    }
    print(
        "\n| loss (bf16 autocast, CPU) | float32 inside (shipped): ms | undecorated: ms "
        "| undecorated: value error | undecorated: gradient error |\n|---|---|---|---|---|"
    )
    for name, (fn, args, kwargs) in cases.items():
        medians = []
        raw = inspect.unwrap(fn)  # without full_precision (and without Sinkhorn's no_grad)
        for f in (fn, raw):
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
                for _ in range(3):
                    f(*args, **kwargs)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    f(*args, **kwargs)
                    times.append(time.perf_counter() - start)
            medians.append(statistics.median(times) * 1e3)
        value, grad = _value_and_gradient(raw, args, kwargs, autocast=False)
        coarse, coarse_grad = _value_and_gradient(raw, args, kwargs, autocast=True)
        value_error = ((coarse - value).norm() / value.norm()).item()
        grad_error = "-" if grad is None else f"{((coarse_grad - grad).norm() / grad.norm()).item():.1e}"
        print(
            f"| {name} | {medians[0]:.2f} | {medians[1]:.2f} | {value_error:.1e} | {grad_error} |", flush=True
        )


def _value_and_gradient(fn, args, kwargs, autocast: bool):
    """The loss (Sinkhorn: the codes) and its gradient w.r.t. the first input (None for the codes)."""
    codes = fn.__name__ == "sinkhorn_knopp"  # no gradient by design (and in-place normalisations)
    x = args[0].clone().requires_grad_(not codes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(not codes):
        out = fn(x, *args[1:], **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    if codes:
        return out.detach().float(), None
    out.float().sum().backward()
    return out.detach().float(), x.grad.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=[])
    parser.add_argument("--skip-steps", action="store_true", help="skip the per-method table")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if not args.skip_steps:
        host_sync_table(args.methods)
    agreement_cost(args.repeats)
    loss_cost(max(args.repeats // 20, 3))


if __name__ == "__main__":
    main()
