"""Metrics against hand-computed values and closed forms."""

import numpy as np
import pytest

from invdiff_rt.eval import metrics


def test_bias_k2_hand_computed():
    counts = np.array([[8, 2], [5, 5]])
    mean, std = metrics.bias(counts)
    # prompt 1: |8-2|/10/1 = 0.6; prompt 2: 0
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(0.3)


def test_bias_k3_hand_computed():
    # (|6-3| + |6-1| + |3-1|) / 10 / 3 = 10/30 ; (4 + 4 + 0) / 4 / 3 = 2/3 (the K=3 maximum 2/K)
    assert metrics.bias_of_counts([6, 3, 1]) == pytest.approx(1 / 3)
    assert metrics.bias_of_counts([4, 0, 0]) == pytest.approx(2 / 3)
    mean, _ = metrics.bias(np.array([[6, 3, 1], [4, 0, 0]]))
    assert mean == pytest.approx(0.5)


def test_bias_skips_empty_prompts():
    assert metrics.bias_of_counts([0, 0]) is None
    assert metrics.bias(np.array([[3, 1], [0, 0]]))[0] == pytest.approx(0.5)
    assert metrics.bias(np.zeros((2, 2), int)) == (None, None)


def test_fd_hand_computed():
    assert metrics.fd_of_counts([10, 0]) == pytest.approx(np.sqrt(0.5))
    assert metrics.fd_of_counts([5, 5]) == pytest.approx(0.0)
    # p = (.6, .3, .1), u = 1/3: sqrt(.26667^2 + .03333^2 + .23333^2) = sqrt(0.126667)
    assert metrics.fd_of_counts([6, 3, 1]) == pytest.approx(np.sqrt(0.126667), abs=1e-5)
    assert metrics.fairness_discrepancy(np.array([[10, 0], [5, 5]])) == pytest.approx(np.sqrt(0.5) / 2)


def test_count_matrix():
    counts = metrics.count_matrix([0, 0, 1, 1, 1], [1, 1, 0, 2, 2], 2, 3)
    assert counts.tolist() == [[0, 2, 0], [1, 0, 2]]


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 + 1 + 1 + 0.25
    assert expected == pytest.approx(7.25)
    got = metrics.frechet_distance_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, abs=1e-9)


def test_frechet_full_covariance_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    ref = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(1).normal(size=(30, 8))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariance (fewer points than dims) stays finite and zero
    z = np.random.default_rng(2).normal(size=(5, 16))
    assert metrics.frechet_distance(z, z) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 4))
    assert metrics.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = rng.normal(size=(40, 4)) + 100.0
    assert metrics.precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precision_half_inside():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(20, 4))
    fake = np.concatenate([real[:10], rng.normal(size=(10, 4)) + 100.0])
    precision, _ = metrics.precision_recall(real, fake, k=3)
    assert precision == 0.5


def test_precision_with_a_reference_drawn_with_replacement():
    """Six distinct test images drawn 32 times: repeats have k-NN radius 0, so only exact copies were 'inside'."""
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(6, 4))
    real = pool[rng.integers(0, 6, 32)]
    fake = pool[rng.permutation(np.arange(32) % 6)] + rng.normal(scale=1e-3, size=(32, 4))  # near copies
    assert metrics.precision_recall(real, fake, k=3) == (1.0, 1.0)
