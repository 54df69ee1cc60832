"""The pure evaluation algorithms against known answers and independent implementations (numpy, sklearn)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from lightning_gen.eval import EvalError
from lightning_gen.eval.clustering import ari, cluster_accuracy, cluster_features, kmeans, nmi
from lightning_gen.eval.features import dedupe_by_index
from lightning_gen.eval.finetune import balanced_subset, random_translate
from lightning_gen.eval.knn import KNNConfig, knn_accuracy, knn_scores
from lightning_gen.eval.probe import ProbeConfig, linear_probe, train_linear_probe


def blobs(n: int, classes: int, dim: int = 16, spread: float = 6.0, seed: int = 0):
    """Well-separated Gaussian blobs: a linear (and nearest-neighbour) classifier can be perfect."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * spread
    labels = torch.arange(n) % classes
    return centers[labels] + torch.randn(n, dim, generator=g), labels


# ------------------------------------------------------------------------------ linear probe


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_probe_separable_features_are_classified_perfectly(optimizer):
    x, y = blobs(600, 5)
    cfg = ProbeConfig(optimizer=optimizer, epochs=30, weight_decay=1e-4 if optimizer == "lbfgs" else 0.0)
    result = linear_probe(x[:400], y[:400], x[400:], y[400:], 5, cfg)
    assert result["top1"] == 1.0 and result["top5"] == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_probe_on_random_labels_is_at_chance_on_held_out_data(optimizer):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, 16, generator=g), torch.randint(0, 10, (3000,), generator=g)
    result = linear_probe(
        x[:2000], y[:2000], x[2000:], y[2000:], 10, ProbeConfig(optimizer=optimizer, epochs=20)
    )
    assert abs(result["top1"] - 0.1) < 0.04  # chance is 1/10; binomial std on 1000 samples is 0.0095
    assert abs(result["top5"] - 0.5) < 0.06


def test_lbfgs_probe_is_multinomial_logistic_regression():
    """Same objective as sklearn's LogisticRegression with C = 1 / (n * weight_decay): same probabilities."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 8, generator=g).double(), torch.randint(0, 4, (300,), generator=g)
    x[:, 0] += y  # some signal so the optimum is not trivial
    wd = 1e-2
    probe = train_linear_probe(
        x.float(), y, 4, ProbeConfig(optimizer="lbfgs", weight_decay=wd, lbfgs_iterations=500)
    )
    mean, std = x.mean(0), x.std(0, unbiased=False)  # the probe standardises with these
    z = ((x - mean) / std).numpy()
    reference = LogisticRegression(C=1 / (len(x) * wd), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
    ours = torch.softmax(probe(x.float()), 1).detach().double().numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(z), atol=2e-4)


# ------------------------------------------------------------------------------ kNN


def test_knn_separable_is_perfect_and_random_is_chance():
    x, y = blobs(500, 5)
    assert knn_accuracy(x[:400], y[:400], x[400:], y[400:], 5, KNNConfig(k=[20, 200]))["top1_k20"] == 1.0
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3000, 16, generator=g), torch.randint(0, 10, (3000,), generator=g)
    result = knn_accuracy(x[:2000], y[:2000], x[2000:], y[2000:], 10, KNNConfig(k=[20, 200]))
    assert abs(result["top1_k20"] - 0.1) < 0.04 and abs(result["top1_k200"] - 0.1) < 0.04


def test_knn_scores_equal_a_brute_force_numpy_vote():
    g = torch.Generator().manual_seed(4)
    bank, labels, queries = (
        torch.randn(50, 6, generator=g),
        torch.randint(0, 3, (50,), generator=g),
        torch.randn(7, 6),
    )
    k, t = 9, 0.07
    ours = knn_scores(bank, labels, queries, 3, k, t, chunk_size=3).numpy()
    b = bank.numpy() / np.linalg.norm(bank.numpy(), axis=1, keepdims=True)
    q = queries.numpy() / np.linalg.norm(queries.numpy(), axis=1, keepdims=True)
    expected = np.zeros((7, 3))
    for i, row in enumerate(q @ b.T):
        for j in np.argsort(-row)[:k]:
            expected[i, labels[j]] += np.exp(row[j] / t)
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_knn_with_k_larger_than_the_bank_is_a_clear_error():
    x, y = blobs(30, 3)
    with pytest.raises(EvalError, match=r"k=200 needs 1 <= k <= .* which is 30"):
        knn_accuracy(x, y, x, y, 3, KNNConfig(k=[20, 200]))


# ------------------------------------------------------------------------------ clustering


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_and_ari_equal_scikit_learn_on_the_same_assignments(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 400)
    clusters = np.where(rng.random(400) < 0.6, labels * 3 % 7, rng.integers(0, 7, 400))  # partly agreeing
    assert nmi(labels, clusters) == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert ari(labels, clusters) == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-12)
    random_clusters = rng.integers(0, 7, 400)
    assert nmi(labels, random_clusters) == pytest.approx(
        normalized_mutual_info_score(labels, random_clusters), abs=1e-12
    )
    assert ari(labels, random_clusters) == pytest.approx(
        adjusted_rand_score(labels, random_clusters), abs=1e-12
    )


def test_clustering_metrics_degenerate_partitions_match_scikit_learn():
    one = np.zeros(20, dtype=int)
    split = np.arange(20) % 4
    for a, b in [(one, one), (one, split), (split, one), (split, (split + 1) % 4)]:
        assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
        assert ari(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)


def test_cluster_accuracy_is_the_best_one_to_one_matching():
    rng = np.random.default_rng(5)
    labels, clusters = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    best = max(np.mean(np.array(perm)[clusters] == labels) for perm in itertools.permutations(range(4)))
    assert cluster_accuracy(labels, clusters) == pytest.approx(best)


def test_kmeans_recovers_blobs_and_matches_scikit_learn_inertia():
    x, y = blobs(300, 4, dim=5)
    assign, _, inertia = kmeans(x, 4, n_init=3, seed=0)
    assert nmi(y, assign) == 1.0 and ari(y, assign) == 1.0
    reference = KMeans(4, n_init=3, random_state=0).fit(x.double().numpy())
    assert inertia == pytest.approx(reference.inertia_, rel=1e-4)
    assert cluster_features(x, y, 4)["nmi"] == 1.0


# ------------------------------------------------------------------------------ subsets and features


def test_label_subsets_are_class_balanced_and_seed_deterministic():
    g = torch.Generator().manual_seed(6)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([400, 250, 300, 900, 150])])  # unbalanced
    labels = labels[torch.randperm(len(labels), generator=g)]
    for fraction in (0.01, 0.1):
        subset = balanced_subset(labels, fraction, seed=0)
        counts = torch.bincount(labels[subset], minlength=5)
        assert (counts == round(fraction * len(labels) / 5)).all()  # equal count in every class
        assert len(subset.unique()) == len(subset)
        assert torch.equal(
            subset, balanced_subset(labels.clone(), fraction, seed=0)
        )  # same seed, same subset
        assert not torch.equal(subset, balanced_subset(labels, fraction, seed=1))
    with pytest.raises(EvalError, match="fewer than"):
        balanced_subset(labels, 0.5)  # 400 per class but class 4 has 150


def test_dedupe_by_index_keeps_one_row_per_sample_in_index_order():
    # What DistributedSampler produces for 5 samples on 2 ranks: rank 0 [0, 2, 4], rank 1 [1, 3, 0 (padding)]
    indices = torch.tensor([0, 2, 4, 1, 3, 0])
    features = indices.float()[:, None] * torch.ones(1, 3)
    out = dedupe_by_index(features, indices * 10, indices)
    assert out.indices.tolist() == [0, 1, 2, 3, 4] and out.labels.tolist() == [0, 10, 20, 30, 40]
    assert torch.equal(out.features[:, 0], torch.arange(5).float())


def test_random_translate_moves_each_image_within_bounds():
    images = torch.zeros(6, 1, 16, 16, dtype=torch.uint8)
    images[:, :, 6:10, 6:10] = 255
    moved = random_translate(images, 0.125, torch.Generator().manual_seed(0))
    assert moved.dtype == torch.uint8 and moved.shape == images.shape
    assert (moved.float().sum((1, 2, 3)) == 16 * 255).all()  # a 2-pixel shift keeps the square inside
    assert not torch.equal(moved, images)
