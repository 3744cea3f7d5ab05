"""Temperature scaling and calibration figures on synthetic logits with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.calibration import (
    LOG_T_BOUNDS,
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability,
    softmax,
)


def _sample(true_temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / true_temperature): T is then the answer."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, classes)).astype(np.float32)
    probs = softmax(logits, true_temperature)
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_at(true_temperature):
    logits, labels = _sample(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # the same inputs give the same T (the export must be reproducible)
    assert fit_temperature(logits, labels) == fitted


def test_calibrated_probabilities_are_better_and_keep_the_top1():
    logits, labels = _sample(2.5)  # the raw softmax is over-confident
    t = fit_temperature(logits, labels)
    report = calibration_report(logits[:10000], labels[:10000], logits[10000:],
                                labels[10000:], t, "temperature", 15)
    for split in ("val", "test"):
        before, after = report[split]["before"], report[split]["after"]
        assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
        assert after["ece"] < 0.02 < before["ece"]
        assert after["accuracy"] == before["accuracy"]
        assert after["mean_confidence"] < before["mean_confidence"]
    assert np.array_equal(softmax(logits, t).argmax(1), logits.argmax(1))


def test_fit_is_bounded_and_never_worse_than_one():
    # perfectly separable: the NLL keeps falling as T -> 0 (until float64 cannot tell); T stays
    # inside the bounds and sharpens the probabilities
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = np.array([0, 1] * 10)
    t = fit_temperature(logits, labels)
    assert math.exp(LOG_T_BOUNDS[0]) <= t < 0.2
    assert negative_log_likelihood(logits, labels, t) < 1e-9
    assert negative_log_likelihood(logits, labels, t) <= negative_log_likelihood(logits, labels)
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_nll_ece_brier_and_reliability_on_hand_made_cases():
    # confidence 0.8 everywhere: 8 of 10 right is calibrated, 10 of 10 is 0.2 under-confident
    probs = np.tile([0.8, 0.2], (10, 1))
    eight_right = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, eight_right, 10) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.zeros(10, int), 10) == pytest.approx(0.2)
    (row,) = reliability(probs, eight_right, 10)
    assert (row["bin"], row["count"], row["accuracy"]) == (7, 10, 0.8)  # 0.8 is in (0.7, 0.8]
    assert row["confidence"] == pytest.approx(0.8)
    assert brier_score(np.eye(3), np.arange(3)) == 0.0
    assert brier_score(np.full((4, 2), 0.5), np.zeros(4, int)) == pytest.approx(0.5)
    assert negative_log_likelihood(np.zeros((3, 4)), np.array([0, 1, 2])) == \
        pytest.approx(math.log(4))
    # large logits do not overflow
    assert math.isfinite(negative_log_likelihood(np.array([[1e4, -1e4]]), np.array([1])))
