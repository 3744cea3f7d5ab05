"""``pipeline bench-predict``: does classifying a photo library run at the network's speed?

Generates photo folders (the photo-like JPEGs of ``bench-data``; ``distinct`` files, hard-linked
up to the count, so a 10,000-photo library costs no disk), then per kind, same run:

* **network-only** img/s: the model's session on ready inputs of the size the decoder hands it
  (batch 32, ``--threads``), no decoding;
* **predict** img/s and peak RSS: ``pipeline predict --out FILE`` in a child process (its own
  rate, after imports; its own peak RSS, ``VmHWM``), at batch 32, decoding threads ahead of the network,
  for each ``--decode``: ``copy`` (the default: as ``prepare``), ``fast`` (a smaller DCT
  scale) and ``full`` (every pixel to the graph; on 100 photos);
* how far ``copy`` and ``fast`` are from the full decode: top-1 agreement and max |delta p|.

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


class PeakRss:
    """The child's own peak RSS (``VmHWM``), read every 20 ms while it runs. ``wait4``'s
    ``ru_maxrss`` is no use here: Linux carries the parent's peak into a child's figure when
    the child execs, and this process holds a session and, after the agreement runs, full-size
    photos."""

    def __init__(self, pid: int) -> None:
        import threading

        self.kb, self._pid, self._done = 0, pid, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                status = Path(f"/proc/{self._pid}/status").read_text()
            except OSError:
                return
            found = re.search(r"VmHWM:\s+(\d+) kB", status)
            if found:
                self.kb = max(self.kb, int(found.group(1)))
            self._done.wait(0.02)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def predict_child(model: Path, folder: Path, out: Path, threads: int, decode: str = "copy",
                  limit: int | None = None) -> dict[str, Any]:
    """``pipeline predict`` in a child process: its own img/s and its peak RSS."""
    inputs = [str(folder)] if limit is None else [str(p) for p in
                                                   sorted(folder.rglob("*.jpg"))[:limit]]
    command = [sys.executable, "-m", "pipeline", "predict", "--model", str(model),
               "--providers", "cpu", "--threads", str(threads), "--batch-size", str(BATCH),
               "--out", str(out), "--force", "--decode", decode, *inputs]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = PeakRss(proc.pid)
    stderr = proc.stderr.read() if proc.stderr else ""
    status = proc.wait()
    peak.stop()
    if status != 0:
        raise RuntimeError(f"predict failed ({status}): {stderr[-500:]}")
    rate = re.search(r"predict: (\d+) images in ([\d.]+) s \(([\d.]+) img/s\)", stderr)
    if rate is None:
        raise RuntimeError(f"no summary line in: {stderr[-500:]}")
    return {"images": int(rate.group(1)), "seconds": float(rate.group(2)),
            "img_s": float(rate.group(3)), "peak_rss_mb": round(peak.kb / 1024, 1)}


def decode_agreement(model: Path, folder: Path, threads: int, limit: int = 100) -> dict[str, Any]:
    """Top-1 agreement and max |delta p| of each decode against the full one."""
    from ..onnx.runner import OnnxClassifier

    classifier = OnnxClassifier(model, ["cpu"], threads)
    files = sorted(folder.rglob("*.jpg"))[:limit]
    width = len(classifier.classes)

    def probs(decode: str) -> np.ndarray:
        rows = []
        for r in classifier.predict_files(files, width, BATCH, decode=decode):
            p = dict(r.top)
            rows.append([p[c] for c in classifier.classes])
        return np.array(rows)

    full = probs("full")
    out: dict[str, Any] = {"images": len(files)}
    for decode in ("copy", "fast"):
        p = probs(decode)
        out[decode] = {"top1_agreement": round(float((p.argmax(1) == full.argmax(1)).mean()), 4),
                       "max_abs_dp": round(float(np.abs(p - full).max()), 4)}
    return out


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
        network = round(network_rate(model, shape, threads), 1)
        entry: dict[str, Any] = {"kind": kind, "photos": count, "distinct": min(distinct, count),
                                 "decoded_shape": list(shape), "network_img_s": network}
        decodes = ("copy", "fast", "full") if count <= 2000 else ("copy",)
        for decode in decodes:
            row = predict_child(model, folder, work / "out.jsonl", threads, decode,
                                limit=100 if decode == "full" else None)
            entry[decode] = row | {"ratio": round(row["img_s"] / network, 3)}
        if count <= 2000:
            entry["agreement_vs_full"] = decode_agreement(model, folder, threads)
        report["kinds"].append(entry)
        print(markdown(report), flush=True)
    write_json(out, report)
    write_text(out.with_suffix(".md"), markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Predict on a photo library ({report['cpu']}, {report['threads']} threads, "
             f"batch {report['batch_size']})", "",
             "img/s of `pipeline predict` (its own rate) and its ratio to the network-only rate "
             "on inputs of the decoded size, same run; peak RSS of the predict process.", "",
             "| photos | decoded to | network-only img/s | decode | predict img/s | ratio | "
             "peak RSS MB | vs full decode: top-1 agreement, max abs dp |",
             "|---|---|---|---|---|---|---|---|"]
    for e in report["kinds"]:
        agree = e.get("agreement_vs_full", {})
        for decode in ("copy", "fast", "full"):
            if decode not in e:
                continue
            row = e[decode]
            vs = agree.get(decode)
            lines.append(
                f"| {e['photos']} {e['kind']} | {e['decoded_shape'][1]}x{e['decoded_shape'][0]} "
                f"| {e['network_img_s']} | {decode}" + (" (100 photos)" if decode == "full" else "")
                + f" | {row['img_s']} | **{row['ratio']}** | {row['peak_rss_mb']} | "
                + (f"{vs['top1_agreement']}, {vs['max_abs_dp']}" if vs else "—") + " |")
    return "\n".join(lines) + "\n"
