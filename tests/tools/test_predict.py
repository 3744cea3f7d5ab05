"""pipeline predict on a photo library: decode rule, parallel order, streamed resumable output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.core.copies import decode_copy
from pipeline.core.parallel import ordered_thread_map
from pipeline.onnx.runner import OnnxClassifier, decode_for_model

from ..conftest import REPO
from ..onnx.test_runner import CLASSES, channel_mean_model, colour_image


def photo(path: Path, seed: int, size=(640, 480)) -> Path:
    rng = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), np.uint8)
    base[..., seed % 3] = 200
    noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
    Image.fromarray(base + noise).save(path, quality=90)
    return path


def test_a_jpeg_is_decoded_as_prepare_decodes_its_copy_or_whole(tmp_path):
    big = photo(tmp_path / "big.jpg", 0, size=(1200, 900))
    copy = decode_for_model(big, 64)
    assert copy.shape == (64, 85, 3) and np.array_equal(copy, decode_copy(big, 64))
    # "fast": drafted to 1/8 (150x113 >= 64) where prepare keeps 1/4 (300x225 >= 128)
    fast = decode_for_model(big, 64, draft_margin=1)
    assert fast.shape == (64, 84, 3) and np.array_equal(fast, decode_copy(big, 64,
                                                                           draft_margin=1))
    assert decode_for_model(big, None).shape == (900, 1200, 3)
    small = colour_image(tmp_path / "s.png", 1, size=(20, 12))
    assert decode_for_model(small, 64).shape == (12, 20, 3)  # never enlarged
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert decode_for_model(tmp_path / "bad.jpg", 64).startswith("cannot decode")
    assert decode_for_model(tmp_path / "gone.jpg", 64) == "file not found"
    assert "decompression bomb" in decode_for_model(big, 64, max_pixels=1000)


def test_the_ordered_map_keeps_order_and_reads_at_most_a_window_ahead():
    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    def slow_square(i):
        time.sleep(0.001 * (i % 3))  # later items often finish first
        return i * i

    out = ordered_thread_map(slow_square, items(), workers=3, window=4)
    assert next(out) == 0
    time.sleep(0.05)
    assert len(pulled) <= 5  # the window, plus the one taken
    assert [0, *out] == [i * i for i in range(50)]
    assert list(ordered_thread_map(slow_square, range(5), workers=0, window=1)) == \
        [0, 1, 4, 9, 16]


def test_each_decode_mode_reaches_the_model_and_a_wrong_one_is_refused(tmp_path):
    from pipeline.core.errors import PipelineError

    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx", any_size=True))
    seen = []
    model.prepare = lambda pixels: seen.append(pixels.shape) or pixels
    big = photo(tmp_path / "big.jpg", 1, size=(1200, 900))
    for decode in ("copy", "fast", "full"):
        (result,) = model.predict_files([big], decode=decode)
        assert result.top[0][0] == "green"
    assert seen == [(8, 10, 3), (8, 10, 3), (900, 1200, 3)]  # resize size 8
    with pytest.raises(PipelineError, match="decode must be one of copy, fast, full"):
        list(model.predict_files([big], decode="quick"))


def test_decoding_threads_change_nothing_but_speed(tmp_path):
    model = OnnxClassifier(channel_mean_model(tmp_path / "m.onnx", any_size=True))
    files = [photo(tmp_path / f"{i}.jpg", i, size=(96 + 8 * (i % 2), 64)) for i in range(9)]
    files.insert(4, tmp_path / "missing.jpg")
    runs = [list(model.predict_files(files, top_k=3, batch_size=4, workers=w))
            for w in (0, 1, 3)]
    assert runs[0] == runs[1] == runs[2]
    assert [r.path for r in runs[0]] == [str(f) for f in files]
    assert runs[0][4].error == "file not found"
    assert [r.top[0][0] for r in runs[0] if not r.error] == [CLASSES[i % 3] for i in range(9)]


def invoke(*args):
    return CliRunner().invoke(main, ["predict", "--providers", "cpu", *map(str, args)])


@pytest.fixture
def library(tmp_path):
    model = channel_mean_model(tmp_path / "m.onnx", any_size=True)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        photo((folder if i % 2 else folder / "sub") / f"{i}.jpg", i, size=(80, 60))
    (folder / "broken.jpg").write_bytes(b"nope")
    return model, folder


def test_out_jsonl_and_csv_summary_and_exit_status(library, tmp_path):
    model, folder = library
    result = invoke("--model", model, "--out", tmp_path / "r.jsonl", folder)
    assert result.exit_code == 1  # the broken file; the others are classified
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and sum("error" in x for x in lines) == 1
    assert {x["path"] for x in lines} == {str(p) for p in folder.rglob("*.jpg")}  # recursive
    assert "predict: 6 images" in result.output and "1 errors" in result.output
    assert "red 2" in result.output and "green 2" in result.output
    invoke("--model", model, "--out", tmp_path / "r.csv", "--top-k", 2, "--decode", "full",
           folder)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == ("path,label,probability,uncertain,in_distribution,unknown,top,error")
    assert len(rows) == 8
    good = next(r for r in rows[1:] if r.endswith(","))
    assert good.count(";") == 1 and ",false," in good
    assert any(r.startswith(str(folder / "broken.jpg")) and "not an image" in r for r in rows)


def test_an_existing_out_file_is_refused_unless_resume_or_force(library, tmp_path):
    model, folder = library
    out = tmp_path / "r.jsonl"
    out.write_text("keep me\n")
    result = invoke("--model", model, "--out", out, folder)
    assert result.exit_code == 1 and "exists; add --resume" in result.output
    assert out.read_text() == "keep me\n"
    result = invoke("--model", model, "--out", out, "--resume", folder)
    assert "r.jsonl:1: not a line that predict writes" in result.output
    assert invoke("--model", model, "--out", out, "--force", folder).exit_code == 1
    assert len(out.read_text().splitlines()) == 7
    assert invoke("--model", model, "--out", tmp_path / "r.txt", folder).exit_code == 1
    assert invoke("--model", model, "--resume", folder).exit_code == 2


def test_an_empty_folder_is_a_one_line_error_with_status_2(library, tmp_path):
    model, folder = library
    assert invoke("--model", model, "--decode", "quick", folder).exit_code == 2
    (tmp_path / "empty").mkdir()
    result = invoke("--model", model, tmp_path / "empty")
    assert result.exit_code == 2 and "no image files in" in result.output


def test_resume_cuts_a_half_written_line_and_appends_the_rest(library, tmp_path):
    model, folder = library
    whole = tmp_path / "whole.jsonl"
    invoke("--model", model, "--out", whole, folder)
    lines = whole.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:10])  # killed while writing line 4
    result = invoke("--model", model, "--out", part, "--resume", folder)
    assert part.read_text() == whole.read_text()
    assert "3 already done" in result.output


def test_a_killed_run_resumed_gives_the_file_of_an_uninterrupted_run(tmp_path):
    model = channel_mean_model(tmp_path / "m.onnx", any_size=True)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(400):
        photo(folder / f"{i:03d}.jpg", i, size=(320, 240))
    command = [sys.executable, "-m", "pipeline", "predict", "--model", str(model),
               "--providers", "cpu", "--batch-size", "1", "--workers", "0"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    whole = tmp_path / "whole.jsonl"
    subprocess.run(command + ["--out", str(whole), str(folder)], check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(command + ["--out", str(killed), str(folder)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not killed.is_file() or
                                   killed.read_bytes().count(b"\n") < 40):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    done = killed.read_bytes().count(b"\n")
    assert 40 <= done < 400
    resumed = subprocess.run(command + ["--out", str(killed), "--resume", str(folder)],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert killed.read_text() == whole.read_text()
    assert f"{done} already done" in resumed.stderr
