"""FID/KID as the callback computes them: self-distance ~ 0, equality with an independent scipy FID,
and 2 real gloo processes (each with its shard of the features) giving the 1-process value."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import linalg

from lightning_gen.callbacks.fid import fid_from_features, fid_kid_from_shards


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al.: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), written from scratch."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def features(seed: int, n: int = 600, d: int = 16, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def test_fid_of_a_set_with_itself_is_zero():
    f = features(0)
    assert abs(fid_from_features(f, f)) < 1e-6


def test_fid_equals_an_independent_scipy_computation():
    a, b = features(1), features(2, n=400, shift=0.3)
    assert fid_from_features(a, b) == pytest.approx(scipy_fid(a.numpy(), b.numpy()), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, real: torch.Tensor, fake: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # as in the callback: each rank holds a slice of the real and of the generated features
        result = fid_kid_from_shards(
            real[rank::world],
            fake[rank::world],
            "cpu",
            kid=True,
            kid_subsets=1,
            kid_subset_size=min(len(real), len(fake)),
        )
        out[rank] = result
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_process_fid_and_kid_equal_one_process():
    real, fake = features(3, n=250), features(4, n=250, shift=0.2)
    # KID with one subset holding every sample does not depend on the order ranks concatenate in
    single = fid_kid_from_shards(real, fake, "cpu", kid=True, kid_subsets=1, kid_subset_size=250)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), real, fake, out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank][("fid", "")] == pytest.approx(single[("fid", "")], rel=1e-9)
        assert out[rank][("kid", "")] == pytest.approx(single[("kid", "")], rel=1e-6)
    assert single[("fid", "")] > 0.01  # the two sets differ: equality above is not 0 == 0
