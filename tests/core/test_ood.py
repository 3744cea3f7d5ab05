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


def test_knn_default_k_is_the_tenth_neighbour_and_torch_agrees_on_a_small_bank():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (200, 8)).astype(np.float32)
    det = ood.fit("knn", train, np.zeros(200, int), 1, train[:50], np.zeros((50, 1)))
    x = rng.normal(0, 1, (7, 8))
    sims = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ det.arrays["bank"].T
    assert det.k == 10
    assert det.score(x, None) == pytest.approx(np.sort(sims, axis=1)[:, -10])
    # fewer training images than k: the farthest one; the graph's top-k asks no more than N
    small = ood.fit("knn", train[:4], np.zeros(4, int), 1, train[:4], np.zeros((4, 1)))
    with torch.no_grad():
        got = ood.torch_module(small)(torch.from_numpy(x.astype(np.float32)),
                                      torch.zeros(7, 1)).numpy()
    assert got == pytest.approx(small.in_distribution(x, None), abs=1e-5)


def test_method_names_read_from_a_file_select_the_same_score():
    """Names come from params.yaml at run time (not the code's own literals)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.0]])
    for name in ("energy", "msp"):
        runtime = "".join(list(name))
        det = ood.Detector(runtime, threshold=0.1, scale=0.7)
        with torch.no_grad():
            got = ood.torch_module(det)(torch.zeros(2, 4), logits).numpy()
        assert got == pytest.approx(det.in_distribution(np.zeros((2, 4)), logits.numpy()),
                                    abs=1e-6)


def test_the_scale_is_val_s_interquartile_range_and_never_zero():
    val_logits = np.array([[v, 0.0] for v in np.linspace(0, 4, 101)])
    det = ood.fit("energy", None, None, 2, None, val_logits)
    scores = ood.Detector("energy").score(None, val_logits)
    assert det.scale == pytest.approx(np.quantile(scores, 0.75) - np.quantile(scores, 0.25))
    assert det.threshold == pytest.approx(np.quantile(scores, 0.05))
    assert det.describe()["scale"] == round(det.scale, 6)
    flat = ood.fit("msp", None, None, 2, None, np.zeros((20, 2)))  # every val score equal
    assert flat.scale == pytest.approx(1e-3) and np.isfinite(flat.in_distribution(None, np.ones((3, 2)))).all()
    parts = ood.fit("mahalanobis+msp", np.eye(4)[[0, 1, 2, 3] * 5] + 0.01 * np.arange(20)[:, None],
                    np.array([0, 1] * 10), 2, np.eye(4)[[0, 1] * 5], val_logits[:10])
    for name, (offset, scale) in parts.parts.items():
        assert parts.describe()["parts"][name] == {"offset": round(offset, 6),
                                                   "scale": round(scale, 6)}


def test_a_class_without_training_images_leaves_mahalanobis_finite():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (30, 4))
    det = ood.fit("mahalanobis", train, np.array([0, 1] * 15), 3, train[:10], np.zeros((10, 3)))
    assert det.arrays["centres"].shape[0] == 2
    assert np.isfinite(det.score(rng.normal(0, 1, (5, 4)), None)).all()


def test_probe_images_are_the_kinds_the_card_names():
    probes = ood.probe_images(16)
    assert probes.shape == (10, 16, 16, 3) and probes.dtype == np.uint8
    flat = [tuple(int(v) for v in p[0, 0]) for p in probes if (p == p[0, 0]).all()]
    assert flat == [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30)]
    noisy = [p for p in probes if len(np.unique(p)) > 200]
    assert len(noisy) == 4
    assert ood.PROBE_KINDS == ("noise", "blank", "one colour", "stripes")
