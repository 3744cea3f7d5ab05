"""``pipeline bench-predict``: does classifying a photo library run at the network's speed?

Generates photo folders (the photo-like JPEGs of ``bench-data``; ``distinct`` files, hard-linked
up to the count, so a 10,000-photo library costs no disk), then per kind, same run:

* **network-only** img/s: the model's session on ready inputs of the size the decoder hands it
  (batch 32, ``--threads``), no decoding;
* **predict** img/s and peak RSS: ``pipeline predict --out FILE`` in a child process (its own
  rate, after imports; RSS from ``wait4``), at batch 32 with the default decode (as ``prepare``:
  reduced-scale JPEG decode to the model's resize size, decoding threads ahead of the network);
* the same with ``--full-decode`` (every pixel to the graph), on at most 100 photos;
* how far the reduced decode is from the full one: top-1 agreement and max |delta p|.

Prints a table and writes JSON (``--out``) and Markdown.

Run: ``pipeline bench-predict --vga 2000 --phone 200 --phone-many 10000``
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_json, write_text
from ..core.runtime import cpu_name, resolve_threads

BATCH = 32


def library(folder: Path, kind: str, count: int, distinct: int) -> Path:
    """``count`` photos of ``kind``: ``distinct`` generated files, the rest hard links."""
    from .bench_data import generate

    if folder.is_dir() and len(list(folder.rglob("*.jpg"))) == count:
        return folder
    source = folder.with_name(folder.name + "_distinct")
    if not source.is_dir() or len(list(source.rglob("*.jpg"))) != distinct:
        generate(source, kind, distinct, workers=os.cpu_count() or 1)
    originals = sorted(source.rglob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = folder / f"{i:05d}.jpg"
        if not link.exists():
            os.link(originals[i % len(originals)], link)
    return folder


def network_rate(model: Path, shape: tuple[int, ...], threads: int,
                 seconds: float = 3.0) -> float:
    """img/s of the session alone on batches of 32 ready inputs of ``shape``."""
    from ..onnx.runner import OnnxClassifier

    classifier = OnnxClassifier(model, ["cpu"], threads)
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, *shape), dtype=np.uint8)
    batch = np.stack([classifier.prepare(x) for x in batch])
    classifier.probabilities(batch)  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 2:
        classifier.probabilities(batch)
        runs += 1
    return runs * BATCH / (time.perf_counter() - started)


def predict_child(model: Path, folder: Path, out: Path, threads: int,
                  full_decode: bool = False, limit: int | None = None) -> dict[str, Any]:
    """``pipeline predict`` in a child process: its own img/s and its peak RSS."""
    inputs = [str(folder)] if limit is None else [str(p) for p in
                                                   sorted(folder.rglob("*.jpg"))[:limit]]
    command = [sys.executable, "-m", "pipeline", "predict", "--model", str(model),
               "--providers", "cpu", "--threads", str(threads), "--batch-size", str(BATCH),
               "--out", str(out), "--force", *(["--full-decode"] if full_decode else []),
               *inputs]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"predict failed ({status}): {stderr[-500:]}")
    rate = re.search(r"predict: (\d+) images in ([\d.]+) s \(([\d.]+) img/s\)", stderr)
    if rate is None:
        raise RuntimeError(f"no summary line in: {stderr[-500:]}")
    return {"images": int(rate.group(1)), "seconds": float(rate.group(2)),
            "img_s": float(rate.group(3)), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def decode_agreement(model: Path, folder: Path, threads: int, limit: int = 100) -> dict[str, Any]:
    """Top-1 agreement and max |delta p| of predict's decode against the full decode and
    against prepare's copies (JPEGs drafted to twice the resize size: what training saw)."""
    from ..core.copies import DRAFT_MARGIN
    from ..onnx.runner import OnnxClassifier

    classifier = OnnxClassifier(model, ["cpu"], threads)
    files = sorted(folder.rglob("*.jpg"))[:limit]
    width = len(classifier.classes)

    def probs(full: bool, margin: int | None = None) -> np.ndarray:
        extra = {} if margin is None else {"draft_margin": margin}
        out = classifier.predict_files(files, width, BATCH, full_decode=full, **extra)
        rows = []
        for r in out:
            p = dict(r.top)
            rows.append([p[c] for c in classifier.classes])
        return np.array(rows)

    reduced, full, copies = probs(False), probs(True), probs(False, DRAFT_MARGIN)

    def versus(other: np.ndarray) -> dict[str, float]:
        return {"top1_agreement": round(float((reduced.argmax(1) == other.argmax(1)).mean()), 4),
                "max_abs_dp": round(float(np.abs(reduced - other).max()), 4)}

    return {"images": len(files), **versus(full), "vs_prepare_copies": versus(copies)}


def run(model: Path, work: Path, out: Path, vga: int, phone: int, phone_many: int,
        threads: int) -> dict[str, Any]:
    from ..onnx.runner import decode_for_model, file_contract

    threads = resolve_threads(threads)
    resize = int(file_contract(model)["resize_size"])
    report: dict[str, Any] = {"cpu": cpu_name(), "threads": threads, "model": str(model),
                              "batch_size": BATCH, "kinds": []}
    plan = [("vga", vga, 200), ("phone", phone, 40)]
    if phone_many:
        plan.append(("phone", phone_many, 40))
    for kind, count, distinct in plan:
        if not count:
            continue
        folder = library(work / f"{kind}_{count}", kind, count, min(distinct, count))
        first = sorted(folder.rglob("*.jpg"))[0]
        shape = decode_for_model(first, resize).shape
        print(f"bench-predict: {kind} x {count}", flush=True)
        entry: dict[str, Any] = {"kind": kind, "photos": count, "distinct": min(distinct, count),
                                 "decoded_shape": list(shape),
                                 "network_img_s": round(network_rate(model, shape, threads), 1)}
        entry["predict"] = predict_child(model, folder, work / "out.jsonl", threads)
        entry["ratio"] = round(entry["predict"]["img_s"] / entry["network_img_s"], 3)
        if count <= 2000:
            entry["full_decode"] = predict_child(model, folder, work / "out.jsonl", threads,
                                                 full_decode=True, limit=100)
            entry["full_decode"]["ratio"] = round(entry["full_decode"]["img_s"] /
                                                  entry["network_img_s"], 3)
            entry["agreement_vs_full_decode"] = decode_agreement(model, folder, threads)
        report["kinds"].append(entry)
        print(markdown(report), flush=True)
    write_json(out, report)
    write_text(out.with_suffix(".md"), markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Predict on a photo library ({report['cpu']}, {report['threads']} threads, "
             f"batch {report['batch_size']})", "",
             "| photos | decoded to | network-only img/s | predict img/s | ratio | peak RSS MB | "
             "full decode img/s (ratio, RSS MB) | top-1 agreement, max abs dp vs full | "
             "vs prepare's copies |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in report["kinds"]:
        full = e.get("full_decode")
        agree = e.get("agreement_vs_full_decode")
        lines.append(
            f"| {e['photos']} {e['kind']} | {e['decoded_shape'][1]}x{e['decoded_shape'][0]} | "
            f"{e['network_img_s']} | {e['predict']['img_s']} | **{e['ratio']}** | "
            f"{e['predict']['peak_rss_mb']} | "
            + (f"{full['img_s']} ({full['ratio']}, {full['peak_rss_mb']})" if full else "—")
            + " | " + (f"{agree['top1_agreement']}, {agree['max_abs_dp']}" if agree else "—")
            + " | " + (f"{agree['vs_prepare_copies']['top1_agreement']}, "
                       f"{agree['vs_prepare_copies']['max_abs_dp']}" if agree else "—") + " |")
    return "\n".join(lines) + "\n"
