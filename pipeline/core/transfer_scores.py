"""How well frozen features suit a labelled data set, from the features alone.

* :func:`logme`: LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021): the log marginal likelihood per image of a Bayesian linear
  model from the features to each one-hot label column, maximised over the prior precision
  ``alpha`` and noise precision ``beta`` by the paper's fixed-point iteration, averaged over
  classes. Written from the paper (its reference code is MIT-licensed, thuml/LogME).
* :func:`probe_predictions`: out-of-fold predictions of a cross-validated logistic-regression
  probe on standardised features (the usual "linear probe").
* :func:`knn_predictions`: leave-one-out cosine k-nearest-neighbour predictions.
* :func:`bootstrap_interval`: a percentile interval of an accuracy over resampled images.
* :func:`kendall_tau`: rank agreement between a score and measured accuracies.

Published audits (arXiv 2204.01403, 2503.18528) find that no such score ranks models reliably
across data sets, so ``pipeline advise`` checks its ranking by training for real.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LOGME_MAX_ITERATIONS = 100
LOGME_TOLERANCE = 1e-4


def _evidence(n: int, d: int, sigma: np.ndarray, z: np.ndarray, y_norm2: float,
              alpha: float, beta: float) -> tuple[float, float, float, float]:
    """Log evidence of ``y`` for one (alpha, beta), from the SVD of the features:
    ``sigma`` the squared singular values, ``z = U^T y``. Returns (evidence, gamma, |m|^2,
    |F m - y|^2)."""
    denom = alpha + beta * sigma
    m2 = float(np.sum((beta * np.sqrt(sigma) * z / denom) ** 2))
    # residual inside span(U) plus the part of y outside it
    res2 = float(np.sum((alpha * z / denom) ** 2)) + max(y_norm2 - float(np.sum(z ** 2)), 0.0)
    gamma = float(np.sum(beta * sigma / denom))
    log_det = float(np.sum(np.log(denom))) + (d - len(sigma)) * math.log(alpha)
    evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * res2 - alpha / 2 * m2 - log_det / 2)
    return evidence, gamma, m2, res2


def logme_column(features: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """LogME of one target column: (evidence / n, alpha, beta) at the fixed point."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s ** 2
    z = u.T @ y
    y_norm2 = float(y @ y)
    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITERATIONS):
        _, gamma, m2, res2 = _evidence(n, d, sigma, z, y_norm2, alpha, beta)
        new_alpha = gamma / max(m2, 1e-12)
        new_beta = (n - gamma) / max(res2, 1e-12)
        done = abs(new_alpha - alpha) / alpha < LOGME_TOLERANCE and \
            abs(new_beta - beta) / beta < LOGME_TOLERANCE
        alpha, beta = new_alpha, new_beta
        if done:
            break
    evidence = _evidence(n, d, sigma, z, y_norm2, alpha, beta)[0]
    return evidence / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (N x D) for integer ``labels``: mean over classes of the per-image
    log evidence. Higher is better; comparable between feature sets of one data set only."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    return float(np.mean([logme_column(features, (labels == c).astype(np.float64))[0]
                          for c in classes]))


def _folds(labels: np.ndarray, folds: int) -> int:
    return max(2, min(folds, int(np.bincount(labels).min())))


def probe_predictions(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                      seed: int = 0, c: float = 1.0) -> np.ndarray:
    """Out-of-fold class predictions of a logistic-regression probe (standardised inputs,
    stratified folds, at most as many folds as the rarest class has images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300))
    split = StratifiedKFold(_folds(labels, folds), shuffle=True, random_state=seed)
    return cross_val_predict(probe, features, labels, cv=split)


def knn_predictions(features: np.ndarray, labels: np.ndarray, k: int = 10) -> np.ndarray:
    """Leave-one-out predictions of a cosine k-NN vote (ties: the nearest neighbour's
    class among the tied ones)."""
    labels = np.asarray(labels)
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    k = max(1, min(k, len(f) - 1))
    similarity = f @ f.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    votes = labels[nearest]
    out = np.empty(len(f), dtype=labels.dtype)
    for i, row in enumerate(votes):
        counts = np.bincount(row)
        tied = np.flatnonzero(counts == counts.max())
        out[i] = next(v for v in row if v in tied)
    return out


def bootstrap_interval(correct: np.ndarray, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``correct`` (0/1 per image) over images drawn with
    replacement."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(resamples, len(correct)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def kendall_tau(scores: list[float], measured: list[float]) -> float | None:
    """Kendall's tau-b between a score and measured accuracies; None with fewer than 3
    pairs or when either side is constant."""
    from scipy.stats import kendalltau

    if len(scores) < 3 or len(set(scores)) < 2 or len(set(measured)) < 2:
        return None
    tau = kendalltau(scores, measured).statistic
    return None if tau is None or math.isnan(tau) else round(float(tau), 3)


def accuracy_with_interval(predictions: np.ndarray, labels: np.ndarray, resamples: int,
                           seed: int) -> dict[str, Any]:
    correct = np.asarray(predictions) == np.asarray(labels)
    low, high = bootstrap_interval(correct, resamples, seed)
    return {"accuracy": round(float(correct.mean()), 4), "low": round(low, 4),
            "high": round(high, 4)}
