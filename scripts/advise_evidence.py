"""Does ``pipeline advise --verify`` find what a sweep finds, for less time? Measured per set.

For each data set (the embedded digits, and the ``photos`` and ``charts`` folders of
``scripts/make_evidence_sets.py``): ``pipeline advise --verify 4`` (its own wall time), then
the sweep it replaces on the same machine in the same run: features + head + ``pipeline sweep``
over fine-tuning depth and LR (``--blocks 0,2,4 --lr-backbone 3e-4,1e-3``, the configured
backbone at its last layer). Each side's choice is its best val accuracy; test accuracy is
reported beside it. Writes ``reports/advise_evidence.json`` and ``.md``, each set's advise and
sweep reports under ``reports/advise_evidence/<set>/``, and the digits' advice as
``reports/advise.{json,md,png}``.

Run: ``python scripts/advise_evidence.py /tmp/evsets digits photos charts``
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = [sys.executable, "-m", "pipeline"]
SWEEP = ["--blocks", "0,2,4", "--lr-backbone", "3e-4,1e-3", "--fractions", "",
         "--scratch-fractions", ""]


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(PIPELINE + args, check=True, cwd=REPO)
    return round(time.perf_counter() - t0, 1)


def one_set(name: str, sets: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if name != "digits":
        params["prepare"] |= {"source": "folder", "path": str(sets / name)}
    params_path = work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    p = ["--params", str(params_path)]
    prepared = work / "prepared"
    timed(["prepare", *p, "--out", str(prepared)])
    advise_s = timed(["advise", *p, "--prepared", str(prepared), "--verify", "4",
                      "--out", str(work / "advise.json")])
    features, head = work / "features", work / "head.safetensors"
    sweep_s = timed(["features", *p, "--prepared", str(prepared), "--out", str(features),
                     "--metrics", str(work / "features_m.json"),
                     "--report", str(work / "features_r.json")])
    sweep_s += timed(["train-head", *p, "--features", str(features), "--model", str(head),
                      "--config", str(work / "head.json"), "--report", str(work / "head_r.json"),
                      "--metrics", str(work / "head_m.json"), "--plots", str(work / "head_plots")])
    sweep_s += timed(["sweep", *p, "--prepared", str(prepared), "--features", str(features),
                      "--head", str(head), "--head-config", str(work / "head.json"),
                      *SWEEP, "--out", str(work / "sweep")])
    keep = REPO / "reports" / "advise_evidence" / name
    keep.mkdir(parents=True, exist_ok=True)
    for part in ("advise.json", "advise.md", "advise.png", "sweep/sweep.json", "sweep/sweep.md"):
        shutil.copy(work / part, keep / Path(part).name)
    if name == "digits":  # the embedded default's advice is the committed reports/advise.*
        for ext in ("json", "md", "png"):
            shutil.copy(work / f"advise.{ext}", REPO / "reports" / f"advise.{ext}")
    advice = json.loads((work / "advise.json").read_text())
    sweep = json.loads((work / "sweep" / "sweep.json").read_text())
    best = max(sweep["blocks"], key=lambda r: (r["val_accuracy"], -r["trainable_parameters"]))
    chosen = advice["verified"]["chosen"]
    return {
        "set": name, "classes": advice["classes"],
        "train_images_per_class": advice["regime"]["train_images_per_class"],
        "regime": [advice["regime"]["size"], advice["regime"]["similarity"]],
        "advice_unverified": advice["recommendation"]["params"],
        "advise_chosen": {k: chosen[k] for k in ("backbone", "layer", "finetune",
                                                 "val_accuracy", "test_accuracy")},
        "advise_seconds": advise_s, "advise_score_seconds": advice["score_seconds"],
        "recommendation_survived": advice["verified"]["recommendation_survived"],
        "kendall_tau_vs_val": advice["verified"]["kendall_tau_vs_val"],
        "sweep_best": {k: best[k] for k in ("blocks", "lr_backbone", "val_accuracy",
                                            "test_accuracy")},
        "sweep_seconds": sweep_s,
        "test_images": json.loads((prepared / "summary.json").read_text())["split_counts"]["test"],
        "machine": advice["machine"]["cpu"],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| set | regime | advise --verify 4 chose | val | test | s | sweep best | val | "
             "test | s | time ratio | tau LogME / probe / k-NN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, s = r["advise_chosen"], r["sweep_best"]
        ft = a["finetune"]
        what = (f"{a['backbone']} layer {a['layer']}, " +
                (f"fine-tune {ft['blocks']} blocks LR {ft['lr_backbone']:g}" if ft["enabled"]
                 else "head only"))
        taus = " / ".join(str(v) for v in r["kendall_tau_vs_val"].values())
        lines.append(f"| {r['set']} | {' '.join(r['regime'])} | {what} | "
                     f"{a['val_accuracy']:.4f} | {a['test_accuracy']:.4f} | "
                     f"{r['advise_seconds']} | blocks {s['blocks']} LR {s['lr_backbone']:g} | "
                     f"{s['val_accuracy']:.4f} | {s['test_accuracy']:.4f} | "
                     f"{r['sweep_seconds']} | {r['advise_seconds'] / r['sweep_seconds']:.2f} | "
                     f"{taus} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sets_dir, names = Path(sys.argv[1]), sys.argv[2:]
    out = REPO / "reports" / "advise_evidence.json"
    rows = json.loads(out.read_text())["sets"] if out.is_file() else []
    for name in names:
        rows = [r for r in rows if r["set"] != name] + [one_set(name, sets_dir,
                                                                 sets_dir / f"work_{name}")]
        sys.path.insert(0, str(REPO))
        from pipeline.core.atomic import write_json, write_text

        write_json(out, {"sets": rows})
        write_text(out.with_suffix(".md"), markdown(rows))
        print(markdown(rows))
