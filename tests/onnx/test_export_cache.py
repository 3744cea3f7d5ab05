"""The ONNX export cache: the same module gives the cached bytes without exporting again; any
change the file depends on (a weight, a buffer, a wrapper's temperature, the names, the input
shape, train/eval mode) exports anew; ``off`` disables it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pipeline.core.preprocess import Preprocessing
from pipeline.onnx import convert


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(convert.EXPORT_CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def count_exports(monkeypatch):
    calls = []
    real = convert._export_module

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_export_module", counting)
    return calls


def export(model, path, example=None, **kw):
    return convert.export_module(model.eval(), torch.zeros(2, 3, 8, 8) if example is None
                                 else example, path, **kw)


def test_the_same_module_comes_from_the_cache_with_the_same_bytes(tmp_path, cache,
                                                                   count_exports):
    first = export(Tiny(), tmp_path / "a.onnx")
    second = export(Tiny(), tmp_path / "b.onnx")
    assert len(count_exports) == 1
    assert first.read_bytes() == second.read_bytes()
    assert len(list(cache.glob("*.onnx"))) == 1


def test_every_input_of_the_file_is_in_the_key(tmp_path, cache, count_exports):
    export(Tiny(), tmp_path / "base.onnx")
    changed_weight = Tiny()
    with torch.no_grad():
        changed_weight.fc.bias[0] += 1e-3
    changed_buffer = Tiny()
    changed_buffer.bn.running_mean += 0.5
    export(changed_weight, tmp_path / "w.onnx")
    export(changed_buffer, tmp_path / "b.onnx")
    export(Tiny(), tmp_path / "n.onnx", input_name="pixels")
    export(Tiny(), tmp_path / "o.onnx", output_names=("features",))
    export(Tiny(), tmp_path / "s.onnx", example=torch.zeros(2, 3, 9, 9))
    convert.export_module(Tiny().train(), torch.zeros(2, 3, 8, 8), tmp_path / "t.onnx")
    assert len(count_exports) == 7
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)

    def out(name, feed="input"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        return session.run(None, {feed: x})[0]

    assert not np.allclose(out("base.onnx"), out("w.onnx"))
    assert not np.allclose(out("base.onnx"), out("b.onnx"))


def test_a_wrapper_temperature_is_part_of_the_key(tmp_path, cache, count_exports):
    """The deployable wrapper's temperature is a plain float: a cache that missed it would
    ship the previous calibration."""
    pp = Preprocessing(input_size=8, resize_size=8, interpolation="bicubic",
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    names = {"input_name": "image", "output_names": ("probabilities", "logits")}
    plain = convert.deployable(Tiny().eval(), pp, "uint8_nhwc", 1.0)
    hot = convert.deployable(Tiny().eval(), pp, "uint8_nhwc", 2.0)
    convert.export_module(plain, image, tmp_path / "t1.onnx", **names)
    convert.export_module(hot, image, tmp_path / "t2.onnx", **names)
    assert len(count_exports) == 2
    x = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    p1, l1 = ort.InferenceSession(str(tmp_path / "t1.onnx")).run(None, {"image": x})
    p2, l2 = ort.InferenceSession(str(tmp_path / "t2.onnx")).run(None, {"image": x})
    assert np.allclose(l1, l2) and not np.allclose(p1, p2)


def test_off_exports_every_time_and_writes_no_cache(tmp_path, monkeypatch, count_exports):
    monkeypatch.setenv(convert.EXPORT_CACHE_ENV, "off")
    assert convert.export_cache_dir() is None
    export(Tiny(), tmp_path / "a.onnx")
    export(Tiny(), tmp_path / "b.onnx")
    assert len(count_exports) == 2
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_the_cache_keeps_the_newest_entries(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(convert, "EXPORT_CACHE_ENTRIES", 2)
    for i in range(3):
        model = Tiny()
        with torch.no_grad():
            model.fc.bias[0] = float(i)
        export(model, tmp_path / f"{i}.onnx")
    assert len(list(cache.glob("*.onnx"))) == 2
