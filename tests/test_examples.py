"""The Node and browser examples give the same answers as the Python runner.

They need node/npm (and, for the page, Debian's chromium); each test skips with the reason when
one is missing. `.ci/run` installs them where it can. npm packages are installed once per
session into a temporary folder (ONNXRUNTIME_NODE_INSTALL=skip: no GPU binaries from outside
npm)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline.core.dataset import image_root, read_prepared
from pipeline.onnx.runner import OnnxClassifier

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@functools.lru_cache(maxsize=None)
def npm_install(example: str, workdir: str) -> Path:
    """Copy ``examples/<example>`` to ``workdir`` and `npm install` it there."""
    dest = Path(workdir) / example
    shutil.copytree(EXAMPLES / example, dest, ignore=shutil.ignore_patterns("node_modules"))
    env = dict(os.environ, ONNXRUNTIME_NODE_INSTALL="skip")
    result = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=dest, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"npm install failed (no registry?): {result.stderr.strip()[-300:]}")
    return dest


@pytest.fixture(scope="module")
def npm_dir(tmp_path_factory) -> str:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (apt-get install nodejs npm)")
    return str(tmp_path_factory.mktemp("npm"))


def split_images(exported) -> list[Path]:
    root, _ = exported
    summary, _, rows = read_prepared(root / "prepared")
    base = image_root(root / "prepared", summary)
    return [base / r["path"] for r in rows if r["split"] == "test"]


def with_photo_sizes(paths: list[Path], folder: Path) -> list[Path]:
    """The test split plus a few of its images blown up to photo sizes and odd shapes (PNG, so
    every decoder gets the same pixels): what an app hands the model is a full-size image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    extra = []
    for i, size in enumerate([(1600, 1200), (1200, 1600), (97, 211)]):
        out = folder / f"photo_{i}.png"
        Image.open(paths[i]).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out)
        extra.append(out)
    # and images of none of the classes, for the in_distribution verdict
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for name, pixels in (("noise", noise), ("blank", np.full((240, 320, 3), 255, np.uint8))):
        Image.fromarray(pixels).save(folder / f"{name}.png")
        extra.append(folder / f"{name}.png")
    return paths + extra


def compare(answers: list[dict], model: Path, paths: list[Path]) -> None:
    """100 % top-1 agreement with the runner and max |p diff| <= 1e-4 on every class; the
    same in_distribution score (1e-4) and the same unknown verdict."""
    runner = OnnxClassifier(model)
    expected = {p.path: p for p in runner.predict_files(paths, top_k=len(runner.classes))}
    assert len(answers) == len(paths)
    worst = 0.0
    for answer, path in zip(answers, paths):
        want = dict(expected[str(path)].top)
        got = {p["label"]: p["probability"] for p in answer["predictions"]}
        assert answer["predictions"][0]["label"] == expected[str(path)].top[0][0], path
        worst = max(worst, max(abs(got[k] - want[k]) for k in got))
        score = expected[str(path)].in_distribution
        assert score is not None and abs(answer["in_distribution"] - score) <= 1e-4, path
        assert answer["unknown"] is expected[str(path)].unknown, path
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_node_example_agrees_with_the_runner(exported, npm_dir):
    root, _ = exported
    model = root / "out" / "model.onnx"
    paths = with_photo_sizes(split_images(exported), Path(npm_dir) / "photos_node")
    node_dir = npm_install("node", npm_dir)
    result = subprocess.run(["node", "classify.mjs", str(model), *map(str, paths), "--top-k",
                             "10"], cwd=node_dir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    compare(answers, model, paths)
    unknown = [a["path"] for a in answers if a["unknown"]]
    assert result.stderr.count("none of these (in_distribution") == len(unknown)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self) -> None:  # what onnxruntime-web's threads would need
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_web_page_agrees_with_the_runner(exported, npm_dir, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    root, _ = exported
    model = root / "out" / "model.onnx"
    paths = with_photo_sizes(split_images(exported), tmp_path / "photos")
    web_dir = npm_install("web", npm_dir)
    site = tmp_path / "site"
    shutil.copytree(web_dir, site, symlinks=True)
    shutil.copy(model, site / "model.onnx")
    shutil.copy(f"{model}.json", site / "model.onnx.json")
    (site / "images").mkdir()
    names = []
    for i, p in enumerate(paths):
        shutil.copy(p, site / "images" / f"{i}{p.suffix}")
        names.append(f"images/{i}{p.suffix}")
    (site / "images.json").write_text(json.dumps(names))
    handler = functools.partial(_Handler, directory=str(site))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html?images=images.json"
        result = subprocess.run(["node", "run_page.mjs", url, chromium], cwd=site,
                                capture_output=True, text=True, timeout=300)
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for answer, path in zip(answers, paths):
        answer["path"] = str(path)
    compare(answers, model, paths)
