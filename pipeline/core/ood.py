"""Out-of-distribution scores: how much an image looks like the training data, from the pooled
features and logits the classifier already computes. Higher = more like the training data.

* ``msp``: the top softmax probability (the baseline, Hendrycks & Gimpel 2017).
* ``energy``: ``logsumexp(logits)``, the negative free energy (Liu et al. 2020).
* ``mahalanobis``: minus the smallest squared Mahalanobis distance to a class mean, with one
  covariance shared by the classes (Lee et al. 2018). The covariance is Ledoit-Wolf shrunk, so a
  data set with fewer training images than feature dimensions still gets a well-posed fit.
  Stored as a whitening matrix scaled by ``1/sqrt(D)``: ``d_c = ||f W - mu_c W||^2`` is the
  squared distance over the feature size, so every partial sum stays in FP16 range.
* ``knn``: the cosine similarity to the k-th nearest training feature (Sun et al. 2022).
* ``mahalanobis+msp``: the sum of the two, each first put on the val split's scale (minus its
  5 % quantile, over its interquartile range). Mahalanobis catches images of another kind,
  the top probability catches look-alikes of the trained classes; on the digits the sum kept
  the first and beat the baseline on the second (``reports/ood.md``).

:class:`Detector` holds a fitted method's arrays and a threshold set on val so that
``tpr`` (95 %) of in-distribution val images pass; ``in_distribution = sigmoid((score -
threshold) / scale)`` maps the score to [0, 1] with 0.5 at the threshold, the form the exported
graph computes (:func:`pipeline.onnx.convert.deployable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("msp", "energy", "mahalanobis", "knn", "mahalanobis+msp")
KNN_K = 10
TPR = 0.95
SCALE_FLOOR = 1e-3  # of the largest |score| on val


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]


def _normalise(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@dataclass
class Detector:
    """A fitted method: its arrays, the val threshold on the raw score and the scale of the
    [0, 1] mapping."""

    method: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    threshold: float = 0.0
    scale: float = 1.0
    k: int = KNN_K
    # a sum's parts: each part's (offset, scale) on val
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Raw scores, higher = more in-distribution."""
        if self.parts:
            return sum((Detector(name, self.arrays, k=self.k).score(features, logits) - offset)
                       / scale for name, (offset, scale) in self.parts.items())
        features = np.asarray(features, dtype=np.float64)
        if self.method == "msp":
            return _softmax(np.asarray(logits, dtype=np.float64)).max(axis=1)
        if self.method == "energy":
            return _logsumexp(np.asarray(logits, dtype=np.float64))
        if self.method == "mahalanobis":
            z = features @ self.arrays["whiten"]
            centres = self.arrays["centres"]  # class means, whitened
            return -((z[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2).min(axis=1)
        if self.method == "knn":
            sims = _normalise(features) @ self.arrays["bank"].T
            k = min(self.k, sims.shape[1])
            return -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        raise ValueError(f"unknown OOD method {self.method!r}")

    def in_distribution(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The [0, 1] output: 0.5 at the threshold."""
        x = (self.score(features, logits) - self.threshold) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "score_threshold": round(float(self.threshold), 6),
                **({"parts": {name: {"offset": round(o, 6), "scale": round(sc, 6)}
                              for name, (o, sc) in self.parts.items()}} if self.parts else {}),
                "scale": round(float(self.scale), 6), "threshold": 0.5, "tpr_on_val": TPR,
                **({"k": self.k} if self.method == "knn" else {})}


def fit(method: str, features: np.ndarray, labels: np.ndarray, num_classes: int,
        val_features: np.ndarray, val_logits: np.ndarray, k: int = KNN_K) -> Detector:
    """Fit ``method`` on the train split, then set the threshold and scale on val."""
    if "+" in method:
        parts = [fit(name, features, labels, num_classes, val_features, val_logits, k)
                 for name in method.split("+")]
        detector = Detector(method, {n: a for p in parts for n, a in p.arrays.items()}, k=k,
                            parts={p.method: (p.threshold, p.scale) for p in parts})
        return _set_threshold(detector, val_features, val_logits)
    features = np.asarray(features, dtype=np.float64)
    detector = Detector(method, k=k)
    if method == "mahalanobis":
        from sklearn.covariance import LedoitWolf

        present = [c for c in range(num_classes) if (labels == c).any()]
        means = np.stack([features[labels == c].mean(axis=0) for c in present])
        centred = features - means[np.searchsorted(present, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        whiten = np.linalg.cholesky((precision + precision.T) / 2)  # P = W W^T
        whiten /= np.sqrt(features.shape[1])
        detector.arrays = {"whiten": whiten, "centres": means @ whiten}
    elif method == "knn":
        detector.arrays = {"bank": _normalise(features)}
    elif method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r}; one of {', '.join(METHODS)}")
    return _set_threshold(detector, val_features, val_logits)


def _set_threshold(detector: Detector, val_features: np.ndarray,
                   val_logits: np.ndarray) -> Detector:
    """The threshold that lets ``TPR`` of val through, and the interquartile range as scale."""
    val = detector.score(val_features, val_logits)
    detector.threshold = float(np.quantile(val, 1.0 - TPR))
    spread = float(np.quantile(val, 0.75) - np.quantile(val, 0.25))
    # a floor: a saturated score (a softmax at 1.0 on every val image) would otherwise turn
    # float32 rounding into whole units of in_distribution
    floor = SCALE_FLOOR * max(1.0, float(np.abs(val).max()))
    detector.scale = max(spread, floor)
    return detector


PROBE_KINDS = ("noise", "blank", "one colour", "stripes")


def probe_images(size: int, seed: int = 0) -> np.ndarray:
    """Images of no class for checking the detector in every exported file (``size`` square,
    uint8 NHWC, seeded): 4 of noise, black, white, grey, one colour, and two of stripes."""
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    out += [np.full((size, size, 3), c, np.uint8) for c in
            ((0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30))]
    stripes = np.zeros((size, size, 3), np.uint8)
    stripes[:, ::8] = 255
    out += [stripes, np.ascontiguousarray(stripes.transpose(1, 0, 2))]
    return np.stack(out)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of in (positive) against out; 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = TPR) -> float:
    """Share of out images that pass the threshold letting ``tpr`` of the in images through."""
    threshold = np.quantile(in_scores, 1.0 - tpr)
    return float((np.asarray(out_scores) >= threshold).mean())


def torch_module(detector: Detector) -> Any:
    """The detector as a torch module, (pooled features, logits) -> in_distribution [N] in
    [0, 1]: what the exported graph computes, in float32."""
    import torch
    from torch import nn

    class InDistribution(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.method, self.k = detector.method, detector.k
            self.threshold, self.scale = float(detector.threshold), float(detector.scale)
            for name, array in detector.arrays.items():
                self.register_buffer(name, torch.from_numpy(np.asarray(array, np.float32)))

        def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            if detector.parts:
                score = sum((self.part_score(name, features, logits) - offset) / scale
                            for name, (offset, scale) in detector.parts.items())
            else:
                score = self.part_score(self.method, features, logits)
            return torch.sigmoid((score - self.threshold) / self.scale)

        def part_score(self, method: str, features: torch.Tensor,
                       logits: torch.Tensor) -> torch.Tensor:
            if method == "mahalanobis":
                z = features @ self.whiten
                d = ((z[:, None, :] - self.centres[None, :, :]) ** 2).sum(dim=2)
                return -d.min(dim=1).values
            if method == "knn":
                f = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
                sims = f @ self.bank.T
                return sims.topk(min(self.k, self.bank.shape[0]), dim=1).values[:, -1]
            if method == "energy":
                return torch.logsumexp(logits, dim=1)
            return torch.softmax(logits, dim=1).max(dim=1).values

    return InDistribution().eval()
