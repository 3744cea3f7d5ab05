"""Do the INT8 files keep their accuracy beyond the digits? Each INT8 variant in each engine,
on the evidence sets of ``scripts/make_evidence_sets.py`` (photos, charts).

Each set runs ``dvc repro export`` in a fresh copy of the project (``dvc.yaml``, the package,
``params.yaml`` with the set's data) with the default params, except that the export gate is
opened (``export.int8_max_accuracy_drop: 1.0``) so that a file that would be refused is still
measured, not lost with the failed stage. From each set's ``reports/export.json``: the FP32
test accuracy and, per INT8 variant and engine, the test accuracy, the drop and whether the
default 1-point gate passes. The digits row is read from this repository's own
``reports/export.json``. Writes ``reports/int8_evidence.json`` and ``.md``.

Run: ``python scripts/make_evidence_sets.py /tmp/evsets`` then
``python scripts/int8_evidence.py /tmp/evsets/photos /tmp/evsets/charts``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evidence_project import REPO, default_params, fresh_project

GATE = 0.01  # the default export.int8_max_accuracy_drop
VARIANTS = ("int8", "int8_openvino")


def rows_of(name: str, report: dict, seconds: float | None) -> list[dict]:
    fp32 = report["variants"]["fp32"]["test_accuracy"]
    out = []
    for variant in VARIANTS:
        v = report["variants"].get(variant)
        if v is None:
            continue
        for engine, result in v["engines"].items():
            if "test_accuracy" not in result:
                continue
            drop = fp32 - result["test_accuracy"]
            out.append({"set": name, "variant": variant, "built_for": v["engine"],
                        "engine": engine, "test_images": report["test_images"],
                        "fp32_test_accuracy": fp32, "test_accuracy": result["test_accuracy"],
                        "drop_points": round(100 * drop, 2),
                        "within_1_point": drop <= GATE + 1e-12,
                        "quantize_s": report.get(f"{variant}_quantize_s"),
                        "export_stage_s": seconds})
    return out


def run_set(data: Path, work: Path) -> tuple[dict, float]:
    params = default_params(str(data))
    params["export"] |= {"variants": list(VARIANTS), "int8_max_accuracy_drop": 1.0}
    env = fresh_project(work, params)
    subprocess.run(["dvc", "repro", "finetune"], cwd=work, env=env, check=True)
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "export"], cwd=work, env=env, check=True)
    seconds = round(time.perf_counter() - t0, 1)
    return json.loads((work / "reports" / "export.json").read_text()), seconds


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"INT8 files per engine, test split, on {machine} (export gate: at most 1 point "
             "below FP32 in the file's engine).", "",
             "| set | test images | FP32 | variant (built for) | engine | test accuracy | drop "
             "(points) | within 1 point | quantise s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['test_images']} | {r['fp32_test_accuracy']:.4f} | "
                     f"{r['variant']} ({r['built_for']}) | {r['engine']} | "
                     f"{r['test_accuracy']:.4f} | {r['drop_points']:+.2f} | "
                     f"{'yes' if r['within_1_point'] else 'no'} | "
                     f"{'' if r['quantize_s'] is None else r['quantize_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from pipeline.core.atomic import write_json, write_text
    from pipeline.core.runtime import machine_fingerprint

    rows = rows_of("digits", json.loads((REPO / "reports" / "export.json").read_text()), None)
    for data in map(Path, sys.argv[1:]):
        with tempfile.TemporaryDirectory() as tmp:
            report, seconds = run_set(data, Path(tmp) / data.name)
        rows += rows_of(data.name, report, seconds)
    machine = machine_fingerprint()["cpu"]
    out = REPO / "reports" / "int8_evidence.json"
    write_json(out, {"rows": rows, "machine": machine})
    write_text(out.with_suffix(".md"), markdown(rows, machine))
    print(markdown(rows, machine))
