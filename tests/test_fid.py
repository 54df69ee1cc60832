"""FID/KID as the callback computes them, and the samples it computes them on.

- FID: self-distance ~ 0 and equality with an independent scipy FID; KID equal to torchmetrics'
  KernelInceptionDistance drawing the same subsets (its global stream seeded as ours).
- The sample set: the same features for one process generating 20 at a time as for three ranks
  generating 7 at a time (per-chunk seeded noise), and the requested classes are i mod C.
- Metric selection: ``metrics`` list, the older ``kid`` key, unknown names.
Cross-process equality (4 and 3 gloo processes) is in tests/test_eval_ddp.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from lightning_gen.callbacks.fid import FID, FIDConfig, fid_from_features, fid_kid_from_shards, metric_names
from lightning_gen.config import ConfigError
from lightning_gen.eval.fid_extractor import DomainFeatureNet
from lightning_gen.eval.seeded_sampling import ChunkSeededDraws, seeded_samples
from lightning_gen.methods.base import DataInfo


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
    a, b = features(1), features(2, n=400, shift=30.0)  # a large mean: no cancellation in the covariance
    assert fid_from_features(a, b) == pytest.approx(scipy_fid(a.numpy(), b.numpy()), rel=1e-9)


def test_kid_equals_torchmetrics_with_the_same_subsets_and_never_touches_the_global_stream():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Precomputed(torch.nn.Module):  # torchmetrics' metric fed features we already have
        num_features = 16

        def forward(self, x):
            return x

    real, fake = features(3, n=120), features(4, n=90, shift=0.2)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    ours = fid_kid_from_shards(real, fake, "cpu", kid_subsets=4, kid_subset_size=50, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # subsets come from KID's own generator

    reference = KernelInceptionDistance(feature=Precomputed(), subsets=4, subset_size=50)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    torch.manual_seed(7)  # torchmetrics draws its subsets from the global stream
    mean, std = reference.compute()
    assert ours[("kid", "")] == pytest.approx(float(mean), rel=1e-12)
    assert ours[("kid", "_std")] == pytest.approx(float(std), rel=1e-9)
    assert ours[("kid", "")] > 1e-3  # the sets differ: equality is not 0 == 0


def tiny_conditional_ddpm():
    from lightning_gen.methods.generative.diffusion import Diffusion, DiffusionConfig

    torch.manual_seed(0)
    cfg = DiffusionConfig(  # the ddpm preset's process on a short chain, stochastic DDIM
        process="vp",
        prediction="eps",
        timesteps=20,
        noise_schedule="linear",
        width=8,
        mults=[1, 2],
        sampler="ddim",
        sample_steps=3,
        sample_eta=1.0,
        conditional=True,
    )
    return Diffusion(cfg, DataInfo(name="digits", image_size=8, num_classes=3))


def fid_callback(tmp_path, **settings) -> FID:
    callback = FID(FIDConfig(**settings), tmp_path)
    torch.manual_seed(1)
    callback.use_extractor(
        DomainFeatureNet(1, 8, 3, width=4).eval(), "digits", "random"
    )  # a fixed random conv net
    return callback


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process of the tests: the same kernels whatever the batch
    yield
    torch.set_num_threads(threads)


def test_the_sample_set_is_the_same_for_any_world_size_and_batch_size(tmp_path, one_thread):
    """DDPM with stochastic DDIM draws noise at every step: one process in calls of 20 and three ranks
    in calls of at most 7 must see the same noise for every sample, and ask for the same classes."""
    model = tiny_conditional_ddpm()
    one = fid_callback(tmp_path, num_samples=40, batch_size=20)
    fake_1, labels_1 = one.generate_features(model, world_size=1, rank=0)
    three = fid_callback(tmp_path, num_samples=40, batch_size=7)
    shares = [three.generate_features(model, world_size=3, rank=r) for r in range(3)]
    assert [len(f) for f, _ in shares] == [13, 13, 14]  # balanced: N / W each
    assert torch.equal(torch.cat([f for f, _ in shares]), fake_1)
    assert torch.equal(torch.cat([y for _, y in shares]), labels_1)
    assert labels_1.tolist() == [i % 3 for i in range(40)]
    other_seed = fid_callback(tmp_path, num_samples=40, batch_size=20, seed=5)
    assert not torch.equal(other_seed.generate_features(model)[0], fake_1)  # the seed matters


def test_sample_draws_that_cannot_be_seeded_per_sample_are_errors():
    handle = torch.Generator()
    with pytest.raises(RuntimeError, match="global random stream"), ChunkSeededDraws(handle, 0, 4, seed=0):
        torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="3 rows for 4 samples"), ChunkSeededDraws(handle, 0, 4, seed=0):
        torch.randn(3, 2, generator=handle)
    with ChunkSeededDraws(handle, 30, 4, seed=0):  # samples 30..33 straddle two seed chunks
        split = torch.randn(4, 2, generator=handle)
    with ChunkSeededDraws(handle, 28, 8, seed=0):
        assert torch.equal(torch.randn(8, 2, generator=handle)[2:6], split)


def test_pixel_by_pixel_multinomial_sampling_is_split_by_sample_too(one_thread):
    from lightning_gen.methods.generative.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(width=8, blocks=1), DataInfo(image_size=4, num_classes=3))
    whole, _ = seeded_samples(model, range(0, 20), seed=3)
    parts = [seeded_samples(model, range(a, min(a + 6, 20)), seed=3)[0] for a in range(0, 20, 6)]
    assert torch.equal(torch.cat(parts), whole)


def test_metrics_list_and_the_older_kid_key(tmp_path):
    assert metric_names(FIDConfig()) is None  # all that the extractor, the model and the counts allow
    assert metric_names(FIDConfig(metrics=["fid", "kid"], kid=False)) == ["fid"]
    assert metric_names(FIDConfig(metrics=["fid"], kid=True)) == ["fid", "kid"]
    with pytest.raises(ConfigError, match="did you mean 'kid'"):
        metric_names(FIDConfig(metrics=["fid", "kdi"]))
    with pytest.raises(ConfigError, match="leaves out fid"):
        metric_names(FIDConfig(metrics=["kid"]))
    everything = fid_callback(tmp_path)  # unconditional, domain head, train + test splits
    assert everything.metric_names == ["fid", "kid", "is", "prdc", "memorization"]
    assert set(everything.skipped) == {"class_fid", "cas"}
    assert "kid" not in fid_callback(tmp_path, kid=False).metric_names
    few = fid_callback(tmp_path, num_samples=3)  # IS in 10 parts and 3-NN balls need more samples: left out
    assert few.metric_names == ["fid", "kid", "memorization"] and "is_splits=10" in few.skipped["is"]
