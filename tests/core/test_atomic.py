"""Atomic writes: the final name appears only complete, failures keep what was there, killed
writers' temporaries are cleaned, live ones are not."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from pipeline.core import atomic


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_file_replaces_only_on_success_and_keeps_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic.write_text(target, "first")
    assert target.read_text() == "first"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "first"
    assert leftovers(target.parent) == []


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic.atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert leftovers(tmp_path) == []


def test_json_and_csv_writers_write_what_they_are_given(tmp_path):
    atomic.write_json(tmp_path / "x.json", {"b": [1, 2], "a": "é"})
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"b": [1, 2],
                                                                              "a": "é"}
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == \
        '{\n  "b": [\n    1,\n    2\n  ],\n  "a": "\\u00e9"\n}\n'
    atomic.write_csv(tmp_path / "x.csv", ("path", "n"), [("a,b", 1), ("c", 2)])
    with open(tmp_path / "x.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["path", "n"], ["a,b", "1"], ["c", "2"]]


def test_a_sigkilled_writer_leaves_the_old_file_and_its_temp_is_cleaned_next_time(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    code = ("import os, signal, sys; from pipeline.core.atomic import atomic_file\n"
            "with atomic_file(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(target)])
    assert child.wait() == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert [p.name.split(".")[3] for p in stale] == [str(child.pid)]
    assert stale[0].read_bytes() == b"half"
    # the dead writer's temporary goes at the next write; a live process's temporary stays
    # every signal back to its default action (a parent started under nohup passes SIGHUP on
    # ignored), so a probe that sends a real signal ends the sleeper and fails the test
    sleeper = subprocess.Popen([sys.executable, "-c", (
        "import signal, time\n"
        "for s in signal.valid_signals():\n"
        "    try: signal.signal(s, signal.SIG_DFL)\n"
        "    except (OSError, ValueError): pass\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert sleeper.stdout.readline() == "ready\n"
    live = tmp_path / f".model.bin.{sleeper.pid}.keep.tmp"
    live.write_bytes(b"busy")
    other = tmp_path / ".model.bin.notapid.tmp"
    other.write_bytes(b"?")
    try:
        atomic.write_text(target, "new")
        with pytest.raises(subprocess.TimeoutExpired):  # probed for life, never signalled
            sleeper.wait(timeout=0.5)
    finally:
        sleeper.kill()
        sleeper.wait()
    names = leftovers(tmp_path)
    assert stale[0].name not in names
    assert live.name in names and other.name in names
    assert target.read_text() == "new"


def test_stale_folders_of_dead_writers_are_removed_but_not_other_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".out.{dead.pid}.abc.tmp"
    stale_dir.mkdir()
    (stale_dir / "f").write_text("x")
    old = tmp_path / f".out.{dead.pid}.abc.old"
    old.mkdir()
    unrelated = tmp_path / f".out.{dead.pid}.abc.txt"
    unrelated.write_text("keep")
    mine = tmp_path / f".out.{os.getpid()}.abc.tmp"
    mine.write_text("mine")
    atomic.remove_stale_temps(tmp_path / "out")
    assert not stale_dir.exists() and not old.exists()
    assert unrelated.exists() and mine.exists()


def test_atomic_dir_gives_the_folder_the_usual_mode_and_replaces_a_dangling_link(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "out"
    target.symlink_to(tmp_path / "gone")  # a dangling link: exists() is False
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert not target.is_symlink() and (target / "a").read_text() == "1"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    assert leftovers(tmp_path) == []


def test_a_stale_temp_that_cannot_be_removed_does_not_stop_the_write(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.txt.{dead.pid}.abc.tmp"
    stale.mkdir()
    (stale / "f").write_text("x")
    real_unlink = os.unlink

    def refuse_inside_stale(path, *args, **kwargs):
        if str(stale) in str(path) or kwargs.get("dir_fd") is not None:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_inside_stale)
    atomic.write_text(tmp_path / "out.txt", "new")
    monkeypatch.undo()
    assert (tmp_path / "out.txt").read_text() == "new"


def test_a_process_of_another_user_counts_as_alive(monkeypatch):
    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", denied)
    assert atomic._pid_alive(12345) is True


def test_stale_temps_of_dead_writers_with_lower_pids_are_removed_too(tmp_path):
    """PIDs wrap around: a dead writer's PID may be below this process's."""
    dead = next(pid for pid in range(os.getpid() - 1, 1, -1) if not atomic._pid_alive(pid))
    stale = tmp_path / f".out.txt.{dead}.abc.tmp"
    stale.write_text("half")
    atomic.write_text(tmp_path / "out.txt", "new")
    assert not stale.exists()
