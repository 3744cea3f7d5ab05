import json

import numpy as np
import pytest


from pipeline.core.backbones import build_backbone
from pipeline.core.caches import load_cache
from pipeline.core.config import BackboneParams, FeaturesParams, PrepareParams
from pipeline.core.dataset import image_root, read_prepared
from pipeline.core.errors import PipelineError
from pipeline.stages import features as features_module
from pipeline.stages.features import reference_features, run
from pipeline.stages.prepare import run as prepare

from ..conftest import TINY_BACKBONE, original_pixels

TINY = BackboneParams(**TINY_BACKBONE)


@pytest.fixture
def prepared(image_folder, tmp_path):
    out = tmp_path / "prepared"
    prepare(PrepareParams(source="folder", path=str(image_folder)), out)
    return out


def test_onnxruntime_features_match_pytorch_reference(prepared, tmp_path):
    metrics = run(TINY, FeaturesParams(batch_size=5), prepared, tmp_path / "f",
                  tmp_path / "m.json")
    cache = load_cache(tmp_path / "f")
    assert cache.features.shape == (24, 256) and cache.features.dtype == np.float32
    assert isinstance(cache.features, np.memmap)
    # full PyTorch reference over every image, in manifest order
    summary, classes, rows = read_prepared(prepared)
    backbone = build_backbone(TINY)
    # reference from the ORIGINAL files: the copies that features read must give the same
    originals = np.stack([original_pixels(image_root(prepared, summary) / r["path"],
                                          backbone.preprocessing) for r in rows])
    reference = np.concatenate([reference_features(backbone.model, originals[s:s + 7])
                                for s in range(0, len(rows), 7)])
    assert np.abs(np.asarray(cache.features) - reference).max() <= 1e-4
    assert metrics["max_abs_diff_vs_torch_first_batch"] <= 1e-4
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 24
    assert cache.labels.tolist() == [classes.index(r["label"]) for r in rows]
    assert cache.meta["backbone"]["feature_dim"] == 256
    assert cache.meta["split_counts"] == {"train": 18, "val": 3, "test": 3}


def test_rerun_is_byte_identical_and_torch_engine_agrees(prepared, tmp_path):
    run(TINY, FeaturesParams(batch_size=4, threads=1), prepared, tmp_path / "a")
    run(TINY, FeaturesParams(batch_size=4, threads=1), prepared, tmp_path / "b")
    for name in ("features.npy", "labels.npy", "splits.npy", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    run(TINY, FeaturesParams(engine="torch", batch_size=4, threads=1), prepared, tmp_path / "t")
    diff = np.abs(np.load(tmp_path / "a" / "features.npy") - np.load(tmp_path / "t" / "features.npy"))
    assert diff.max() <= 1e-4


def test_interrupted_run_leaves_previous_cache(prepared, tmp_path, monkeypatch):
    out = tmp_path / "f"
    run(TINY, FeaturesParams(batch_size=4), prepared, out)
    before = (out / "features.npy").read_bytes()
    real = features_module.make_extractor

    def failing_extractor(*args, **kwargs):
        extract, provider = real(*args, **kwargs)
        calls = {"n": 0}

        def flaky(batch):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return extract(batch)

        return flaky, provider

    monkeypatch.setattr(features_module, "make_extractor", failing_extractor)
    with pytest.raises(KeyboardInterrupt):
        run(TINY, FeaturesParams(batch_size=4), prepared, out)
    assert (out / "features.npy").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".f.")] == []


def test_verification_catches_a_wrong_engine(prepared, tmp_path, monkeypatch):
    real = features_module.make_extractor

    def off_by_a_bit(*args, **kwargs):
        extract, provider = real(*args, **kwargs)
        return (lambda batch: extract(batch) * 1.001 + 1e-3), provider

    monkeypatch.setattr(features_module, "make_extractor", off_by_a_bit)
    with pytest.raises(PipelineError, match=r"features \(onnxruntime:CPUExecutionProvider\) differ from the PyTorch CPU reference"):
        run(TINY, FeaturesParams(), prepared, tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_missing_prepare_output_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="run `pipeline prepare`"):
        run(TINY, FeaturesParams(), tmp_path / "nothing", tmp_path / "f")


def test_features_read_the_copies_never_the_originals(prepared, image_folder, tmp_path):
    """Originals deleted or corrupted after prepare change nothing: the copies are read."""
    run(TINY, FeaturesParams(batch_size=5), prepared, tmp_path / "before")
    for path in image_folder.rglob("*.png"):
        path.write_text("corrupted later")
    run(TINY, FeaturesParams(batch_size=5), prepared, tmp_path / "after")
    assert (tmp_path / "before" / "features.npy").read_bytes() == \
        (tmp_path / "after" / "features.npy").read_bytes()


def test_a_changed_or_missing_copy_is_named(prepared, tmp_path):
    from pipeline.core.copies import COPIES_FILE, INDEX_FILE

    _, _, rows = read_prepared(prepared)
    index = (prepared / INDEX_FILE).read_text().splitlines()
    key, offset = index[3].split(",")[:2]  # the third copy in the store
    store = bytearray((prepared / COPIES_FILE).read_bytes())
    store[int(offset) + 5] ^= 0xFF
    (prepared / COPIES_FILE).write_bytes(bytes(store))
    with pytest.raises(PipelineError, match=f"copy of {key} is missing or changed since "
                       "prepare.*re-run `pipeline prepare`"):
        run(TINY, FeaturesParams(), prepared, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    (prepared / COPIES_FILE).write_bytes(bytes(store[:int(offset)]))  # truncated store
    with pytest.raises(PipelineError, match=f"copy of {key} is missing"):
        run(TINY, FeaturesParams(), prepared, tmp_path / "f")
    (prepared / COPIES_FILE).unlink()
    with pytest.raises(PipelineError, match="pixels.bin not found.*re-run `pipeline prepare`"):
        run(TINY, FeaturesParams(), prepared, tmp_path / "f")


def test_worker_processes_give_the_same_cache(prepared, tmp_path):
    run(TINY, FeaturesParams(batch_size=4, threads=1), prepared, tmp_path / "a")
    run(TINY, FeaturesParams(batch_size=4, threads=1, workers=2), prepared, tmp_path / "w")
    assert (tmp_path / "a" / "features.npy").read_bytes() == \
        (tmp_path / "w" / "features.npy").read_bytes()


def test_sigkill_midway_leaves_previous_cache_untouched(prepared, tmp_path):
    """A real `kill -9` while the cache is being written: the final folder is never half-done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "f"
    run(TINY, FeaturesParams(batch_size=4), prepared, out)
    before = (out / "features.npy").read_bytes()
    marker = tmp_path / "started"
    code = f"""
import time
from pipeline.stages import features as f
from pipeline.core.config import BackboneParams
real = f.make_extractor
def slow(*a, **k):
    extract, provider = real(*a, **k)
    def run(batch):
        open({str(marker)!r}, "w").close()
        time.sleep(0.5)
        return extract(batch)
    return run, provider
f.make_extractor = slow
f.run(BackboneParams(name="timm:test_efficientnet", weights="none"),
      f.FeaturesParams(batch_size=2), {str(prepared)!r}, {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)  # some batches written into the temporary memory map
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "features.npy").read_bytes() == before
    assert load_cache(out).features.shape == (24, 256)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".f.")]  # the killed temp
    run(TINY, FeaturesParams(batch_size=4), prepared, out)  # a re-run works and sweeps it
    assert (out / "features.npy").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".f.")] == []


def test_cuda_sessions_ask_for_strict_fp32(tmp_path, monkeypatch):
    """onnxruntime's CUDA provider defaults to TF32 (features ~1e-2 off the CPU's on an H100):
    the features session asks for strict FP32. Checked on the options, so it runs anywhere."""
    import onnxruntime as ort

    from pipeline.onnx import sessions as onnx_utils

    seen = {}

    class FakeSession:
        def __init__(self, path, options, providers):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(onnx_utils, "preload_gpu_libraries", lambda: None)
    onnx_utils.ort_session(tmp_path / "m.onnx", 1, "cuda")
    assert seen["providers"] == [("CUDAExecutionProvider", {"use_tf32": "0"}),
                                 "CPUExecutionProvider"]


def test_cuda_tf32_switch_is_restored():
    import torch

    from pipeline.core.runtime import cuda_tf32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with cuda_tf32(False):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with cuda_tf32(True):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_gpu_features_match_the_cpu_cache(prepared, tmp_path, engine):
    cpu = run(TINY, FeaturesParams(batch_size=4, threads=1), prepared, tmp_path / "cpu")
    gpu = run(TINY, FeaturesParams(engine=engine, device="cuda", batch_size=4), prepared,
              tmp_path / "gpu")
    assert gpu["provider"] in ("onnxruntime:CUDAExecutionProvider", "torch:cuda")
    assert gpu["max_abs_diff_vs_torch_first_batch"] <= 1e-4
    diff = np.abs(np.load(tmp_path / "cpu" / "features.npy") -
                  np.load(tmp_path / "gpu" / "features.npy"))
    assert diff.max() <= 1e-4 and cpu["images"] == gpu["images"]


def test_one_tolerance_rule_for_every_first_batch_check():
    """Absolute up to outputs of magnitude 1, relative to the largest output above it; the
    limit itself passes. Features and the cut cache use this one function."""
    import numpy as np

    from pipeline.onnx.convert import check_first_batch

    small, large = np.full(3, 0.5), np.full(3, 50.0)
    assert check_first_batch(small + 1e-4, small, 1e-4, "x", "fix") == pytest.approx(1e-4)
    with pytest.raises(PipelineError, match=r"^x differ from the PyTorch CPU reference by "
                       r"0\.0002 \(limit 0\.0001 x max\(1, max \|reference\|\)\); fix$"):
        check_first_batch(small + 2e-4, small, 1e-4, "x", "fix")
    assert check_first_batch(large + 4e-3, large, 1e-4, "x", "fix") == pytest.approx(4e-3)
    with pytest.raises(PipelineError):
        check_first_batch(large + 6e-3, large, 1e-4, "x", "fix")
    with pytest.raises(PipelineError):  # NaN never passes
        check_first_batch(small * np.nan, small, 1e-4, "x", "fix")
