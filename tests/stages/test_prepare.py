import csv
import json
import re
import shutil

import numpy as np

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.config import PrepareParams
from pipeline.core.dataset import read_prepared
from pipeline.core.errors import PipelineError
from pipeline.stages.prepare import run

from ..conftest import make_image


def folder_params(root, **kw):
    return PrepareParams(source="folder", path=str(root), **kw)


def rows_of(out):
    return read_prepared(out)[2]


def test_folder_split_is_stratified_and_complete(image_folder, tmp_path):
    out = tmp_path / "prepared"
    summary = run(folder_params(image_folder, val_fraction=0.25, test_fraction=0.25), out)
    rows = rows_of(out)
    assert summary["num_images"] == len(rows) == 24
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "fox"]
    for label in ("cat", "dog", "fox"):
        splits = [r["split"] for r in rows if r["label"] == label]
        assert splits.count("test") == 2 and splits.count("val") == 2 and splits.count("train") == 4
    assert all(len(r["sha256"]) == 64 and not r["path"].startswith("/") for r in rows)
    assert len({r["path"] for r in rows}) == 24


def test_split_is_seeded(image_folder, tmp_path):
    run(folder_params(image_folder, seed=1), tmp_path / "a")
    run(folder_params(image_folder, seed=1), tmp_path / "b")
    run(folder_params(image_folder, seed=2), tmp_path / "c")
    a, b, c = ((tmp_path / n / "manifest.csv").read_bytes() for n in "abc")
    assert a == b and a != c


def test_bad_files_rejected_with_reasons(image_folder, tmp_path):
    (image_folder / "cat" / "notes.txt").write_text("hello")
    (image_folder / "dog" / "fake.png").write_text("not a png")
    trunc = make_image(image_folder / "fox" / "trunc.jpg", seed=9, size=(64, 64))
    data = trunc.read_bytes()
    assert data.index(b"\xff\xda") < len(data) // 2  # cut inside the scan, past the header
    trunc.write_bytes(data[:len(data) // 2])
    shutil.copy(image_folder / "cat" / "0.png", image_folder / "cat" / "copy.png")
    (image_folder / "empty").mkdir()
    out = tmp_path / "prepared"
    result = CliRunner().invoke(main, ["prepare", "--params", str(write_params(tmp_path, image_folder)),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "rejected.csv") as handle:
        rejected = {r["path"]: r["reason"] for r in csv.DictReader(handle)}
    assert "not an image" in rejected["cat/notes.txt"]
    assert "not an image" in rejected["dog/fake.png"]
    assert "cannot decode" in rejected["fox/trunc.jpg"]
    assert "duplicate of cat/0.png" in rejected["cat/copy.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 24 and summary["num_rejected"] == 4
    assert summary["empty_class_folders_ignored"] == ["empty"]
    assert "empty class folders ignored: empty" in result.output


def write_params(tmp_path, root, extra=""):
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare:\n  source: folder\n  path: {root}\n{extra}")
    return params


def test_fewer_than_two_classes_fails(tmp_path):
    root = tmp_path / "imgs"
    for i in range(5):
        make_image(root / "only" / f"{i}.png", seed=i)
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_text("nope")
    with pytest.raises(PipelineError, match="at least 2 classes"):
        run(folder_params(root), tmp_path / "out")


def test_class_with_too_few_images_fails_with_names(image_folder, tmp_path):
    for i in range(2):
        make_image(image_folder / "rare" / f"{i}.png", seed=900 + i)
    result = CliRunner().invoke(main, ["prepare", "--params",
                                       str(write_params(tmp_path, image_folder)),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "'rare': 2" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_failure_keeps_previous_output(image_folder, tmp_path):
    out = tmp_path / "prepared"
    run(folder_params(image_folder), out)
    before = (out / "manifest.csv").read_bytes()
    with pytest.raises(PipelineError):
        run(folder_params(tmp_path / "missing"), out)
    assert (out / "manifest.csv").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_csv_manifest_source(image_folder, tmp_path):
    manifest = tmp_path / "list.csv"
    lines = ["path,label"]
    for label in ("cat", "dog"):
        for i in range(6):
            lines.append(f"images/{label}/{i}.png,{label}")
    lines.append("images/missing.png,cat")
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "prepared"
    summary = run(PrepareParams(source="csv", path=str(manifest)), out)
    assert summary["num_images"] == 12 and summary["num_rejected"] == 1
    assert "file not found" in (out / "rejected.csv").read_text()
    summary2, classes, rows = read_prepared(out)
    assert classes == ["cat", "dog"] and rows[0]["path"].startswith("images/")


def test_csv_without_columns_fails(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,class\na.png,x\n")
    with pytest.raises(PipelineError, match="'path' and 'label'"):
        run(PrepareParams(source="csv", path=str(manifest)), tmp_path / "out")


def test_sklearn_digits_subsample(tmp_path):
    out = tmp_path / "prepared"
    summary = run(PrepareParams(max_images_per_class=10), out)
    assert summary["num_classes"] == 10 and summary["num_images"] == 100
    rows = rows_of(out)
    assert (out / "images" / rows[0]["path"]).is_file()


def test_max_image_pixels_is_applied_by_prepare(image_folder, tmp_path):
    """prepare.max_image_pixels reaches the decoder: an image above it is rejected as a
    decompression bomb (named in rejected.csv), the same image below it is kept."""
    make_image(image_folder / "cat" / "big.png", seed=999, size=(300, 200))
    strict = run(PrepareParams(source="folder", path=str(image_folder), max_image_pixels=50_000),
                 tmp_path / "strict")
    rejected = (tmp_path / "strict" / "rejected.csv").read_text()
    assert "cat/big.png" in rejected and strict["num_rejected"] == 1
    loose = run(PrepareParams(source="folder", path=str(image_folder), max_image_pixels=60_000),
                tmp_path / "loose")
    assert loose["num_rejected"] == 0 and loose["num_images"] == strict["num_images"] + 1


def test_workers_do_not_change_the_output(image_folder, tmp_path):
    """Decoding in 2 worker processes writes byte-identical copies, index and manifest."""
    make_image(image_folder / "dog" / "big.jpg", seed=77, size=(700, 600), fmt="JPEG")
    run(folder_params(image_folder, workers=0), tmp_path / "serial")
    run(folder_params(image_folder, workers=2), tmp_path / "parallel")
    for name in ("pixels.bin", "pixels.csv", "manifest.csv", "rejected.csv"):
        assert (tmp_path / "serial" / name).read_bytes() == \
            (tmp_path / "parallel" / name).read_bytes(), name


def test_copies_cover_the_manifest_and_hold_the_decoded_pixels(image_folder, tmp_path):
    from pipeline.core.copies import PreparedImages
    from pipeline.core.imageio import load_rgb

    make_image(image_folder / "fox" / "wide.png", seed=78, size=(900, 300))
    out = tmp_path / "prepared"
    summary = run(folder_params(image_folder), out)
    images = PreparedImages(out)
    rows = rows_of(out)
    assert set(images.index) == {r["path"] for r in rows}
    assert summary["copies"]["short_side"] == 256
    small = images.rgb("cat/0.png")
    assert (small == np.asarray(load_rgb(image_folder / "cat" / "0.png"))).all()
    assert images.rgb("fox/wide.png").shape == (256, 768, 3)


def test_dropped_duplicates_have_no_copy(image_folder, tmp_path):
    from pipeline.core.copies import PreparedImages

    shutil.copy(image_folder / "cat" / "0.png", image_folder / "cat" / "twin.png")
    out = tmp_path / "prepared"
    run(folder_params(image_folder), out)
    assert "cat/twin.png" not in PreparedImages(out).index


def test_disk_full_while_writing_copies_is_one_line_and_keeps_the_old_output(
        image_folder, tmp_path, monkeypatch):
    import errno

    from pipeline.core.copies import CopyWriter

    out = tmp_path / "prepared"
    params = write_params(tmp_path, image_folder)
    assert CliRunner().invoke(main, ["prepare", "--params", str(params), "--out",
                                     str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = {"n": 0}
    real_add = CopyWriter.add

    def add_until_full(self, key, pixels):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(self, key, pixels)

    monkeypatch.setattr(CopyWriter, "add", add_until_full)
    result = CliRunner().invoke(main, ["prepare", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 1
    assert "disk full" in result.output and "Traceback" not in result.output
    messages = [line for line in re.split(r"[\r\n]", result.output)
                if line.strip() and "prepare: decoding" not in line]  # not tqdm's bar
    assert len(messages) == 1 and "disk full" in messages[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


@pytest.mark.parametrize("workers", [0, 2])
def test_ordered_map_keeps_order_and_bounds_what_it_reads_ahead(workers):
    from pipeline.stages.prepare import ordered_map

    consumed = []

    def items():
        for i in range(50):
            consumed.append(i)
            yield (i,)

    results = ordered_map(abs_negated, items(), workers, window=4)
    first = next(results)
    # in this process: one item at a time; in workers: a full window is read ahead
    assert first == 0 and len(consumed) == (1 if workers == 0 else 4)
    assert [first] + list(results) == [-i for i in range(50)]


def test_ordered_map_with_one_worker_runs_in_this_process():
    import os

    from pipeline.stages.prepare import ordered_map

    assert set(ordered_map(pid_of, [(i,) for i in range(3)], 1)) == {os.getpid()}
    assert set(ordered_map(pid_of, [(i,) for i in range(3)], 2)) != {os.getpid()}


def test_ordered_map_default_window_is_64():
    from pipeline.stages.prepare import ordered_map

    consumed = []

    def items():
        for i in range(100):
            consumed.append(i)
            yield (i,)

    results = ordered_map(abs_negated, items(), 2)
    next(results)
    assert len(consumed) == 64
    assert len(list(results)) == 99


def test_split_class_gives_each_split_at_least_one_item():
    import random

    from pipeline.stages.prepare import split_class

    parts = split_class(list(range(10)), 0.1, 0.04, random.Random(0))
    assert [len(parts[k]) for k in ("test", "val", "train")] == [1, 1, 8]
    parts = split_class(list(range(10)), 0.2, 0.3, random.Random(0))
    assert [len(parts[k]) for k in ("test", "val", "train")] == [3, 2, 5]
    assert sorted(parts["test"] + parts["val"] + parts["train"]) == list(range(10))


def test_csv_extra_columns_are_allowed_and_errors_give_the_file_line(image_folder, tmp_path):
    from pipeline.stages.prepare import scan_csv

    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,note\nimages/cat/0.png,cat,ok\nimages/cat/1.png,,x\n")
    with pytest.raises(PipelineError, match=r"list.csv:3: empty path or label"):
        scan_csv(manifest)
    manifest.write_text("path,label,note\nimages/cat/0.png,cat,ok\n")
    (candidate,) = scan_csv(manifest)
    assert (candidate.rel, candidate.label) == ("images/cat/0.png", "cat")


def test_the_rejection_hint_names_the_first_rejected_file():
    from pipeline.stages.prepare import _rejected_hint

    assert _rejected_hint([]) == "no files rejected"
    assert _rejected_hint([("a.png", "cat", "file not found"), ("b.png", "dog", "empty")]) == \
        "2 files rejected, e.g. a.png: file not found"


def pid_of(i):
    import os

    return os.getpid()


def abs_negated(i):
    return -abs(i)
