"""bench-data: its generated photos, its summary arithmetic, and the copies-vs-originals check."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.tools import bench_data


def test_photo_jpeg_has_the_size_and_classes_differ():
    a = Image.open(io.BytesIO(bench_data.photo_jpeg(320, 240, seed=1, label=0)))
    b = Image.open(io.BytesIO(bench_data.photo_jpeg(320, 240, seed=1, label=2)))
    assert a.format == "JPEG" and a.size == b.size == (320, 240)
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 5
    again = bench_data.photo_jpeg(320, 240, seed=1, label=0)
    assert again == bench_data.photo_jpeg(320, 240, seed=1, label=0)  # seeded


def fake_kind(kind, n, scale):
    def stages(count, seconds):
        return {"prepare": {"seconds": seconds, "images": count, "peak_rss_mb": 100.0},
                "features": {"seconds": 2 * seconds, "seconds_network": seconds,
                             "images": count, "peak_rss_mb": 900.0},
                "cut_cache": {"seconds": 4 * seconds, "seconds_network": 3 * seconds,
                              "images": 4 * count, "peak_rss_mb": 800.0},
                "int8_calibration": {"seconds": 5 + seconds, "seconds_network": seconds,
                                     "images": count, "peak_rss_mb": 1000.0}}
    # fixed 10 s in features at N, which the marginal ratio removes
    small, big = stages(n, 1.0 * n / 10), stages(n * scale, 1.0 * n * scale / 10)
    small["features"]["seconds"] += 10
    return {"kind": kind, "by_count": {str(n): small, str(n * scale): big},
            "agreement": {"images": n * scale, "max_pixel_diff": 2, "max_feature_diff": 0.01,
                          "max_feature_abs": 5.0, "head_agreement": 1.0,
                          "head_disagreements": 0, "test_accuracy_copies": 1.0,
                          "test_accuracy_originals": 1.0}}


def test_summary_ratios_growth_and_markdown():
    kind = fake_kind("vga", 10, 4)
    rows = {r["stage"]: r for r in bench_data.summarise(kind, 10, 4)}
    feats = rows["features"]
    # at 4N: 40 images in 8 s, network 4 s -> 5 img/s end to end, 10 img/s network-only
    assert feats["img_s_end_to_end"] == 5.0 and feats["img_s_network_only"] == 10.0
    assert feats["ratio_end_to_end"] == 0.5
    # marginal: extra 30 images cost 8 - (2 + 10) < 0 -> no marginal figure, not a fake one
    assert feats["ratio_marginal"] is None
    both = rows["prepare+features"]
    assert both["ratio_end_to_end"] == round(4 / 12, 3)
    cut = rows["cut_cache"]
    assert cut["ratio_end_to_end"] == 0.75 and cut["time_growth"] == 4.0
    assert cut["ratio_marginal"] == 0.75
    report = {"machine": {"cpu": "Test CPU", "cpus": 2}, "n": 10, "n_phone": 10, "scale": 4,
              "views": 4, "summary": list(rows.values()), "kinds": {"vga": kind}}
    text = bench_data.markdown(report)
    assert "Test CPU" in text and "| vga | cut_cache | 160 |" in text
    assert "| vga | 40 | 2 | 0.01 / 5.0 | 1.0 (0 differ) |" in text


@pytest.mark.slow
def test_agreement_compares_copies_with_full_size_originals(tmp_path):
    """A small folder of 1600x1200 JPEGs (drafted to 1/2 scale by prepare): the crops of the
    copies stay within 3 levels of the full decodes and the head agrees on every image."""
    from pipeline.core.config import BackboneParams, PrepareParams
    from pipeline.stages.prepare import run as prepare

    rows = []
    for i in range(16):
        path = tmp_path / "img" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bench_data.photo_jpeg(1600, 1200, seed=i, label=i % 2))
        rows.append((str(path), bench_data.CLASSES[i % 2]))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    prepare(PrepareParams(source="csv", path=str(manifest)), tmp_path / "prepared")
    result = bench_data.agreement(tmp_path / "prepared", BackboneParams())
    assert result["images"] == 16
    assert 0 < result["max_pixel_diff"] <= 3  # drafted, so not identical, but close
    assert result["max_feature_diff"] < 0.1 * result["max_feature_abs"]
    assert result["head_agreement"] == 1.0
