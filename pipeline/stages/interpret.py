"""Stage interpret: where the shipped model is wrong, and which labels look wrong.

Runs the exported ONNX model (the file apps get, through :mod:`pipeline.onnx.runner`, so exactly the
deployed preprocessing) over the chosen splits of the prepared data and writes, per split:

* ``<split>_losses.csv``: every image with its label, the predicted class, the probability of
  each and the loss (-log p(label)), highest loss first (fastai's ``top_losses``);
* ``<split>_top_losses.png``: a contact sheet of the ``interpret.top_losses`` highest-loss
  images, captioned label / prediction / probabilities (fastai's ``plot_top_losses``);
* in ``metrics/interpret.json``: accuracy, mean loss, error count and the most confused
  (actual, predicted) pairs (fastai's ``most_confused``);
* with a model that has the ``in_distribution`` output: ``<split>_least_typical.png``, the
  images it scores lowest (on train: outliers, odd crops or images of no class that slipped
  into the data), and the share of the split below the model's threshold.

On the **test** split these are the model's mistakes, worst first. On the **train** split the
highest losses are the images the model, having trained on them, still disagrees with: the
first place to look for mislabeled or ambiguous training images before the next run.

Run: ``pipeline interpret --model models/model.onnx --out reports/interpret``
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..core.atomic import atomic_dir, write_csv, write_json
from ..core.config import InterpretParams
from ..core.copies import PreparedImages
from ..core.dataset import read_prepared
from ..core.errors import PipelineError

Split = Literal["train", "val", "test"]


def split_probabilities(classifier: Any, images: PreparedImages, keys: list[str],
                        batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and in_distribution scores (None without the output) of the exported
    model for each decoded copy (rows in input order; not empty). A batch shares one size, so
    images are grouped by shape first."""
    probs, in_dist = classifier.scores_of([classifier.prepare(images.rgb(k)) for k in keys],
                                          batch_size)
    return probs.astype(np.float64), in_dist


def contact_sheet(entries: list[dict[str, Any]], images: PreparedImages, title: str,
                  path: Path) -> None:
    """A grid of thumbnails with 'label / predicted / p' captions, written as PNG."""
    import matplotlib
    from PIL import Image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, entries):
        image = Image.fromarray(images.rgb(e["path"]))
        image.thumbnail((256, 256))
        ax.imshow(np.asarray(image), interpolation="nearest")
        typical = (f"\nin_distribution {e['in_distribution']:.3f}"
                   if e.get("in_distribution") is not None else "")
        ax.set_title(f"{e['label']} -> {e['predicted']}\np(label) {e['p_label']:.3f}, "
                     f"p(pred) {e['p_predicted']:.3f}" + typical, fontsize=8,
                     color="black" if e["label"] == e["predicted"] else "firebrick")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The shipped model's test errors (the figure to compare across runs)."""
    test = report["splits"].get("test")
    return {"errors": test["errors"]} if test else {}


def run(params: InterpretParams, model_path: str | Path, prepared_dir: str | Path,
        out_dir: str | Path, report_path: str | Path,
        metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Interpret the exported model on ``params.splits``; write ``out_dir`` and metrics."""
    from ..onnx.runner import OnnxClassifier

    classifier = OnnxClassifier(model_path, ["cpu"], params.threads)
    summary, classes, rows = read_prepared(prepared_dir)
    if classes != classifier.classes:
        raise PipelineError(f"{model_path}: the model's classes differ from {prepared_dir}'s; "
                            "re-run the chain (dvc repro)")
    images = PreparedImages(prepared_dir)
    report: dict[str, Any] = {"model": str(model_path),
                              "probability_calibration": classifier.contract.values.get(
                                  "probability_calibration", "none"),
                              "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for split in params.splits:
            chosen = [r for r in rows if r["split"] == split]
            if not chosen:
                report["splits"][split] = {"images": 0}
                continue
            labels = [classes.index(r["label"]) for r in chosen]
            probs, in_dist = split_probabilities(classifier, images,
                                                 [r["path"] for r in chosen], params.batch_size)
            idx = np.arange(len(chosen))
            p_label = probs[idx, labels]
            predicted = probs.argmax(1)
            loss = -np.log(np.maximum(p_label, 1e-12))
            order = sorted(idx, key=lambda i: (-loss[i], chosen[i]["path"]))
            entries = [{"path": chosen[i]["path"], "label": chosen[i]["label"],
                        "predicted": classes[predicted[i]], "p_label": float(p_label[i]),
                        "p_predicted": float(probs[i, predicted[i]]), "loss": float(loss[i]),
                        "in_distribution": None if in_dist is None else float(in_dist[i])}
                       for i in order]
            write_csv(tmp / f"{split}_losses.csv",
                      ("path", "label", "predicted", "p_label", "p_predicted", "loss"),
                      ((e["path"], e["label"], e["predicted"], f"{e['p_label']:.6g}",
                        f"{e['p_predicted']:.6g}", f"{e['loss']:.6g}") for e in entries))
            top = entries[:params.top_losses]
            contact_sheet(top, images, f"{split}: {len(top)} highest losses of "
                          f"{len(entries)} ({Path(model_path).name})",
                          tmp / f"{split}_top_losses.png")
            typical: dict[str, Any] = {}
            if in_dist is not None:
                least = sorted(entries, key=lambda e: (e["in_distribution"], e["path"]))
                contact_sheet(least[:params.top_losses], images, f"{split}: "
                              f"{min(params.top_losses, len(least))} least typical of "
                              f"{len(least)} (lowest in_distribution)",
                              tmp / f"{split}_least_typical.png")
                typical = {"below_threshold": float((in_dist < classifier.ood_threshold).mean()),
                           "least_typical": [{k: e[k] for k in ("path", "label",
                                                                "in_distribution")}
                                             for e in least[:5]]}
            confused = Counter((e["label"], e["predicted"]) for e in entries
                               if e["label"] != e["predicted"])
            report["splits"][split] = {
                "images": len(entries),
                "accuracy": float((predicted == np.array(labels)).mean()),
                "mean_loss": float(loss.mean()),
                "errors": sum(confused.values()),
                "most_confused": [{"actual": a, "predicted": p, "count": n} for (a, p), n in
                                  sorted(confused.items(), key=lambda kv: (-kv[1], kv[0]))
                                  [:params.most_confused]],
                "top_losses": [{k: e[k] for k in ("path", "label", "predicted", "p_label")}
                               for e in entries[:5]],
                **typical,
            }
    write_json(report_path, report)
    if metrics_path is not None:
        write_json(metrics_path, headline(report))
    for split, s in report["splits"].items():
        if s["images"]:
            pairs = ", ".join(f"{c['actual']}->{c['predicted']} x{c['count']}"
                              for c in s["most_confused"][:3]) or "none"
            print(f"interpret {split}: {s['images']} images, accuracy {s['accuracy']:.4f}, "
                  f"{s['errors']} errors; most confused: {pairs}; highest loss "
                  f"{s['top_losses'][0]['path']}")
    return report
