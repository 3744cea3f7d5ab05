"""Out-of-distribution scores: each method orders a hand-built in/out case, thresholds keep 95 %
of val, the torch module is the numpy score, and the metrics are the textbook ones."""

import numpy as np
import pytest
import torch

from pipeline.core import ood


def blobs(seed=0, dim=16, per_class=60, classes=3):
    """Three tight classes around far-apart centres, and their logits (distance-based)."""
    centres = np.random.default_rng(0).normal(0, 6, (classes, dim))  # the same classes
    rng = np.random.default_rng(seed)  # fresh draws of them
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + rng.normal(0, 1, (len(labels), dim))
    return centres, features.astype(np.float32), labels


def logits_of(centres, features):
    return -((features[:, None, :] - centres[None]) ** 2).sum(2) / 200


@pytest.mark.parametrize("method", ood.METHODS)
def test_each_method_scores_training_like_images_above_images_of_no_class(method):
    centres, train, labels = blobs()
    _, val, _ = blobs(seed=1)
    rng = np.random.default_rng(2)
    # out: halfway between two class centres (k-NN/Mahalanobis: far from every class;
    # softmax: torn between two)
    out = ((centres[0] + centres[1]) / 2 + rng.normal(0, 1, (30, 16))).astype(np.float32)
    det = ood.fit(method, train, labels, 3, val, logits_of(centres, val))
    _, test_in, _ = blobs(seed=3)
    s_in = det.score(test_in, logits_of(centres, test_in))
    s_out = det.score(out, logits_of(centres, out))
    assert ood.auroc(s_in, s_out) > 0.9
    # the threshold lets 95 % of val through, and in_distribution is 0.5 there
    s_val = det.score(val, logits_of(centres, val))
    assert (s_val >= det.threshold).mean() == pytest.approx(0.95, abs=0.01)
    in_val = det.in_distribution(val, logits_of(centres, val))
    assert ((in_val >= 0.5) == (s_val >= det.threshold)).all()
    assert ((in_val >= 0) & (in_val <= 1)).all()
    # the exported graph computes the same in float32
    module = ood.torch_module(det)
    with torch.no_grad():
        got = module(torch.from_numpy(test_in), torch.from_numpy(
            logits_of(centres, test_in).astype(np.float32))).numpy()
    assert np.abs(got - det.in_distribution(test_in, logits_of(centres, test_in))).max() < 1e-4


def test_mahalanobis_uses_the_shared_covariance_not_euclidean_distance():
    """Features stretched along one axis: a point far along the stretched axis is typical; the
    same distance across it is not. Euclidean distance cannot tell them apart."""
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (400, 2)) * np.array([10.0, 0.5])
    labels = np.zeros(400, dtype=np.int64)
    det = ood.fit("mahalanobis", train, labels, 1, train[:100], np.zeros((100, 1)))
    along, across = np.array([[8.0, 0.0]]), np.array([[0.0, 8.0]])
    zero = np.zeros((1, 1))
    assert det.score(along, zero)[0] > det.threshold > det.score(across, zero)[0]


def test_fewer_images_than_dimensions_still_gives_a_finite_fit():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (20, 64)).astype(np.float32)
    det = ood.fit("mahalanobis", train, np.arange(20) % 2, 2, train[:10], np.zeros((10, 2)))
    assert np.isfinite(det.arrays["whiten"]).all()
    assert np.isfinite(det.score(rng.normal(0, 1, (5, 64)), np.zeros((5, 2)))).all()


def test_knn_is_the_kth_nearest_cosine_similarity():
    bank = np.eye(4)
    det = ood.Detector("knn", {"bank": bank}, k=2)
    x = np.array([[1.0, 0.5, 0.0, 0.0]])
    sims = (x / np.linalg.norm(x)) @ bank.T
    assert det.score(x, None)[0] == pytest.approx(np.sort(sims[0])[-2])


def test_energy_and_msp_are_the_formulas():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    e = np.exp(logits)
    assert ood.Detector("energy").score(None, logits) == pytest.approx(np.log(e.sum(1)))
    assert ood.Detector("msp").score(None, logits) == pytest.approx((e / e.sum(1, keepdims=True))
                                                                    .max(1))
    with pytest.raises(ValueError, match="unknown OOD method"):
        ood.fit("vim", np.zeros((4, 2)), np.zeros(4, int), 1, np.zeros((4, 2)), np.zeros((4, 1)))


def test_auroc_and_fpr_at_95_tpr_known_values():
    ins, outs = np.arange(100, 200, dtype=float), np.arange(0, 100, dtype=float)
    assert ood.auroc(ins, outs) == 1.0 and ood.auroc(outs, ins) == 0.0
    assert ood.fpr_at_tpr(ins, outs) == 0.0
    # out scores equal to in scores: everything at or above the 5th percentile passes
    assert ood.fpr_at_tpr(ins, ins) == pytest.approx(0.95, abs=0.01)


def test_a_split_too_small_for_a_detector_ships_without_it_and_says_why():
    from pipeline.core.config import ExportParams
    from pipeline.stages.export import fit_detector

    rows = [{"path": "a.png", "label": "x", "split": "train"}]
    detector, entry = fit_detector(ExportParams(), None, None, rows, np.zeros((3, 4)),
                                   np.zeros((3, 2)), ["x", "y"], None)
    assert detector is None and entry["method"] == "none"
    assert entry["reason"] == "too few images to fit mahalanobis+msp (1 train, 3 val; at least 2 of each)"
    detector, entry = fit_detector(ExportParams(), None, None, rows * 5, None,
                                   np.zeros((0, 2)), ["x", "y"], None)
    assert detector is None and "(5 train, 0 val;" in entry["reason"]
    detector, entry = fit_detector(ExportParams(ood="none"), None, None, rows * 5,
                                   np.zeros((3, 4)), np.zeros((3, 2)), ["x", "y"], None)
    assert detector is None and entry == {"method": "none", "reason": "export.ood: none"}
