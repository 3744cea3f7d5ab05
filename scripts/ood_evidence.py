"""Which out-of-distribution score should the exported model carry? Measured on the default.

In-distribution: the digits' test split through the shipped (fine-tuned) model. Far sets,
built offline (100 images each, seeded): crops of scikit-image's photographs, crops of its
textures (brick, grass, gravel), LFW face crops, uniform noise, and blank or single-colour
images. Each image goes through the model's own resize-and-crop, like an app's would. Near
sets: two digits held out of training (three pairs): a head trained on the other eight
digits' frozen features (``data/features``), every method fitted on those eight, the held-out
digits' val and test images scored against the eight's test images.

Per method (:mod:`pipeline.core.ood`): AUROC and the false-positive rate at 95 % true-positive
rate (threshold set on the in-distribution test scores here; the exported model's threshold
comes from val). Writes ``reports/ood.json`` and ``reports/ood.md``.

Run (after ``dvc repro``): ``python scripts/ood_evidence.py`` (``--cost-only``: time again;
``python scripts/ood_evidence.py /tmp/evsets/charts``: add another data set, a folder of
``root/<class>/*`` images, e.g. from ``scripts/make_evidence_sets.py``)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core import ood  # noqa: E402
from pipeline.core.atomic import write_json, write_text  # noqa: E402
from pipeline.core.preprocess import Preprocessing, normalize, resize_and_crop  # noqa: E402
from pipeline.core.runtime import cpu_name  # noqa: E402

PER_SET = 100
SHIPPED = "mahalanobis+msp"  # export.ood's default: the method this evidence chose
NEAR_PAIRS = ((0, 1), (3, 8), (4, 9))
METHODS = ood.METHODS


def far_sets(seed: int = 0) -> dict[str, list[np.ndarray]]:
    from skimage import data

    rng = np.random.default_rng(seed)

    def crops(names: tuple[str, ...], lo: float, hi: float) -> list[np.ndarray]:
        out = []
        for i in range(PER_SET):
            image = getattr(data, names[i % len(names)])()
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            image = image[..., :3]
            h, w = image.shape[:2]
            area = rng.uniform(lo, hi) * h * w
            ch = int(min(h, np.sqrt(area)))
            cw = int(min(w, ch * rng.uniform(0.75, 1.33)))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            out.append(np.ascontiguousarray(image[y:y + ch, x:x + cw]))
        return out

    faces = data.lfw_subset()
    colours = [np.full((240, 320, 3), c, np.uint8) for c in
               [(0, 0, 0), (255, 255, 255), (128, 128, 128)]]
    colours += [np.full((240, 320, 3), rng.integers(0, 256, 3), np.uint8)
                for _ in range(PER_SET - len(colours))]
    return {
        "photos": crops(("chelsea", "coffee", "astronaut", "rocket", "camera", "horse", "cat"),
                        0.1, 0.6),
        "textures": crops(("brick", "grass", "gravel"), 0.05, 0.4),
        "faces": [np.stack([(f * 255).astype(np.uint8)] * 3, axis=-1)
                  for f in faces[rng.permutation(len(faces))[:PER_SET]]],
        "noise": [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(PER_SET)],
        "blank or one colour": colours,
    }


def forward(model, pixels: np.ndarray, pp: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and logits of the classifier for uint8 NHWC crops."""
    import torch

    feats, logits = [], []
    with torch.no_grad():
        for s in range(0, len(pixels), 32):
            f = model.backbone(torch.from_numpy(normalize(pixels[s:s + 32], pp)))
            feats.append(f.numpy())
            logits.append(model.head(f).numpy())
    return np.concatenate(feats), np.concatenate(logits)


def table(in_scores: dict[str, np.ndarray], outs: dict[str, dict[str, np.ndarray]]) -> dict:
    rows = {}
    for name, by_method in outs.items():
        rows[name] = {m: {"auroc": round(ood.auroc(in_scores[m], by_method[m]), 4),
                          "fpr_at_95_tpr": round(ood.fpr_at_tpr(in_scores[m], by_method[m]), 4)}
                      for m in METHODS}
    return rows


def shipped_model() -> dict:
    from pipeline.core.copies import PreparedImages
    from pipeline.core.dataset import read_prepared, split_rows
    from pipeline.core.model import load_model

    model, config = load_model(REPO / "models" / "model.safetensors", REPO / "models" / "model.json")
    pp = Preprocessing.from_dict(config["preprocessing"])
    images = PreparedImages(REPO / "data" / "prepared")
    _, classes, rows = read_prepared(REPO / "data" / "prepared")
    split = {}
    for name in ("train", "val", "test"):
        keys, labels = split_rows(rows, classes, name)
        split[name] = (*forward(model, np.stack([images.crop(k, pp) for k in keys]), pp), labels)
    detectors = {m: ood.fit(m, split["train"][0], split["train"][2], len(classes),
                            split["val"][0], split["val"][1]) for m in METHODS}
    in_scores = {m: d.score(split["test"][0], split["test"][1]) for m, d in detectors.items()}
    outs = {}
    for name, imgs in far_sets().items():
        f, lg = forward(model, np.stack([resize_and_crop(i, pp) for i in imgs]), pp)
        outs[name] = {m: d.score(f, lg) for m, d in detectors.items()}
        # what an app sees: the share of far images the shipped threshold (val) lets through
        for m, d in detectors.items():
            outs[name].setdefault("_passed", {})[m] = float((d.score(f, lg) >= d.threshold).mean())
    passed = {name: o.pop("_passed") for name, o in outs.items()}
    test_pass = {m: float((in_scores[m] >= d.threshold).mean()) for m, d in detectors.items()}
    return {"far": table(in_scores, outs), "far_passed_at_val_threshold": passed,
            "test_passed_at_val_threshold": test_pass,
            "in_distribution": {"split": "test", "images": int(len(split["test"][2]))}}


def frozen_head(train: tuple, val: tuple, classes: int):
    """A head on frozen features (the train_head params), and its logits function."""
    import torch

    from pipeline.core.config import load_params
    from pipeline.stages.train_head import fit_head

    params = load_params(REPO / "params.yaml", "train_head", resolve_auto=False)["train_head"]
    head = fit_head(*train, *val, classes, dataclasses.replace(params, threads=2)).head

    def logits(f: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))).numpy()

    return logits


def near_sets(features_dir: Path = REPO / "data" / "features",
              pairs: tuple = NEAR_PAIRS) -> dict:
    from pipeline.core.caches import load_cache

    cache = load_cache(features_dir)
    names = cache.meta["classes"]
    x = {s: cache.split(s) for s in ("train", "val", "test")}
    rows = {}
    for pair in pairs:
        keep = [c for c in range(len(cache.meta["classes"])) if c not in pair]
        remap = {c: i for i, c in enumerate(keep)}

        def kept(split: str) -> tuple[np.ndarray, np.ndarray]:
            f, y = x[split]
            mask = np.isin(y, keep)
            return f[mask], np.array([remap[int(v)] for v in y[mask]], dtype=np.int64)

        (tf, ty), (vf, vy), (sf, sy) = kept("train"), kept("val"), kept("test")
        logits = frozen_head((tf, ty), (vf, vy), len(keep))
        held = np.concatenate([x[s][0][np.isin(x[s][1], pair)] for s in ("val", "test")])
        detectors = {m: ood.fit(m, tf, ty, len(keep), vf, logits(vf)) for m in METHODS}
        ins = {m: d.score(sf, logits(sf)) for m, d in detectors.items()}
        outs = {m: d.score(held, logits(held)) for m, d in detectors.items()}
        label = (f"digits {pair[0]} and {pair[1]}" if names[pair[0]].isdigit() else
                 f"{names[pair[0]]} and {names[pair[1]]}")
        rows[f"{label} held out"] = table(ins, {"held out": outs})["held out"]
    return rows


def other_set(folder: Path) -> dict:
    """Another data set (a ``root/<class>/*`` folder): prepared, the default backbone's frozen
    features and a head on them; far sets are the same kinds plus the digits; near sets hold
    out two of its classes (the first and last, then the two middle ones)."""
    import tempfile

    import torch
    from sklearn.datasets import load_digits

    from pipeline.core.backbones import build_backbone
    from pipeline.core.caches import load_cache
    from pipeline.core.config import BackboneParams, FeaturesParams, PrepareParams
    from pipeline.stages.features import run as extract
    from pipeline.stages.prepare import run as prepare

    with tempfile.TemporaryDirectory() as tmp:
        prepare(PrepareParams(source="folder", path=str(folder)), Path(tmp) / "prepared")
        extract(BackboneParams(), FeaturesParams(threads=2), Path(tmp) / "prepared",
                Path(tmp) / "features")
        cache = load_cache(Path(tmp) / "features")
        n = len(cache.meta["classes"])
        near = near_sets(Path(tmp) / "features", ((0, n - 1), (n // 2 - 1, n // 2)))
    x = {s: cache.split(s) for s in ("train", "val", "test")}
    logits = frozen_head(x["train"], x["val"], n)
    detectors = {m: ood.fit(m, *x["train"], n, x["val"][0], logits(x["val"][0]))
                 for m in METHODS}
    ins = {m: d.score(x["test"][0], logits(x["test"][0])) for m, d in detectors.items()}
    backbone = build_backbone(BackboneParams())
    pp = backbone.preprocessing
    digits = load_digits().images[:PER_SET]
    kinds = far_sets() | {"digits": [np.stack([(d * 255 / 16).astype(np.uint8)] * 3, axis=-1)
                                     for d in digits]}
    outs = {}
    with torch.no_grad():
        for name, imgs in kinds.items():
            crops = np.stack([resize_and_crop(i, pp) for i in imgs])
            f = backbone.model.eval()(torch.from_numpy(normalize(crops, pp))).numpy()
            outs[name] = {m: d.score(f, logits(f)) for m, d in detectors.items()}
    return {"far": table(ins, outs), "near": near,
            "note": "frozen Lite0 features and a head on them (no fine-tuning)"}


def cost(repeats: int = 300) -> dict:
    """Seconds per batch of the raw-pixel model with and without the in_distribution output
    (both exported here from models/model.safetensors, onnxruntime CPU, 2 threads), batch 1
    and 32, alternating runs so drift hits both; the added share at each batch size."""
    import tempfile
    import time

    import onnxruntime as ort

    from pipeline.core.config import ExportParams
    from pipeline.onnx.sessions import session_options
    from pipeline.stages.export import run as export

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for method in ("none", SHIPPED):
            files[method] = Path(tmp) / f"{method}.onnx"
            export(ExportParams(threads=2, variants=(), ood=method),
                   REPO / "models" / "model.safetensors", REPO / "models" / "model.json",
                   REPO / "data" / "prepared", files[method], Path(tmp) / f"v_{method}",
                   Path(tmp) / f"{method}.json")
        sessions = {m: ort.InferenceSession(str(f), session_options(2),
                                            providers=["CPUExecutionProvider"])
                    for m, f in files.items()}
        rng = np.random.default_rng(0)
        for batch in (1, 32):
            x = rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
            times: dict[str, list[float]] = {m: [] for m in sessions}
            for _ in range(3):
                for s in sessions.values():
                    s.run(None, {"image": x})
            for _ in range(repeats if batch == 1 else max(5, repeats // 8)):
                for m, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, {"image": x})
                    times[m].append(time.perf_counter() - t0)
            median = {m: float(np.median(t)) for m, t in times.items()}
            out[f"batch_{batch}"] = {"without_s": round(median["none"], 5),
                                     "with_s": round(median[SHIPPED], 5),
                                     "added": round(median[SHIPPED] / median["none"] - 1, 4)}
    return out


def markdown(report: dict) -> str:
    lines = [f"Out-of-distribution scores, {report['machine']} (AUROC / FPR at 95 % TPR; "
             "higher AUROC and lower FPR are better).", "",
             "| images of no class | " + " | ".join(METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    for kind in ("far", "near"):
        for name, by_method in report[kind].items():
            cells = [f"{by_method[m]['auroc']:.3f} / {by_method[m]['fpr_at_95_tpr']:.2f}"
                     for m in METHODS]
            lines.append(f"| {kind}: {name} | " + " | ".join(cells) + " |")
    for kind in ("far", "near"):
        means = {m: np.mean([r[m]["auroc"] for r in report[kind].values()]) for m in METHODS}
        lines.append(f"| **{kind}, mean AUROC** | " +
                     " | ".join(f"**{means[m]:.3f}**" for m in METHODS) + " |")
    lines += ["", "Share passing the threshold set on val (95 % of val passes):", "",
              "| images | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS),
              "| digits test | " + " | ".join(f"{report['test_passed_at_val_threshold'][m]:.2f}"
                                              for m in METHODS) + " |"]
    for name, by_method in report["far_passed_at_val_threshold"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_method[m]:.2f}" for m in METHODS) + " |")
    for name, other in report.get("other_sets", {}).items():
        lines += ["", f"Another data set, `{name}` ({other['note']}):", "",
                  "| images of no class | " + " | ".join(METHODS) + " |",
                  "|---|" + "---|" * len(METHODS)]
        for kind in ("far", "near"):
            for row, by_method in other[kind].items():
                lines.append(f"| {kind}: {row} | " + " | ".join(
                    f"{by_method[m]['auroc']:.3f} / {by_method[m]['fpr_at_95_tpr']:.2f}"
                    for m in METHODS) + " |")
    if "cost" in report:
        lines += ["", f"Inference time of the raw-pixel model with the {SHIPPED} output against "
                  "without it (onnxruntime CPU, 2 threads, median):", "",
                  "| batch | without (ms) | with (ms) | added |", "|---|---|---|---|"]
        for name, c in report["cost"].items():
            lines.append(f"| {name.split('_')[1]} | {c['without_s'] * 1e3:.2f} | "
                         f"{c['with_s'] * 1e3:.2f} | {c['added']:+.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import torch

    torch.set_num_threads(2)
    others = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    if "--cost-only" in sys.argv or others:  # add to the kept report
        import json

        report = json.loads((REPO / "reports" / "ood.json").read_text())
        for folder in others:
            report.setdefault("other_sets", {})[folder.name] = other_set(folder)
    else:
        report = shipped_model()
        report["near"] = near_sets()
        report["near_note"] = ("frozen Lite0 features (data/features) and a head on the other "
                               "eight digits; the far rows use the shipped fine-tuned model")
    report["machine"] = cpu_name()
    if "--no-cost" not in sys.argv and not others:
        report["cost"] = cost()
    write_json(REPO / "reports" / "ood.json", report)
    write_text(REPO / "reports" / "ood.md", markdown(report))
    print(markdown(report))
