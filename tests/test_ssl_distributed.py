"""Cross-rank maths on 2 real gloo processes (torch.multiprocessing.spawn) vs 1 process, numerically.

Each worker computes what one DDP rank computes and writes its results to disk; the test compares
them with a single-process computation on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_gen.distributed import batch_shuffle, batch_unshuffle
from lightning_gen.losses.contrastive import KeyQueue, info_nce, nt_xent
from lightning_gen.losses.dino import DINOLoss
from lightning_gen.losses.noncontrastive import barlow_twins_loss, vicreg_loss
from lightning_gen.losses.swav import FeatureQueue, assign_codes, swapped_prediction_loss

WORLD, N, D_IN, D_OUT, TAU = 2, 4, 6, 5, 0.2


def make_problem():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, D_OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    views = torch.randn(2, WORLD * N, D_IN, generator=g)  # (view, sample, feature)
    keys = torch.randn(3, WORLD * N, D_OUT, generator=g)  # 3 steps of MoCo keys
    teacher = torch.randn(2, WORLD * N, D_OUT, generator=g)  # 2 global views of DINO teacher outputs
    return model, views, keys, teacher


def local_slice(x: torch.Tensor, r: int) -> torch.Tensor:
    return x[..., r * N : (r + 1) * N, :]


# A "problem" is one rank's loss on its slice of views; first_index is the global id of its first sample.
def nt_xent_problem(model, views, first_index=0):
    z = model(torch.cat([views[0], views[1]]))
    return nt_xent(z, (torch.arange(len(views[0])) + first_index).repeat(2), TAU)


def info_nce_problem(model, views, first_index=0, gather=True):
    # positives are positional (query i <-> key i), so the sample ids are not needed
    queries, keys = model(views[0]), torch.tanh(model(views[1]))
    return info_nce(queries, keys, TAU, gather=gather)


def barlow_twins_problem(model, views, first_index=0):
    return barlow_twins_loss(model(views[0]), model(views[1]), lambd=0.1, grad_scale="global")


def barlow_twins_official_problem(model, views, first_index=0):
    return barlow_twins_loss(model(views[0]), model(views[1]), lambd=0.1, grad_scale="official")


def vicreg_problem(model, views, first_index=0):
    return vicreg_loss(model(views[0]), model(views[1]), 25.0, 25.0, 1.0)[0]


SWAV_QUEUE, SWAV_PROTOTYPES = 6, 7


def swav_queue() -> FeatureQueue:
    """A full queue with the same rows on every rank (what FeatureQueue.push guarantees, tested below)."""
    g = torch.Generator().manual_seed(11)
    queue = FeatureQueue(2, SWAV_QUEUE, D_OUT)
    queue.features.copy_(F.normalize(torch.randn(2, SWAV_QUEUE, D_OUT, generator=g), dim=2))
    queue.filled.fill_(SWAV_QUEUE)
    return queue


def swav_problem(model, views, first_index=0):
    g = torch.Generator().manual_seed(12)
    prototypes = F.normalize(torch.randn(SWAV_PROTOTYPES, D_OUT, generator=g), dim=1)
    scores = [F.normalize(model(v), dim=1) @ prototypes.T for v in views]
    queue = swav_queue()  # each rank feeds its own share of the queue rows to Sinkhorn-Knopp
    codes = [assign_codes(scores[a].detach(), queue.local_rows(a) @ prototypes.T, 0.3, 3) for a in range(2)]
    return swapped_prediction_loss(scores, codes, TAU)


PROBLEMS = {
    "nt_xent": nt_xent_problem,
    "info_nce": info_nce_problem,
    "barlow_twins": barlow_twins_problem,
    "vicreg": vicreg_problem,
    "swav": swav_problem,
}
# Problems whose cross-rank terms change the loss: computed on each rank's slice alone, they differ.
BATCH_LEVEL = ("info_nce", "barlow_twins", "vicreg", "swav")
# The official Barlow Twins code's convention: the same loss, each rank's own gradient share only, so
# the step of 2 processes is exactly half that of 1 process on the concatenated batch.
ONE_OVER_WORLD = {"barlow_twins_official": barlow_twins_official_problem}


def rank_mean_loss_and_grads(model, problem, local, first_index):
    """What DDP hands every rank: the loss of its own slice and the gradients averaged over ranks."""
    model.zero_grad()
    loss = problem(model, local, first_index=first_index)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= WORLD
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return mean_loss / WORLD, grads


def worker(r: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    torch.manual_seed(100 + r)  # ranks draw different random numbers, as real ones do
    model, views, keys, teacher = make_problem()
    results = {}

    # NT-Xent with gathered negatives (sample ids are global), and InfoNCE with in-batch negatives
    # (CPC, MoCo v3) where queries *and* keys come from the trained network, as CPC's future patch
    # codes do: in both, the other rank's candidates need their gradient back.
    local = local_slice(views, r)
    for name, problem in {**PROBLEMS, **ONE_OVER_WORLD}.items():
        results[name] = rank_mean_loss_and_grads(model, problem, local, first_index=r * N)

    # MoCo queue: every rank enqueues its own keys; the dictionaries must end identical.
    torch.manual_seed(7)  # same initial queue on every rank (seed_everything does this in a run)
    queue = KeyQueue(10, D_OUT)
    for step_keys in keys:
        queue.enqueue(local_slice(step_keys, r))
    results.update(queue=queue.keys.clone(), ptr=queue.ptr.clone())

    # SwAV queue: every rank pushes its own embeddings; the queues must end identical.
    swav = FeatureQueue(2, 10, D_OUT)
    for step_keys in keys:
        swav.push([local_slice(step_keys, r), -local_slice(step_keys, r)])
    results.update(swav_queue=swav.features.clone(), swav_filled=swav.filled.clone())

    # DINO center: all-reduced mean of the teacher outputs.
    center = DINOLoss(D_OUT)
    center.update_center(list(local_slice(teacher, r)))
    results.update(center=center.center.clone())

    # Shuffle-BN: shuffle then unshuffle is the identity on each rank's own rows, and the shuffled
    # slices of all ranks together are a permutation of the global batch.
    x = local_slice(views[0], r)
    shuffled, perm = batch_shuffle(x)
    results.update(shuffled=shuffled, perm=perm, roundtrip=batch_unshuffle(shuffled, perm), own=x)
    # Global BatchNorm: this rank's slice of the images, statistics of both ranks' slices.
    results["global_bn"] = global_bn_output_and_grads(local_slice_images(r))
    torch.save(results, f"{out_dir}/rank{r}.pt")
    dist.destroy_process_group()


def global_bn_problem():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(WORLD * N, 3, 5, 5, generator=g) * 2 + 1
    weight = torch.randn(WORLD * N, 3, 5, 5, generator=g)  # a fixed linear read-out of the output
    return images, weight


def local_slice_images(r: int) -> torch.Tensor:
    return global_bn_problem()[0][r * N : (r + 1) * N]


def global_bn_output_and_grads(x: torch.Tensor, bn_class=None):
    """Output, input gradient, affine gradients (averaged over ranks, as DDP does) and running stats."""
    from lightning_gen.nets.norm import GlobalBatchNorm

    bn = (bn_class or GlobalBatchNorm)(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x = x.clone().requires_grad_(True)
    y = bn(x)
    rank = dist.get_rank() if dist.is_initialized() else 0
    weight = global_bn_problem()[1][rank * len(x) : (rank + 1) * len(x)]
    (y * weight).sum().backward()
    grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    if dist.is_initialized():
        for grad in grads:
            dist.all_reduce(grad)
    return y.detach(), x.grad, grads, bn.running_mean.clone(), bn.running_var.clone()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, views, keys, teacher = make_problem()

    # single process on the concatenated batch
    for name, problem in PROBLEMS.items():
        model.zero_grad()
        loss = problem(model, views)
        loss.backward()
        # float32 round-off grows with the loss (Barlow Twins' and VICReg's are O(10)), so the
        # tolerance does too; for the O(1) contrastive losses it is 1e-6
        tol = 1e-6 * max(1.0, abs(loss.item()))
        for result in ranks:
            got_loss, got_grads = result[name]
            assert torch.allclose(got_loss, loss.detach(), atol=tol), (name, got_loss, loss)
            for got, want in zip(got_grads, [p.grad for p in model.parameters()]):
                assert torch.allclose(got, want, atol=tol), (name, (got - want).abs().max())
    for name, problem in ONE_OVER_WORLD.items():
        model.zero_grad()
        loss = problem(model, views)
        loss.backward()
        tol = 1e-6 * max(1.0, abs(loss.item()))
        wanted = [p.grad for p in model.parameters()]
        assert max(w.abs().max() for w in wanted) > 100 * tol  # a ratio of nonzero gradients, not 0 == 0 / 2
        for result in ranks:
            got_loss, got_grads = result[name]
            assert torch.allclose(got_loss, loss.detach(), atol=tol), (name, got_loss, loss)
            for got, want in zip(got_grads, wanted):
                assert torch.allclose(got, want / WORLD, atol=tol), (name, (got - want / WORLD).abs().max())
    for name in BATCH_LEVEL:  # each rank on its own: a different loss (the comparison above can fail)
        whole = PROBLEMS[name](model, views).item()
        halves = [PROBLEMS[name](model, local_slice(views, r)).item() for r in range(WORLD)]
        assert abs(sum(halves) / WORLD - whole) > 1e-3, name

    # A gather *without* gradient would get this wrong: the negatives' gradient goes missing.
    assert not torch.allclose(ranks[0]["nt_xent"][1][0], torch.zeros_like(ranks[0]["nt_xent"][1][0]))

    torch.manual_seed(7)
    queue = KeyQueue(10, D_OUT)
    for step_keys in keys:  # rank order = concatenation order
        queue.enqueue(step_keys)
    for result in ranks:
        assert torch.equal(result["queue"], ranks[0]["queue"]) and int(result["ptr"]) == int(ranks[0]["ptr"])
        assert torch.allclose(result["queue"], queue.keys, atol=1e-6) and int(result["ptr"]) == int(queue.ptr)

    swav = FeatureQueue(2, 10, D_OUT)
    for step_keys in keys:
        swav.push([step_keys, -step_keys])
    for result in ranks:
        assert torch.equal(result["swav_queue"], swav.features) and int(result["swav_filled"]) == 10

    center = DINOLoss(D_OUT)
    center.update_center(list(teacher))
    for result in ranks:
        assert torch.allclose(result["center"], center.center, atol=1e-6)

    # Global BatchNorm on 2 processes = BatchNorm on the concatenated batch: outputs, input gradients
    # and the affine gradients summed over ranks (DDP averages them, matching its mean of rank losses).
    images, _ = global_bn_problem()
    y, dx, grads, mean, var = global_bn_output_and_grads(images, torch.nn.BatchNorm2d)
    torch.testing.assert_close(torch.cat([r["global_bn"][0] for r in ranks]), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["global_bn"][1] for r in ranks]), dx, atol=1e-5, rtol=1e-5)
    for result in ranks:
        for got, want in zip(result["global_bn"][2], grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(result["global_bn"][3], mean)
        torch.testing.assert_close(result["global_bn"][4], var)
    per_device = global_bn_output_and_grads(images[:N], torch.nn.BatchNorm2d)[0]
    assert not torch.allclose(per_device, y[:N], atol=1e-3)  # statistics of one rank's slice differ

    everything = torch.cat([r["shuffled"] for r in ranks])
    assert torch.equal(ranks[0]["perm"], ranks[1]["perm"])
    assert torch.allclose(everything, views[0][ranks[0]["perm"]])
    for result in ranks:
        assert torch.equal(result["roundtrip"], result["own"])


def test_nt_xent_without_gather_differs_from_global():
    """Sanity of the comparison above: local-only negatives give a different loss."""
    model, views, _, _ = make_problem()
    z = F.normalize(model(torch.cat([views[0], views[1]])), dim=1)
    idx = torch.arange(WORLD * N).repeat(2)
    halves = [
        nt_xent(
            torch.cat([z[r * N : (r + 1) * N], z[WORLD * N + r * N : WORLD * N + (r + 1) * N]]),
            torch.arange(N).repeat(2),
            TAU,
            gather=False,
        )
        for r in range(WORLD)
    ]
    assert abs(sum(h.item() for h in halves) / WORLD - nt_xent(z, idx, TAU).item()) > 1e-3
