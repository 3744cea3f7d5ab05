"""Scaling benchmark: feature extraction and fine-tuning throughput at 1, 2, ... processes.

Runs the real ``pipeline features`` and ``pipeline finetune`` commands, each through the
``launcher`` param (torchrun with ``--nproc-per-node N`` for N > 1), on the project's own
prepared data, cut cache and head, into a temporary folder, and reads the times the stages
record on rank 0: the features stage's wall time from start to the published cache, and the
fine-tuning epoch time (training + validation). Prints images/s, the speedup over one process
and the parallel efficiency (speedup / N), and writes them as JSON. It also checks that every
N gives the single-process features bytes and fine-tuned weights (max |diff|).

Run: ``pipeline bench-scaling --procs 1,2 --epochs 1``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ..core.atomic import write_json
from ..core.errors import PipelineError
from ..core.params import load_params_file
from ..core.runtime import available_cpus, cpu_name


def _run_stage(args: list[str], cwd: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise PipelineError(f"bench-scaling: `pipeline {args[0]}` failed: {' | '.join(tail)}")


def run(params_path: str | Path, prepared: str | Path, cut_cache: str | Path,
        head_model: str | Path, head_config: str | Path, out_path: str | Path,
        procs: Sequence[int] = (1, 2), epochs: int = 1) -> dict[str, Any]:
    base = load_params_file(params_path)
    prepared, cut_cache = Path(prepared).resolve(), Path(cut_cache).resolve()
    head_model, head_config = Path(head_model).resolve(), Path(head_config).resolve()
    n_images = sum(1 for _ in open(prepared / "manifest.csv", encoding="utf-8")) - 1
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in procs:
            params = json.loads(json.dumps(base))
            params.setdefault("launcher", {})["nproc_per_node"] = n
            params.setdefault("finetune", {}).update({"epochs": epochs, "patience": 0,
                                                   "warmup_epochs": 0})
            run_dir = work / f"p{n}"
            run_dir.mkdir()
            (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
            print(f"bench-scaling: {n} process(es): features", flush=True)
            _run_stage(["features", "--params", "params.yaml", "--prepared", str(prepared),
                        "--out", "features", "--metrics", "features_headline.json",
                        "--report", "features.json"], run_dir)
            print(f"bench-scaling: {n} process(es): finetune ({epochs} epoch(s))", flush=True)
            _run_stage(["finetune", "--params", "params.yaml", "--prepared", str(prepared),
                        "--cut-cache", str(cut_cache), "--head", str(head_model),
                        "--head-config", str(head_config), "--model", "model.safetensors",
                        "--config", "model.json", "--metrics", "finetune_headline.json",
                        "--report", "finetune.json", "--timing", "timing.json",
                        "--plots", "plots"], run_dir)
            features = json.loads((run_dir / "features.json").read_text())
            timing = json.loads((run_dir / "timing.json").read_text())
            metrics = json.loads((run_dir / "finetune.json").read_text())
            epoch_s = float(np.mean(timing["seconds_per_epoch"]))
            results.append({"processes": n, "features_seconds": features["seconds_total"],
                            "features_images_per_s": round(n_images / features["seconds_total"],
                                                           2),
                            "finetune_epoch_seconds": round(epoch_s, 3),
                            "finetune_val_accuracy": metrics["val"]["accuracy"],
                            "finetune_test_accuracy": metrics["test"]["accuracy"]})
        reference = work / f"p{procs[0]}"
        from safetensors.numpy import load_file

        ref_weights = load_file(str(reference / "model.safetensors"))
        ref_features = (reference / "features" / "features.npy").read_bytes()
        for row in results:
            run_dir = work / f"p{row['processes']}"
            row["features_identical_to_first"] = \
                (run_dir / "features" / "features.npy").read_bytes() == ref_features
            weights = load_file(str(run_dir / "model.safetensors"))
            row["finetune_max_weight_diff_vs_first"] = max(
                float(np.abs(weights[k] - ref_weights[k]).max()) for k in ref_weights
                if ref_weights[k].dtype.kind == "f")
    first = results[0]
    for row in results:
        for key, seconds in (("features", "features_seconds"),
                             ("finetune", "finetune_epoch_seconds")):
            speedup = first[seconds] / row[seconds]
            row[f"{key}_speedup"] = round(speedup, 3)
            row[f"{key}_efficiency"] = round(speedup / (row["processes"] / first["processes"]), 3)
    report = {"benchmark": "scaling", "images": n_images, "epochs": epochs,
              "cpu": cpu_name(), "available_cpus": available_cpus(),
              "backend": "gloo (CPU)", "results": results}
    write_json(out_path, report)
    print(f"{n_images} images, {available_cpus()} CPUs ({report['cpu']}), gloo")
    for r in results:
        print(f"{r['processes']} process(es): features {r['features_images_per_s']:.1f} img/s "
              f"(speedup {r['features_speedup']:.2f}x, efficiency {r['features_efficiency']:.2f})"
              f" | finetune epoch {r['finetune_epoch_seconds']:.2f} s (speedup "
              f"{r['finetune_speedup']:.2f}x, efficiency {r['finetune_efficiency']:.2f}) | same "
              f"features bytes: {r['features_identical_to_first']}, max weight diff "
              f"{r['finetune_max_weight_diff_vs_first']:.2e}")
    print(f"wrote {out_path}")
    return report
