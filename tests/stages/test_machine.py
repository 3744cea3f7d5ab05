"""Stage machine: bench re-runs on another machine, not on this one."""

from __future__ import annotations

import json

from pipeline.core import runtime
from pipeline.core.stage_table import STAGE
from pipeline.stages import machine


def test_the_file_changes_only_when_the_machine_does(tmp_path, monkeypatch):
    out = tmp_path / "machine.json"
    first = machine.run(out)
    assert json.loads(out.read_text()) == first == runtime.machine_fingerprint()
    out.touch()  # an equal fingerprint is not written again (DVC sees the same bytes anyway)
    stamp = out.stat().st_mtime_ns
    assert machine.run(out) == first and out.stat().st_mtime_ns == stamp
    other = dict(first, cpu="Another CPU")
    monkeypatch.setattr(machine, "machine_fingerprint", lambda: other)
    machine.run(out)
    assert json.loads(out.read_text()) == other


def test_the_fingerprint_names_what_decides_speed_and_its_id_follows_it(monkeypatch):
    fp = runtime.machine_fingerprint()
    assert {"cpu", "cpu_flags_sha256", "available_cpus", "gpus", "onnxruntime", "id"} <= set(fp)
    assert fp["onnxruntime"] and len(fp["id"]) == 16
    monkeypatch.setattr(runtime, "available_cpus", lambda: 97)
    assert runtime.machine_fingerprint()["id"] != fp["id"]


def test_bench_depends_on_the_machine_and_the_machine_stage_always_runs():
    assert STAGE["machine"].always_changed
    assert str(STAGE["machine"].default("--out")) in [d.path for d in STAGE["bench"].deps]
