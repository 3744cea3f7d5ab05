"""``pipeline predict`` on a photo library: streamed, resumable output and an end-of-run summary.

Results go to standard output, or with ``--out FILE`` to a ``.jsonl`` or ``.csv`` file written
as they come, one flushed line per image, so a killed run leaves every finished line intact;
``--resume`` skips the paths already in FILE (a line cut short by the kill is dropped first) and
appends the rest, giving the same file as an uninterrupted run. An existing FILE is refused
without ``--resume`` or ``--force``. Importing this never imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from ..core.errors import PipelineError
from ..onnx.runner import OnnxClassifier, Prediction

FORMATS = (".jsonl", ".csv")
CSV_HEADER = ("path", "label", "probability", "uncertain", "in_distribution", "unknown", "top",
              "error")
UNKNOWN = "unknown"  # the label shown for an image the model's detector calls none of its classes


@dataclass
class Summary:
    images: int = 0
    errors: int = 0
    uncertain: int = 0
    unknown: int = 0
    skipped: int = 0  # already in the output file (--resume)
    per_class: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        classes = ", ".join(f"{label} {n}" for label, n in self.per_class.most_common())
        return (f"predict: {self.images} images in {self.seconds:.1f} s ({rate:.1f} img/s), "
                f"{self.errors} errors, {self.uncertain} uncertain, {self.unknown} unknown"
                + (f", {self.skipped} already done" if self.skipped else "")
                + (f"; per class: {classes}" if classes else ""))


def record(result: Prediction, provider: str, min_confidence: float) -> dict[str, Any]:
    """One output record (the JSON line; the CSV row is made from it)."""
    if result.error:
        return {"path": result.path, "error": result.error}
    rec = {"path": result.path, "provider": provider,
           "predictions": [{"label": label, "probability": round(p, 6)}
                           for label, p in result.top],
           "uncertain": result.top[0][1] < min_confidence}
    if result.in_distribution is not None:
        rec |= {"in_distribution": round(result.in_distribution, 6), "unknown": result.unknown}
    return rec


def format_line(rec: dict[str, Any], suffix: str) -> str:
    if suffix == ".jsonl":
        return json.dumps(rec) + "\n"
    buffer = io.StringIO()
    preds = rec.get("predictions", [])
    csv.writer(buffer, lineterminator="\n").writerow([
        rec["path"], preds[0]["label"] if preds else "",
        preds[0]["probability"] if preds else "",
        str(rec["uncertain"]).lower() if "uncertain" in rec else "",
        rec.get("in_distribution", ""),
        str(rec["unknown"]).lower() if "unknown" in rec else "",
        ";".join(f"{p['label']}:{p['probability']}" for p in preds), rec.get("error", "")])
    return buffer.getvalue()


def done_paths(path: Path) -> set[str]:
    """Paths already in an output file; a last line without its newline (a run killed while
    writing it) is cut off the file so that the resumed run writes it whole."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    text = complete.decode("utf-8")
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        return {row[0] for row in rows[1:] if row}
    paths = set()
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            paths.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            raise PipelineError(f"{path}:{number}: not a line that predict writes; use "
                                "another --out file or --force") from None
    return paths


def open_output(out: Path | None, resume: bool, force: bool) -> tuple[TextIO, set[str], bool]:
    """(stream, paths already done, whether a header is needed)."""
    if out is None:
        return sys.stdout, set(), False
    if out.suffix not in FORMATS:
        raise PipelineError(f"--out {out}: use a .jsonl or .csv file")
    exists = out.is_file() and out.stat().st_size > 0
    if exists and not (resume or force):
        raise PipelineError(f"--out {out} exists; add --resume to continue it or --force to "
                            "replace it")
    done = done_paths(out) if exists and resume else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = exists and resume
    stream = open(out, "a" if keep else "w", encoding="utf-8", newline="")
    return stream, done, out.suffix == ".csv" and not keep


def run(classifier: OnnxClassifier, paths: Sequence[Path], out: Path | None, *, top_k: int,
        batch_size: int, workers: int | None, decode: str, min_confidence: float,
        resume: bool, force: bool, as_json: bool, progress: bool) -> Summary:
    """Classify ``paths`` into ``out`` (or standard output) and return the summary."""
    from tqdm import tqdm

    stream, done, header = open_output(out, resume, force)
    suffix = out.suffix if out is not None else (".jsonl" if as_json else "")
    todo = [p for p in paths if str(p) not in done]
    summary = Summary(skipped=len(paths) - len(todo))
    started = time.perf_counter()
    try:
        if header:
            stream.write(",".join(CSV_HEADER) + "\n")
        results: Iterator[Prediction] = classifier.predict_files(
            todo, top_k, batch_size, workers=workers, decode=decode)
        bar = tqdm(total=len(todo), unit="img", desc="predict", disable=not progress,
                   file=sys.stderr)
        for result in results:
            rec = record(result, classifier.provider, min_confidence)
            if result.error:
                summary.errors += 1
                if not suffix:
                    print(f"error: {result.path}: {result.error}", file=sys.stderr)
            else:
                summary.images += 1
                summary.per_class[UNKNOWN if result.unknown else result.top[0][0]] += 1
                summary.uncertain += rec["uncertain"]
                summary.unknown += result.unknown
            if suffix:
                stream.write(format_line(rec, suffix))
            elif not result.error:
                top = "  ".join(f"{label} {p:.3f}" for label, p in result.top)
                if result.unknown:  # the detector's verdict first: none of these classes
                    top = (f"{UNKNOWN} (in_distribution {result.in_distribution:.3f}); "
                           f"closest: {top}")
                stream.write(f"{result.path}\t{top}" + ("\tuncertain" if rec["uncertain"]
                                                         else "") + "\n")
            stream.flush()  # a killed run keeps every line written so far
            bar.update(1)
        bar.close()
    finally:
        if stream is not sys.stdout:
            stream.close()
    summary.seconds = time.perf_counter() - started
    return summary
