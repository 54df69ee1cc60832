"""The generative metrics against their definitions on cases worked out by hand, and on 2 gloo processes.

- precision / recall / density / coverage (k = 1 and k = 3) of points on a line, whose k-NN balls are
  counted in the comments; the blockwise computation equals the one-block one;
- the Inception Score of classifiers whose softmax outputs are given (one part and two parts);
- memorisation of samples built at known distances from a training set, with the percentile of the
  held-out distances interpolated by hand;
- per-class FID against scipy class by class; CAS from given logits;
- sample counts a metric cannot work with are ConfigErrors naming the setting;
- every metric on 2 processes (uneven shares, one empty share for a conditional model's classes)
  equals one process: bitwise for the gathered ones, FID to 1e-9.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lightning_gen.config import ConfigError
from lightning_gen.eval import manifold_metrics
from lightning_gen.eval.gen_metrics import MetricSettings, check_counts, generative_metrics
from tests.conftest import start_gloo_workers
from tests.test_fid import scipy_fid


def line(*xs: float) -> torch.Tensor:
    """Points on a line as (N, 1) features."""
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def prdc(real, fake, k, **kw) -> dict:
    settings = MetricSettings(prdc_k=k, prdc_num_real=len(real))
    out = generative_metrics(real, fake, ["prdc"], settings, **kw)
    return {stem: v for (stem, _), v in out.items()}


def test_precision_recall_density_coverage_k1_by_hand():
    # reals 0..4: each one's nearest other real is 1 away, so every real ball has radius 1.
    # samples 0.5 and 10: each other's nearest sample, 9.5 away: both sample balls have radius 9.5.
    got = prdc(line(0, 1, 2, 3, 4), line(0.5, 10), k=1)
    assert got["precision"] == 0.5  # 0.5 lies in the balls of 0 and 1; 10 in none
    assert got["density"] == 1.0  # (2 balls + 0) / (k M = 2)
    assert got["recall"] == 1.0  # every real is within 9.5 of the sample 0.5
    assert got["coverage"] == 0.4  # only the balls of 0 and 1 hold a sample
    # balls are closed: a sample exactly 1 from the real 4 (its ball's radius) is inside it
    assert prdc(line(0, 1, 2, 3, 4), line(5, 10), k=1)["precision"] == 0.5


def test_precision_recall_density_coverage_k3_by_hand():
    # reals 0..9: the 3rd nearest other real is 3 away at both ends, 2 away inside (radii 3,2,...,2,3).
    # samples 4.5, 20, 21, 22: their 3rd nearest other samples are 17.5, 15.5, 16.5, 17.5 away.
    got = prdc(line(*range(10)), line(4.5, 20, 21, 22), k=3)
    assert got["precision"] == 0.25  # only 4.5 is in a real ball; 20 is 11 from 9, whose radius is 3
    assert got["density"] == pytest.approx(1 / 3)  # 4.5 is in the balls of 3, 4, 5, 6: 4 / (3 * 4)
    assert got["recall"] == 1.0  # the outlier samples' huge balls cover every real ...
    assert got["coverage"] == 0.4  # ... but only the balls of 3, 4, 5, 6 hold a sample (Naeem et al.'s point)


def test_prdc_in_small_blocks_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(90, 5, generator=g, dtype=torch.float64)
    fake = torch.randn(70, 5, generator=g, dtype=torch.float64) * 1.3 + 0.2
    whole = prdc(real, fake, k=3)
    monkeypatch.setattr(manifold_metrics, "BLOCK", 64)  # many row and column blocks, top-k merged across them
    assert prdc(real, fake, k=3) == whole
    assert 0 < whole["precision"] < 1 and 0 < whole["coverage"] < 1  # a case where the counts matter


def inception_score(probabilities: list[list[float]], splits: int) -> dict:
    logits = torch.tensor(probabilities, dtype=torch.float64).log()  # softmax(log p) = p
    fake = torch.zeros(len(logits), 2, dtype=torch.float64)
    settings = MetricSettings(is_splits=splits)
    out = generative_metrics(fake, fake, ["is"], settings, logits=logits)
    return {suffix: v for (_, suffix), v in out.items()}


def test_inception_score_of_given_softmax_outputs():
    # p(y) = (0.5, 0.5); each sample: KL = 0.9 ln(0.9 / 0.5) + 0.1 ln(0.1 / 0.5) = 0.368064...
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    confident = [[0.9, 0.1], [0.1, 0.9]]
    assert inception_score(confident * 2, splits=1)[""] == pytest.approx(math.exp(kl), rel=1e-12)
    # two parts: the confident pair scores exp(KL), the undecided pair 1; mean and population std
    both = inception_score(confident + [[0.5, 0.5], [0.5, 0.5]], splits=2)
    assert both[""] == pytest.approx((math.exp(kl) + 1) / 2, rel=1e-12)
    assert both["_std"] == pytest.approx((math.exp(kl) - 1) / 2, rel=1e-12)
    assert inception_score([[0.7, 0.3]] * 4, splits=2)[""] == pytest.approx(1.0)  # one class for all: 1


def test_memorization_of_constructed_sets():
    train = line(*range(10))
    # held-out images 9 + 0.1 .. 9 + 2.0: their nearest training image (9) is 0.1 .. 2.0 away; the 5th
    # percentile of those 20 distances interpolates at 0.05 * 19 = 0.95: 0.1 + 0.95 * 0.1 = 0.195
    held_out = line(*(9 + d / 10 for d in range(1, 21)))
    # a copy (distance 0), one 0.19 away (< 0.195), one 0.2 away (not), one far away: 2 of 4
    fake = line(3, 5.19, 5.2, 50)
    out = generative_metrics(train, fake, ["memorization"], held_out=held_out)
    assert out[("memorization", "_threshold")] == pytest.approx(0.195, abs=1e-12)
    assert out[("memorization", "")] == 0.5


def test_class_fid_and_cas():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(300, 3, generator=g, dtype=torch.float64)
    real_labels = torch.arange(300) % 3
    real[:, 0] += 3 * real_labels  # classes apart
    fake = torch.randn(60, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    fake[:, 0] += 3 * (labels == 1) + 1.5 * (labels == 2)  # class 2 drawn at the wrong place
    # a classifier that says class 0 for the first 12 samples, else the requested class
    logits = torch.nn.functional.one_hot(torch.where(torch.arange(60) < 12, 0, labels), 3).double()
    out = generative_metrics(
        real, fake, ["class_fid", "cas"], real_labels=real_labels, labels=labels, classifier_logits=logits
    )
    per_class = [scipy_fid(real[real_labels == c].numpy(), fake[labels == c].numpy()) for c in range(3)]
    for c in range(3):
        assert out[("class_fid", f"_{c}")] == pytest.approx(per_class[c], rel=1e-9)
    assert out[("class_fid", "")] == pytest.approx(np.mean(per_class), rel=1e-9)
    assert per_class[2] > 5 * per_class[1]  # the misplaced class stands out
    # samples 0..11 asked for 0,1,2,0,... are all called 0: class 0 keeps 20/20, classes 1 and 2 lose 4 each
    assert out[("cas", "_0")] == 1.0 and out[("cas", "_1")] == 0.8 and out[("cas", "_2")] == 0.8
    assert out[("cas", "")] == pytest.approx(52 / 60)


def test_sample_counts_a_metric_cannot_work_with_are_config_errors():
    settings = MetricSettings(kid_subset_size=50, prdc_k=5)
    with pytest.raises(ConfigError, match="kid_subset_size=50 is larger than the 40 generated"):
        check_counts(["kid"], settings, num_fake=40, num_real=100)
    with pytest.raises(ConfigError, match="prdc with k=5 needs more than k generated and real images"):
        check_counts(["prdc"], settings, num_fake=5, num_real=100)
    with pytest.raises(ConfigError, match="is_splits=10"):
        check_counts(["is"], settings, num_fake=8, num_real=None)
    check_counts(["kid", "prdc", "is"], settings, num_fake=60, num_real=100)


# ------------------------------------------------------------------------------ 2 gloo processes

NAMES = ["fid", "kid", "is", "prdc", "memorization", "class_fid", "cas"]
SETTINGS = dict(kid_subsets=4, kid_subset_size=20, is_splits=4, prdc_k=3, prdc_num_real=50)


def everything(world: int, rank: int) -> dict:
    """Every metric on this rank's share (rank 0: 17 samples, rank 1: 20) of 37 samples."""
    g = torch.Generator().manual_seed(5)
    real = torch.randn(120, 6, generator=g, dtype=torch.float64)
    real_labels = torch.arange(120) % 4
    held_out = torch.randn(40, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(37, 6, generator=g, dtype=torch.float64) * 1.2
    labels = torch.arange(37) % 4
    logits = torch.randn(37, 4, generator=g, dtype=torch.float64)
    share = slice(0, 37) if world == 1 else (slice(0, 17) if rank == 0 else slice(17, 37))
    return generative_metrics(
        real,
        fake[share],
        NAMES,
        MetricSettings(**SETTINGS),
        seed=3,
        labels=labels[share],
        real_labels=real_labels,
        held_out=held_out,
        logits=logits[share],
        classifier_logits=logits[share],
    )


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(everything(world, rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_every_metric_on_two_processes_equals_one_process(tmp_path):
    single = everything(1, 0)
    start_gloo_workers(
        _worker, 2, str(tmp_path / "init"), str(tmp_path), preload=("lightning_gen.eval.gen_metrics",)
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.keys() == single.keys()
        for key, value in single.items():
            if key[0] == "fid":  # summed statistics: equal up to the order of the float64 sums
                assert got[key] == pytest.approx(value, rel=1e-9), key
            else:  # gathered in sample order: the same numbers as one process
                assert got[key] == value, key
    assert 0 < single[("precision", "")] < 1 and single[("memorization", "")] < 1
