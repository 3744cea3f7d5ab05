"""Should ``auto`` be the default? Cold ``dvc repro finetune`` with today's fixed params against
the same chain with ``backbone.layer``, ``finetune.blocks`` and both LRs set to ``auto``.

Each side runs in a fresh copy of the project (``dvc.yaml``, the package, ``params.yaml`` with
the set's data), from nothing, on the same machine in the same run; wall seconds of the whole
``dvc repro finetune`` (prepare, auto, features, head, cut cache, fine-tune). Export, interpret
and bench cost the same on both sides and are left out. Writes ``reports/auto_evidence.json``
and ``.md``.

Run: ``python scripts/auto_evidence.py digits`` (or a folder of ``root/<class>/*`` images:
``python scripts/auto_evidence.py /tmp/evsets/charts``)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evidence_project import REPO, default_params, fresh_project

AUTO = {"backbone": {"layer": "auto"},
        "finetune": {"blocks": "auto", "lr_backbone": "auto", "lr_head": "auto"},
        "advise": {"verify": 4}}


def run_side(name: str, data: str, auto: bool, work: Path) -> dict:
    params = default_params(data)
    if auto:
        for section, values in AUTO.items():
            params[section] |= values
    env = fresh_project(work, params)
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "finetune"], cwd=work, env=env, check=True)
    seconds = round(time.perf_counter() - t0, 1)
    tuned = json.loads((work / "reports" / "finetune.json").read_text())
    model = json.loads((work / "models" / "model.json").read_text())
    out = {"side": "auto" if auto else "fixed default", "seconds": seconds,
           "layer": model["backbone"].get("layer", "last"), "finetune_enabled": tuned["enabled"],
           "blocks": tuned["blocks"], "lr_backbone": model["params"]["lr_backbone"],
           "val_accuracy": tuned["val"]["accuracy"], "test_accuracy": tuned["test"]["accuracy"],
           "test_images": tuned["test"]["num_samples"]}
    if auto:
        report = json.loads((work / "data" / "auto" / "report.json").read_text())
        out["auto_stage_seconds"] = report["seconds"]
        out["caches_reused"] = report["auto"]["caches"]
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| set | side | chose | val | test | cold `dvc repro finetune` s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["set"] == r["set"] and x["side"] == "fixed default")
        chose = (f"layer {r['layer']}, " + (f"fine-tune {r['blocks']} blocks LR "
                                             f"{r['lr_backbone']:g}" if r["finetune_enabled"]
                                             else "head only"))
        lines.append(f"| {r['set']} | {r['side']} | {chose} | {r['val_accuracy']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['seconds']} | "
                     f"{r['seconds'] / base['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from pipeline.core.atomic import write_json, write_text
    from pipeline.core.runtime import machine_fingerprint

    out = REPO / "reports" / "auto_evidence.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    for data in sys.argv[1:]:
        name = Path(data).name
        with tempfile.TemporaryDirectory() as tmp:
            new = [run_side(name, data, auto, Path(tmp) / ("auto" if auto else "fixed"))
                   | {"set": name} for auto in (False, True)]
        rows = [r for r in rows if r["set"] != name] + new
        write_json(out, {"rows": rows, "machine": machine_fingerprint()["cpu"]})
        write_text(out.with_suffix(".md"), markdown(rows))
        print(markdown(rows))
