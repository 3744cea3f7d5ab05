"""``pipeline bench-data``: are the stages bound by the network or by image decoding, on photos?

Generates its own photo folders (no downloads): 4 classes of photo-like JPEGs (smooth shapes,
sensor noise, quality 90) at VGA (640x480) and phone size (4032x3024). For each kind and for
N and ``scale`` x N images it runs, each in a fresh child process (peak RSS read with
``wait4``): ``prepare`` (decode once, write the copies), ``features``, ``cut_cache`` with
``views`` augmented views, and export's INT8 calibration (crops of the copies, then
onnxruntime's static quantisation of the backbone). It prints and writes, per stage:

* images/s end to end (the stage's own run, after imports);
* the network-only rate measured inside the same run (the backbone, the cut prefix, the
  quantiser on ready tensors) and their ratio;
* the *marginal* ratio: the network's time per image over the stage's extra time per extra
  image from N to ``scale`` x N, which removes fixed costs (model build, ONNX export) that
  a small N would otherwise charge to decoding;
* time(scale x N) / time(N) and the peak RSS of both sizes.

Run: ``pipeline bench-data --out reports/bench_data.json``
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_json, write_text
from ..core.runtime import cpu_name

KINDS = {"vga": (640, 480), "phone": (4032, 3024)}
CLASSES = ("disks", "boxes", "stripes", "rings")


def photo_jpeg(width: int, height: int, seed: int, label: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour field, class-specific shapes, blur and sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, label])
    w, h = max(8, width // 4), max(8, height // 4)  # drawn at 1/4 size, then enlarged
    field = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(max(2, w // 30), max(3, w // 6)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if CLASSES[label] == "disks":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif CLASSES[label] == "boxes":
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
        elif CLASSES[label] == "stripes":
            draw.line((x - 2 * r, y - r, x + 2 * r, y + r), fill=colour, width=max(1, r // 4))
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=max(1, r // 5))
    img = img.filter(ImageFilter.GaussianBlur(1)).resize((width, height),
                                                         Image.Resampling.BILINEAR)
    noise = rng.normal(0.0, 3.0, (64, 64, 1)).astype(np.float32)
    reps = (height // 64 + 1, width // 64 + 1, 1)
    pixels = np.asarray(img, dtype=np.float32) + np.tile(noise, reps)[:height, :width]
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write_photo(job: tuple[str, int, int, int, int]) -> None:
    path, width, height, seed, label = job
    Path(path).write_bytes(photo_jpeg(width, height, seed, label))


def generate(folder: Path, kind: str, count: int, workers: int) -> list[tuple[str, str]]:
    """``count`` images of ``kind`` in ``folder/<class>/`` (kept between runs); returns
    (path, label) rows, classes interleaved, so any prefix is balanced."""
    width, height = KINDS[kind]
    rows, jobs = [], []
    for i in range(count):
        label = i % len(CLASSES)
        path = folder / CLASSES[label] / f"{kind}_{i:05d}.jpg"
        rows.append((str(path), CLASSES[label]))
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(path), width, height, i, label))
    if jobs:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_photo, jobs, chunksize=4))
    return rows


# --------------------------------------------------------------------------- one stage, timed

def child(stage: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in this (child) process; return its timings."""
    from ..core.config import BackboneParams, FeaturesParams, FinetuneParams, PrepareParams

    work = Path(args["work"])
    backbone = BackboneParams()
    if stage == "prepare":
        from ..stages.prepare import run

        t0 = time.perf_counter()
        run(PrepareParams(source="csv", path=args["manifest"]), work / "prepared")
        return {"seconds": time.perf_counter() - t0}
    if stage == "features":
        from ..stages.features import run

        t0 = time.perf_counter()
        m = run(backbone, FeaturesParams(workers=args["workers"]), work / "prepared",
                work / "features")
        return {"seconds": time.perf_counter() - t0, "seconds_network": m["seconds_backbone"]}
    if stage == "cut_cache":
        from ..stages.cut_cache import run

        t0 = time.perf_counter()
        m = run(backbone, FinetuneParams(views=args["views"], augment="flip",
                                         workers=args["workers"]),
                work / "prepared", work / "cut_cache")
        return {"seconds": time.perf_counter() - t0, "seconds_network": m["seconds_network"],
                "images": sum(m["split_counts"].values()) + (args["views"] - 1)
                * m["split_counts"]["train"]}
    if stage == "int8_calibration":
        import tempfile

        import torch

        from ..core.backbones import build_backbone
        from ..core.copies import PreparedImages
        from ..core.dataset import read_prepared
        from ..core.preprocess import normalize
        from ..onnx.convert import export_int8, export_module

        t0 = time.perf_counter()
        net = build_backbone(backbone)
        pp = net.preprocessing
        _, _, rows = read_prepared(work / "prepared")
        train = [r["path"] for r in rows if r["split"] == "train"]
        keys = train[:args["calibration_images"]]
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_module(net.model, torch.zeros(2, 3, pp.input_size, pp.input_size),
                                 Path(tmp) / "backbone.onnx", input_name="image")
            t1 = time.perf_counter()
            images = PreparedImages(work / "prepared")
            calib = normalize(np.stack([images.crop(k, pp) for k in keys]), pp)
            t2 = time.perf_counter()
            export_int8(fp32, Path(tmp) / "int8.onnx", calib, "minmax")
            t3 = time.perf_counter()
        return {"seconds": t3 - t0, "seconds_images": t2 - t1, "seconds_network": t3 - t2,
                "images": len(keys)}
    if stage == "agreement":
        return agreement(work / "prepared", backbone)
    raise ValueError(stage)


def agreement(prepared: Path, backbone: Any) -> dict[str, Any]:
    """What training sees (crops of the copies) against what the deployed model computes from
    the full-size originals (full decode, then the in-graph resize and crop): the largest pixel
    and feature differences, and how often a logistic-regression head trained on the copies'
    train-split features predicts the same class from both, over every image."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from ..core.backbones import build_backbone
    from ..core.copies import PreparedImages
    from ..core.dataset import read_prepared
    from ..core.imageio import load_rgb
    from ..core.preprocess import normalize, resize_and_crop

    net = build_backbone(backbone)
    pp = net.preprocessing
    summary, classes, rows = read_prepared(prepared)
    images = PreparedImages(prepared)
    root = Path(summary["root"])
    pixel_diff, feats = 0, {"copies": [], "originals": []}
    for start in range(0, len(rows), 32):
        keys = [r["path"] for r in rows[start:start + 32]]
        crops = {"copies": np.stack([images.crop(k, pp) for k in keys]),
                 "originals": np.stack([resize_and_crop(np.asarray(load_rgb(root / k)), pp)
                                        for k in keys])}
        pixel_diff = max(pixel_diff, int(np.abs(crops["copies"].astype(np.int16)
                                                - crops["originals"]).max()))
        with torch.inference_mode():
            for name, batch in crops.items():
                feats[name].append(net.model(torch.from_numpy(normalize(batch, pp))).numpy())
    copies, originals = np.concatenate(feats["copies"]), np.concatenate(feats["originals"])
    labels = np.array([classes.index(r["label"]) for r in rows])
    train = np.array([r["split"] == "train" for r in rows])
    head = LogisticRegression(max_iter=3000).fit(copies[train], labels[train])
    pred_c, pred_o = head.predict(copies), head.predict(originals)
    test = np.array([r["split"] == "test" for r in rows])
    return {"images": len(rows), "max_pixel_diff": pixel_diff,
            "max_feature_diff": round(float(np.abs(copies - originals).max()), 5),
            "max_feature_abs": round(float(np.abs(copies).max()), 5),
            "head_agreement": round(float((pred_c == pred_o).mean()), 4),
            "head_disagreements": int((pred_c != pred_o).sum()),
            "test_accuracy_copies": round(float((pred_c[test] == labels[test]).mean()), 4),
            "test_accuracy_originals": round(float((pred_o[test] == labels[test]).mean()), 4)}


def timed(stage: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh process; add its peak RSS (largest of it and its workers)."""
    out = Path(args["work"]) / f"{stage}.timing.json"
    code = ("import json, sys; from pipeline.tools.bench_data import child; "
            f"json.dump(child({stage!r}, json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench-data: {stage} failed:\n{stderr[-2000:]}")
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # kB on Linux
    return result


def run_kind(kind: str, n: int, scale: int, views: int, calibration_images: int,
             workers: int | None, root: Path) -> dict[str, Any]:
    rows = generate(root / "images" / kind, kind, n * scale, os.cpu_count() or 1)
    sizes = {}
    # a warm-up on 16 images first: it pays the one-off ONNX exports (kept in the export
    # cache, as on a user's second run) and its times are reported as the cold start
    for label, count in (("warmup", min(16, n)), (n, n), (n * scale, n * scale)):
        work = root / f"{kind}_{label}"
        work.mkdir(parents=True, exist_ok=True)
        manifest = work / "manifest.csv"
        with open(manifest, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("path", "label"))
            writer.writerows(rows[:count])
        args = {"work": str(work), "manifest": str(manifest), "workers": workers,
                "views": views, "calibration_images": calibration_images}
        stages = {}
        for stage in ("prepare", "features", "cut_cache", "int8_calibration"):
            print(f"bench-data: {kind} x {count}: {stage}", file=sys.stderr, flush=True)
            stages[stage] = timed(stage, args)
            stages[stage].setdefault("images", count)
        sizes[label] = stages
    warmup = sizes.pop("warmup")
    print(f"bench-data: {kind} x {n * scale}: agreement", file=sys.stderr, flush=True)
    agreed = timed("agreement", {"work": str(root / f"{kind}_{n * scale}")})
    mb = np.mean([os.path.getsize(p) for p, _ in rows[:n]]) / 1e6
    return {"kind": kind, "size": list(KINDS[kind]), "mean_file_mb": round(float(mb), 3),
            "by_count": {str(k): v for k, v in sizes.items()}, "agreement": agreed,
            "cold_start_16_images_seconds": {k: round(v["seconds"], 2)
                                             for k, v in warmup.items()}}


def summarise(kind_report: dict[str, Any], n: int, scale: int) -> list[dict[str, Any]]:
    """Per stage: rates, ratios (end to end and marginal), growth N -> scale x N, peak RSS."""
    small, big = kind_report["by_count"][str(n)], kind_report["by_count"][str(n * scale)]
    lines = []

    def row(name: str, s_small: float, s_big: float, net_big: float, images_small: int,
            images_big: int, rss: tuple[float, float]) -> dict[str, Any]:
        net_per_image = net_big / images_big
        marginal = ((s_big - s_small) / (images_big - images_small)
                    if images_big > images_small else 0.0)
        return {"kind": kind_report["kind"], "stage": name, "images": images_big,
                "img_s_end_to_end": round(images_big / s_big, 1),
                "img_s_network_only": round(1 / net_per_image, 1),
                "ratio_end_to_end": round(net_per_image * images_big / s_big, 3),
                "ratio_marginal": round(net_per_image / marginal, 3) if marginal > 0 else None,
                "time_growth": round(s_big / s_small, 2),
                "peak_rss_mb": list(rss)}

    pf_small = small["prepare"]["seconds"] + small["features"]["seconds"]
    pf_big = big["prepare"]["seconds"] + big["features"]["seconds"]
    lines.append(row("prepare+features", pf_small, pf_big, big["features"]["seconds_network"],
                     n, n * scale, (max(small["prepare"]["peak_rss_mb"],
                                        small["features"]["peak_rss_mb"]),
                                    max(big["prepare"]["peak_rss_mb"],
                                        big["features"]["peak_rss_mb"]))))
    for stage in ("features", "cut_cache", "int8_calibration"):
        a, b = small[stage], big[stage]
        lines.append(row(stage, a["seconds"], b["seconds"], b["seconds_network"], a["images"],
                         b["images"], (a["peak_rss_mb"], b["peak_rss_mb"])))
    lines.append({"kind": kind_report["kind"], "stage": "prepare", "images": n * scale,
                  "img_s_end_to_end": round(n * scale / big["prepare"]["seconds"], 1),
                  "time_growth": round(big["prepare"]["seconds"] / small["prepare"]["seconds"],
                                       2),
                  "peak_rss_mb": [small["prepare"]["peak_rss_mb"], big["prepare"]["peak_rss_mb"]]})
    return lines


def markdown(report: dict[str, Any]) -> str:
    head = ("| kind | stage | images | img/s end to end | network-only img/s | ratio | "
            "marginal ratio | time N->{s}N | peak RSS MB (N, {s}N) |\n"
            "|---|---|---|---|---|---|---|---|---|\n").format(s=report["scale"])
    body = "".join(
        f"| {r['kind']} | {r['stage']} | {r['images']} | {r['img_s_end_to_end']} | "
        f"{r.get('img_s_network_only', '')} | {r.get('ratio_end_to_end', '')} | "
        f"{r.get('ratio_marginal', '')} | {r['time_growth']}x | "
        f"{r['peak_rss_mb'][0]:.0f}, {r['peak_rss_mb'][1]:.0f} |\n" for r in report["summary"])
    cold = ("\nCold start (a warm-up on 16 images before the timed runs; it pays the one-off "
            "ONNX exports that the export cache then keeps), seconds: "
            + "; ".join(f"{kind} " + ", ".join(f"{stage} {sec}" for stage, sec in
                                                v.get("cold_start_16_images_seconds", {}).items())
                        for kind, v in report["kinds"].items()) + ".\n")
    agreed = ("\n## Copies against full-size originals\n\n"
              "Training reads the copies; a deployed model gets the full-size photo and resizes "
              "it in its graph. Over every image of the larger folder: the largest difference "
              "between the two 224 crops, between the backbone's features, and how often a "
              "logistic-regression head (trained on the copies) predicts the same class.\n\n"
              "| kind | images | max crop diff (levels) | max feature diff / max feature | "
              "head agreement | test acc. copies / originals |\n|---|---|---|---|---|---|\n"
              + "".join(
                  f"| {kind} | {a['images']} | {a['max_pixel_diff']} | "
                  f"{a['max_feature_diff']} / {a['max_feature_abs']} | {a['head_agreement']} "
                  f"({a['head_disagreements']} differ) | {a['test_accuracy_copies']} / "
                  f"{a['test_accuracy_originals']} |\n"
                  for kind, a in ((k, v["agreement"]) for k, v in report["kinds"].items())))
    return (f"# Data-path benchmark\n\nMachine: {report['machine']['cpu']} "
            f"({report['machine']['cpus']} CPUs). N = {report['n']} (VGA), "
            f"{report['n_phone']} (phone); scale {report['scale']}; {report['views']} views.\n\n"
            + head + body + cold + agreed)


def run(out: Path, md: Path | None, work: Path, n: int, n_phone: int, scale: int, views: int,
        calibration_images: int, workers: int | None) -> dict[str, Any]:
    import shutil

    from ..core.runtime import resolve_workers

    # a cache of the benchmark's own, cold at the start (see run_kind's warm-up)
    shutil.rmtree(work / "export_cache", ignore_errors=True)
    os.environ["PIPELINE_EXPORT_CACHE"] = str((work / "export_cache").resolve())
    kinds = {"vga": run_kind("vga", n, scale, views, calibration_images, workers, work),
             "phone": run_kind("phone", n_phone, scale, views, calibration_images, workers,
                               work)}
    summary = summarise(kinds["vga"], n, scale) + summarise(kinds["phone"], n_phone, scale)
    report = {"machine": {"cpu": cpu_name(), "cpus": os.cpu_count()}, "n": n,
              "n_phone": n_phone, "scale": scale, "views": views,
              "calibration_images": calibration_images, "workers": resolve_workers(workers),
              "summary": summary, "kinds": kinds}
    write_json(out, report)
    if md is not None:
        write_text(md, markdown(report))
    print(markdown(report))
    return report
