"""LogME against dense linear algebra, the probes on separable and shuffled data, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core import transfer_scores as ts


def dense_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The paper's formula with the d x d matrix written out."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * float(np.sum((f @ m - y) ** 2)) - alpha / 2 * float(m @ m)
            - np.linalg.slogdet(a)[1] / 2)


@pytest.mark.parametrize("n, d", [(7, 3), (3, 5)])  # more images than features, and fewer
def test_the_evidence_from_the_svd_is_the_dense_formula(n, d):
    rng = np.random.default_rng(1)
    f, y = rng.normal(size=(n, d)), (rng.random(n) > 0.5).astype(float)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    for alpha, beta in [(1.0, 1.0), (0.3, 4.0), (7.0, 0.2)]:
        got = ts._evidence(n, d, s ** 2, u.T @ y, float(y @ y), alpha, beta)[0]
        assert got == pytest.approx(dense_evidence(f, y, alpha, beta), rel=1e-9, abs=1e-9)


def test_the_fixed_point_maximises_the_evidence():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(40, 6))
    y = (f[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(float)
    per_image, alpha, beta = ts.logme_column(f, y)
    best = dense_evidence(f, y, alpha, beta)
    assert per_image == pytest.approx(best / 40, rel=1e-9)
    for da in (0.5, 0.9, 1.1, 2.0):
        for db in (0.5, 0.9, 1.1, 2.0):
            assert dense_evidence(f, y, alpha * da, beta * db) <= best + 1e-9


def test_logme_prefers_features_that_carry_the_labels():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 30)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(90, 3))
    noise = rng.normal(size=(90, 3))
    assert ts.logme(informative, labels) > ts.logme(noise, labels) + 0.1
    # mean over classes: one class column alone differs from the mean
    column = ts.logme_column(informative, (labels == 0).astype(float))[0]
    assert ts.logme(informative, labels) != pytest.approx(column)


def clusters(seed: int = 0, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    return centres[labels] + 0.5 * rng.normal(size=(len(labels), 4)), labels


def test_the_probes_separate_clusters_and_not_shuffled_labels():
    f, labels = clusters()
    assert (ts.probe_predictions(f, labels) == labels).all()
    assert (ts.knn_predictions(f, labels, k=5) == labels).all()
    shuffled = np.random.default_rng(0).permutation(labels)
    assert (ts.probe_predictions(f, shuffled) == shuffled).mean() < 0.7
    assert (ts.knn_predictions(f, shuffled, k=5) == shuffled).mean() < 0.7


def test_knn_leaves_each_image_out_and_breaks_ties_by_the_nearest():
    f = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.3], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 0])
    # image 0: neighbours 1 and 2, both class 1 (counting itself, it would be class 0);
    # image 1: a 1-1 tie between images 0 and 2 goes to the nearer, image 0
    assert ts.knn_predictions(f, labels, k=2).tolist() == [1, 0, 1, 1]
    assert ts.knn_predictions(f, labels, k=1).tolist() == [1, 0, 1, 1]
    assert ts.knn_predictions(f, np.array([0, 0, 1, 1]), k=2)[3] == 1


def test_the_folds_never_exceed_the_rarest_class():
    assert ts._folds(np.array([0, 0, 0, 1, 1, 1, 1]), 5) == 3
    assert ts._folds(np.array([0] * 10 + [1] * 10), 5) == 5
    assert ts._folds(np.array([0, 1, 1, 1]), 5) == 2


def test_the_bootstrap_interval_brackets_the_accuracy_and_narrows_with_more_images():
    assert ts.bootstrap_interval(np.ones(20)) == (1.0, 1.0)
    small = ts.bootstrap_interval(np.array([1, 0] * 10), seed=0)
    large = ts.bootstrap_interval(np.array([1, 0] * 500), seed=0)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 3
    assert small == ts.bootstrap_interval(np.array([1, 0] * 10), seed=0)
    out = ts.accuracy_with_interval(np.array([0, 1, 1, 1]), np.array([0, 1, 1, 0]), 200, 0)
    assert out["accuracy"] == 0.75 and out["low"] <= 0.75 <= out["high"]


def test_kendall_tau_of_orders_and_of_too_few_pairs():
    assert ts.kendall_tau([1, 2, 3, 4], [0.5, 0.6, 0.7, 0.9]) == 1.0
    assert ts.kendall_tau([1, 2, 3, 4], [0.9, 0.7, 0.6, 0.5]) == -1.0
    assert ts.kendall_tau([1, 2, 3], [0.5, 0.7, 0.6]) == pytest.approx(0.333, abs=1e-3)
    assert ts.kendall_tau([1, 2], [0.5, 0.6]) is None
    assert ts.kendall_tau([1, 1, 1], [0.5, 0.6, 0.7]) is None
