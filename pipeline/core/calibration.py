"""Probability calibration: temperature scaling fitted on the val split (Guo et al., 2017).

A classifier's softmax outputs are often not probabilities in the everyday sense: label
smoothing and early stopping make a network under-confident, long training over-confident. An
app that thresholds on them ("ask a human below 0.9") then decides wrongly. Temperature scaling
divides the logits by one number T, fitted to minimise the negative log-likelihood on the val
split. It never changes the top-1 class, costs one division in the graph, and fixes most of the
miscalibration of modern networks.

``pipeline export`` (``export.probability_calibration: temperature``, the default) fits T on the
val logits of the PyTorch model, bakes it into the ONNX graph (``probabilities =
softmax(logits / T)``; the optional ``logits`` output stays raw), stamps it in the metadata and
reports NLL, expected calibration error (ECE) and Brier score before and after, on val (where T
was fitted) and on test (held out), plus a reliability table for ``dvc plots show``.

Run: it is part of ``pipeline export``; the functions take numpy logits and integer labels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# T is searched as log T in this range (T from 0.01 to 100): wide enough for any network we
# export, bounded so a degenerate val split cannot send it to 0 or infinity.
LOG_T_BOUNDS = (math.log(0.01), math.log(100.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean -log p(true class) of softmax(logits / T)."""
    z = logits.astype(np.float64) / temperature
    z_max = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - z_max).sum(axis=1)) + z_max[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling that holds on held-out data: the T that minimises the val NLL, but
    never so low that the mean top-1 confidence on val exceeds the accuracy val can vouch for.

    With few or no val errors the NLL alone drives T to its lower bound (every val answer is
    right, so more confidence always looks better), and the model then says 0.99999 while it is
    wrong on held-out images. The bound is the posterior mean accuracy under Jeffreys' prior,
    ``(correct + 0.5) / (n + 1)``: on a perfect val split of 269 images, 0.998; with errors
    it sits within a fraction of a point of the observed accuracy and rarely binds."""
    if len(labels) == 0:
        raise ValueError("temperature scaling needs at least one labelled example")
    return max(nll_temperature(logits, labels), confidence_floor(logits, labels))


def nll_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in ``LOG_T_BOUNDS`` that minimises the NLL of softmax(logits / T) on these labels.

    The NLL is convex in 1/T, so a bounded scalar search on log T finds the optimum; the
    result is deterministic for the same inputs. Never worse than T = 1 on these labels."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels,
                                                                   math.exp(log_t)),
                             bounds=LOG_T_BOUNDS, method="bounded",
                             options={"xatol": 1e-6})
    best = math.exp(float(result.x))
    # the bounded search can stop a hair off; T = 1 is always a candidate
    if negative_log_likelihood(logits, labels, best) > negative_log_likelihood(logits, labels):
        best = 1.0
    return best


def accuracy_bound(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Posterior mean accuracy under Jeffreys' prior: (correct + 0.5) / (n + 1)."""
    return (float((predictions == labels).sum()) + 0.5) / (len(labels) + 1)


def mean_confidence(logits: np.ndarray, temperature: float) -> float:
    return float(softmax(logits, temperature).max(axis=1).mean())


def confidence_floor(logits: np.ndarray, labels: np.ndarray) -> float:
    """The smallest T in ``LOG_T_BOUNDS`` whose mean top-1 confidence is at most
    :func:`accuracy_bound` (mean confidence falls as T grows, so bisection on log T)."""
    bound = accuracy_bound(labels, logits.argmax(axis=1))
    lo, hi = LOG_T_BOUNDS
    if mean_confidence(logits, math.exp(lo)) <= bound:
        return math.exp(lo)
    if mean_confidence(logits, math.exp(hi)) > bound:
        return math.exp(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_confidence(logits, math.exp(mid)) > bound:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """Top-label reliability table: per equal-width confidence bin, count, mean confidence
    and accuracy (empty bins are left out)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # bin i holds confidences in (i/bins, (i+1)/bins]; confidence 0 cannot occur (>= 1/classes)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        mask = index == i
        if mask.any():
            rows.append({"bin": i, "lower": i / bins, "upper": (i + 1) / bins,
                         "count": int(mask.sum()),
                         "confidence": float(confidence[mask].mean()),
                         "accuracy": float(correct[mask].mean())})
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (share of examples) x |accuracy - mean confidence|."""
    n = len(labels)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(probs, labels, bins)))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of the squared distance between probs and the one-hot label."""
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def calibration_figures(logits: np.ndarray, labels: np.ndarray, temperature: float,
                        bins: int) -> dict[str, float]:
    """NLL, ECE, Brier score and mean confidence at this temperature, and the accuracy."""
    probs = softmax(logits, temperature)
    return {"nll": negative_log_likelihood(logits, labels, temperature),
            "ece": expected_calibration_error(probs, labels, bins),
            "brier": brier_score(probs, labels),
            "mean_confidence": float(probs.max(axis=1).mean()),
            "accuracy": float((probs.argmax(axis=1) == labels).mean())}


def calibration_report(val_logits: np.ndarray, val_labels: np.ndarray,
                       test_logits: np.ndarray, test_labels: np.ndarray, temperature: float,
                       method: str, bins: int,
                       fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures before (T = 1) and after (T = ``temperature``) on val and test, with how
    T was chosen (``fit``: see :func:`choose_temperature`)."""
    report: dict[str, Any] = {"method": method, "temperature": temperature,
                              "fitted_on": "val", "bins": bins}
    if fit is not None:
        report["fit"] = fit
    for split, logits, labels in (("val", val_logits, val_labels),
                                  ("test", test_logits, test_labels)):
        if len(labels):
            report[split] = {"images": int(len(labels)),
                             "before": calibration_figures(logits, labels, 1.0, bins),
                             "after": calibration_figures(logits, labels, temperature, bins)}
    return report


def cross_fitted_check(logits: np.ndarray, labels: np.ndarray, bins: int,
                       folds: int = 2) -> dict[str, Any]:
    """Would temperature scaling help on images it was not fitted on? Fit on all val folds but
    one, score the left-out fold, for each fold; compare the out-of-fold NLL and ECE with the
    plain softmax's on the same images. Folds interleave the examples sorted by label, so each
    holds every class."""
    order = np.argsort(labels, kind="stable")
    fold_of = np.empty(len(labels), dtype=int)
    fold_of[order] = np.arange(len(labels)) % folds
    calibrated = np.zeros((len(labels), logits.shape[1]))
    temperatures = []
    for f in range(folds):
        held, fit = fold_of == f, fold_of != f
        if not held.any() or not fit.any():
            continue
        t = fit_temperature(logits[fit], labels[fit])
        temperatures.append(t)
        calibrated[held] = softmax(logits[held], t)
    plain = softmax(logits)
    picked = calibrated[np.arange(len(labels)), labels]
    nll_cal = float(np.mean(-np.log(np.clip(picked, 1e-300, None))))
    nll_plain = negative_log_likelihood(logits, labels)
    ece_cal = expected_calibration_error(calibrated, labels, bins)
    ece_plain = expected_calibration_error(plain, labels, bins)
    return {"folds": folds, "fold_temperatures": temperatures,
            "out_of_fold": {"nll_before": nll_plain, "nll_after": nll_cal,
                            "ece_before": ece_plain, "ece_after": ece_cal},
            "passed": bool(nll_cal <= nll_plain and ece_cal <= ece_plain)}


def choose_temperature(logits: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, Any]:
    """T for export, and why: :func:`fit_temperature` on the whole val split, shipped only if
    the cross-fitted check says it helps on val images it was not fitted on (else T = 1, the
    plain softmax)."""
    check = cross_fitted_check(logits, labels, bins)
    fitted = fit_temperature(logits, labels)
    return {"temperature": fitted if check["passed"] else 1.0, "applied": check["passed"],
            "fitted_temperature": fitted,
            "nll_temperature": nll_temperature(logits, labels),
            "confidence_floor": confidence_floor(logits, labels),
            "val_errors": int((logits.argmax(axis=1) != labels).sum()),
            "accuracy_bound": accuracy_bound(labels, logits.argmax(axis=1)),
            "cross_fitted": check}
