"""Temperature scaling and calibration figures on synthetic logits with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.calibration import (
    LOG_T_BOUNDS,
    accuracy_bound,
    calibration_figures,
    cross_fitted_check,
    mean_confidence,
    brier_score,
    calibration_report,
    choose_temperature,
    confidence_floor,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    nll_temperature,
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


def test_a_perfect_val_split_cannot_send_the_temperature_to_its_bound():
    """Perfectly separable val: the NLL alone keeps falling as T -> 0 and hits the lower
    bound; the fit stops where the mean confidence reaches what 20 right answers vouch for,
    (20 + 0.5) / 21 under Jeffreys' prior."""
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = np.array([0, 1] * 10)
    assert nll_temperature(logits, labels) < confidence_floor(logits, labels)
    t = fit_temperature(logits, labels)
    assert math.exp(LOG_T_BOUNDS[0]) <= t <= math.exp(LOG_T_BOUNDS[1])
    assert t == pytest.approx(confidence_floor(logits, labels))
    assert softmax(logits, t).max(axis=1).mean() == pytest.approx(20.5 / 21, abs=1e-9)
    assert t > 1.0  # 0.993 at T = 1 is more than 20 examples vouch for: softer, not sharper
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def synthetic(n: int, classes: int, rng: np.random.Generator,
              scale: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits from which labels are drawn at T = 1 (calibrated by construction), then scaled
    down 3x (an under-confident network, as label smoothing makes them)."""
    logits = rng.normal(0.0, scale, size=(n, classes))
    p = softmax(logits)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits / 3.0, labels


def test_with_an_error_free_val_split_held_out_nll_and_ece_still_improve():
    """The failure the NLL-only fit had: val 150/150 right, test (same distribution) 15 errors
    in 600. NLL-only T collapses to its bound and multiplies the test NLL; the bounded fit
    lowers both test NLL and ECE."""
    logits, labels = synthetic(750, 5, np.random.default_rng(0))
    vl, vy, tl, ty = logits[:150], labels[:150], logits[150:], labels[150:]
    assert (vl.argmax(1) != vy).sum() == 0 and (tl.argmax(1) != ty).sum() == 15
    collapsed = nll_temperature(vl, vy)
    assert negative_log_likelihood(tl, ty, collapsed) > 5 * negative_log_likelihood(tl, ty)
    chosen = choose_temperature(vl, vy, bins=15)
    assert chosen["applied"] and chosen["val_errors"] == 0
    t = chosen["temperature"]
    assert negative_log_likelihood(tl, ty, t) < negative_log_likelihood(tl, ty)
    assert expected_calibration_error(softmax(tl, t), ty) < \
        expected_calibration_error(softmax(tl), ty)


def test_the_cross_fitted_check_ships_the_plain_softmax_when_scaling_would_hurt():
    """Val whose two folds disagree (one all right, one all wrong, as the folds interleave the
    label-sorted examples): each fold's T makes the other fold worse, so export keeps T = 1."""
    logits = np.array([[1.0, 0.0], [0.0, 1.0]] * 10)   # every other example predicted 1
    labels = np.zeros(20, dtype=int)                    # fold 0 right, fold 1 wrong
    chosen = choose_temperature(logits, labels, bins=15)
    assert not chosen["cross_fitted"]["passed"] and not chosen["applied"]
    assert chosen["temperature"] == 1.0 and chosen["fitted_temperature"] != 1.0
    oof = chosen["cross_fitted"]["out_of_fold"]
    assert oof["nll_after"] > oof["nll_before"]


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


def test_accuracy_bound_counts_exact_matches_only():
    # one of three right: (1 + 0.5) / (3 + 1); a class index above the label is not a match
    assert accuracy_bound(np.array([1, 0, 2]), np.array([0, 1, 2])) == pytest.approx(1.5 / 4)
    assert accuracy_bound(np.array([0, 0]), np.array([0, 0])) == pytest.approx(2.5 / 3)


def test_the_confidence_floor_is_the_smallest_t_whose_confidence_the_accuracy_vouches_for():
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0], [2.0, 0.0, 1.0]])
    labels = np.array([0, 1, 2, 2])  # three right, the last one wrong
    bound = (3 + 0.5) / (4 + 1)
    floor = confidence_floor(logits, labels)
    assert mean_confidence(logits, floor) == pytest.approx(bound, abs=1e-9)
    assert mean_confidence(logits, floor * 0.999) > bound
    # bounds: a model already less confident than the bound at T = 0.01 gets T = 0.01;
    # one that stays too confident at T = 100 gets T = 100
    flat = np.zeros((4, 3))
    assert confidence_floor(flat, np.zeros(4, int)) == pytest.approx(math.exp(LOG_T_BOUNDS[0]))
    huge = np.array([[1e5, 0.0]] * 3)
    assert confidence_floor(huge, np.array([0, 1, 1])) == pytest.approx(
        math.exp(LOG_T_BOUNDS[1]))
    # the fitted T never goes below the floor, whatever the NLL prefers
    assert fit_temperature(logits, labels) >= floor


def test_reliability_bins_are_closed_on_the_right():
    probs = np.array([[0.5, 0.5], [0.75, 0.25], [0.25, 0.75], [1.0, 0.0]])
    labels = np.array([0, 0, 0, 0])
    rows = reliability(probs, labels, 4)
    assert [(r["bin"], r["count"]) for r in rows] == [(1, 1), (2, 2), (3, 1)]
    assert [(r["lower"], r["upper"]) for r in rows] == [(0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [r["accuracy"] for r in rows] == [1.0, 0.5, 1.0]
    # a softmax that rounds a hair above 1 still lands in the top bin
    (top,) = reliability(np.array([[np.nextafter(1.0, 2.0), 0.0]]), np.array([0]), 4)
    assert (top["bin"], top["count"]) == (3, 1)
    assert expected_calibration_error(probs, labels, 4) == pytest.approx(
        0.25 * 0.5 + 0.5 * 0.25 + 0.25 * 0.0)


def test_figures_and_report_at_a_given_temperature():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = np.array([0, 1, 1])
    figures = calibration_figures(logits, labels, 2.0, bins=10)
    probs = softmax(logits, 2.0)
    assert figures == pytest.approx({
        "nll": negative_log_likelihood(logits, labels, 2.0),
        "ece": expected_calibration_error(probs, labels, 10),
        "brier": brier_score(probs, labels), "mean_confidence": probs.max(1).mean(),
        "accuracy": 2 / 3})
    assert softmax(logits, 2.0)[0, 0] == pytest.approx(1 / (1 + math.exp(-1.0)))
    report = calibration_report(logits, labels, logits[:2], labels[:2], 2.0, "temperature", 10)
    assert report["val"]["images"] == 3 and report["test"]["images"] == 2
    assert report["val"]["before"] == calibration_figures(logits, labels, 1.0, 10)
    assert report["val"]["after"] == figures
    assert report["test"]["after"]["accuracy"] == 1.0
    assert "fit" not in report and "test" not in calibration_report(
        logits, labels, logits[:0], labels[:0], 2.0, "temperature", 10)


def test_the_cross_fitted_check_fits_on_the_other_fold_and_scores_the_held_out_one():
    logits, labels = _sample(2.5, n=400, classes=3, seed=1)
    check = cross_fitted_check(logits, labels, bins=10, folds=2)
    order = np.argsort(labels, kind="stable")
    folds = [order[0::2], order[1::2]]  # interleaved over the label-sorted examples
    expected = [fit_temperature(logits[folds[1 - f]], labels[folds[1 - f]]) for f in (0, 1)]
    assert check["fold_temperatures"] == pytest.approx(expected)
    calibrated = np.zeros((len(labels), 3))
    for f in (0, 1):
        calibrated[folds[f]] = softmax(logits[folds[f]], expected[f])
    oof = check["out_of_fold"]
    assert oof["nll_after"] == pytest.approx(
        -np.log(calibrated[np.arange(len(labels)), labels]).mean())
    assert oof["nll_before"] == pytest.approx(negative_log_likelihood(logits, labels))
    assert oof["ece_after"] == pytest.approx(expected_calibration_error(calibrated, labels, 10))
    # over-confident logits (labels drawn at T = 2.5): scaling helps on held-out images
    assert oof["nll_after"] < oof["nll_before"] and check["passed"]
    chosen = choose_temperature(logits, labels, bins=10)
    assert chosen["applied"] and chosen["temperature"] == chosen["fitted_temperature"]
    assert chosen["temperature"] == fit_temperature(logits, labels)
    assert chosen["val_errors"] == int((logits.argmax(1) != labels).sum())
