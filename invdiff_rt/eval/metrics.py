"""Evaluation metrics on predicted labels and feature vectors (numpy only).

Formulas (per prompt p with attribute counts c_1..c_K, N_p = sum_k c_k):
- bias_p = sum_{i<j} |c_i - c_j| / N_p / (K(K-1)/2)   (InvDiff / Shen et al.; 0 = uniform, max 2/K, 1 for K=2)
- fd_p   = || c / N_p - 1/K ||_2                        (fairness discrepancy: L2 distance to the uniform distribution)
Both are averaged over prompts. Prompts with no images are skipped.
- Frechet distance: ||mu_1 - mu_2||^2 + tr S_1 + tr S_2 - 2 tr sqrt(S_1^1/2 S_2 S_1^1/2).
- Improved precision / recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour balls.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def count_matrix(groups: Sequence[int], labels: Sequence[int], n_groups: int, n_labels: int) -> np.ndarray:
    """`[n_groups, n_labels]` int counts of (group, label) pairs."""
    counts = np.zeros((n_groups, n_labels), dtype=np.int64)
    np.add.at(counts, (np.asarray(groups, dtype=np.int64), np.asarray(labels, dtype=np.int64)), 1)
    return counts


def bias_of_counts(counts: Sequence[int]) -> float | None:
    """Pairwise bias of one prompt's attribute counts; None when the prompt has no images."""
    c = np.asarray(counts, dtype=np.float64)
    k, n = c.size, c.sum()
    if n == 0 or k < 2:
        return None
    pairwise = np.abs(c[:, None] - c[None, :])[np.triu_indices(k, 1)].sum()
    return float(pairwise / n / (k * (k - 1) / 2))


def fd_of_counts(counts: Sequence[int]) -> float | None:
    """L2 distance between one prompt's attribute distribution and uniform; None when it has no images."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0:
        return None
    return float(np.linalg.norm(c / c.sum() - 1.0 / c.size))


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return float(np.mean(kept)), float(np.std(kept))


def bias(counts: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and std over prompts (rows of `counts`) of the pairwise bias."""
    return _mean_std([bias_of_counts(row) for row in np.atleast_2d(counts)])


def fairness_discrepancy(counts: np.ndarray) -> float | None:
    """Mean over prompts (rows of `counts`) of the L2 distance to the uniform attribute distribution."""
    return _mean_std([fd_of_counts(row) for row in np.atleast_2d(counts)])[0]


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance of two Gaussians, via the symmetric form sqrt(S1^1/2 S2 S1^1/2) (stable, eigh only)."""
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets `x [N,D]` and `y [M,D]` (N, M >= 2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return frechet_distance_stats(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise_dist(x, x)
    return np.sort(d, axis=1)[:, min(k, len(x) - 1)]  # column 0 is the point itself


def _coverage(manifold: np.ndarray, probes: np.ndarray, k: int) -> float:
    """Share of `probes` inside at least one k-NN ball of the `manifold` points."""
    radii = _knn_radii(manifold, k)
    inside = _pairwise_dist(probes, manifold) <= radii[None, :]
    return float(inside.any(axis=1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold). The real
    manifold is built on distinct points: a small test split is drawn with replacement, and a repeated image's
    k-NN radius is 0 (six test images drawn 32 times gave a perfect generator precision 0.125)."""
    real, fake = np.unique(np.asarray(real, np.float64), axis=0), np.asarray(fake, np.float64)
    return _coverage(real, fake, k), _coverage(fake, real, k)
