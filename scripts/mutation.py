"""Mutation score of the modules where a silent bug costs users most, measured with cosmic-ray.

One table (``MODULES``) names each module, the functions of it in scope, the tests that may kill
its mutants and a per-mutant timeout; it drives the sessions and the report. Every mutant runs
its module's tests in a fresh ``pytest`` process (no forked workers: forks of a process holding
torch and onnxruntime hung under mutmut 3). Each lane works in its own clone of HEAD, so the
working tree is never mutated, even by a killed run. The tests' session fixtures are built once
from unmutated code and reused (``PIPELINE_TEST_FIXTURE_CACHE``): a mutant in code that only a
fixture runs must be killed by a direct test.

A systematic sample keeps the run to about an hour on 2 cores: the in-scope mutants of a module,
sorted by position and operator, every k-th one, at most ``--sample`` per module. Mutants of
function signature annotations are left out (never evaluated here: equivalent by construction).

The sessions are kept in ``--sessions`` (default ``.mutation/``, not in git). After tests were
added, ``--rerun-survivors`` runs only the survivors of the kept sessions again, against the
current tests (a killed mutant stays killed when tests are only added); it refuses a module
whose source changed since its session was made.

Usage: .venv/bin/python scripts/mutation.py [--sample 50] [--jobs 2] [--modules params,atomic]
       [--rerun-survivors] [--sessions .mutation] [--out reports/mutation.json]
Prints the score per module and writes the JSON report (every mutant run: outcome, diff).
"""

from __future__ import annotations

import argparse
import contextlib
import ast
import hashlib
import json
import math
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COSMIC_RAY = "cosmic-ray==8.7.0"


@dataclass(frozen=True)
class Module:
    name: str
    path: str                          # module file, relative to the repository
    tests: tuple[str, ...]             # the tests that may kill its mutants, the fastest first
    timeout_s: float                   # per mutant; a run past it counts as killed (cosmic-ray)
    definitions: tuple[str, ...] = ()  # functions in scope; empty: the whole module

    @property
    def stem(self) -> str:
        """The name of its files in the sessions folder: from its path, plus its first name
        word when an earlier entry of ``MODULES`` already scopes the same file."""
        base = self.path.replace("/", "_").removesuffix(".py")
        first = next(m for m in MODULES if m.path == self.path)
        return base if first.name == self.name else f"{base}__{self.name.split()[0]}"

    def test_command(self) -> list[str]:
        return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                *self.tests]


MODULES: tuple[Module, ...] = (
    Module("params", "pipeline/core/params.py", ("tests/core/test_params.py",), 60),
    Module("imageio", "pipeline/core/imageio.py",
           ("tests/core/test_imageio.py", "tests/stages/test_prepare.py"), 90),
    Module("calibration", "pipeline/core/calibration.py",
           ("tests/core/test_calibration.py", "tests/stages/test_export.py"), 150),
    Module("atomic", "pipeline/core/atomic.py", ("tests/core/test_atomic.py",), 60),
    Module("contract", "pipeline/onnx/contract.py",
           ("tests/onnx/test_contract.py", "tests/stages/test_export.py"), 180),
    Module("runner", "pipeline/onnx/runner.py",
           ("tests/onnx/test_runner.py", "tests/tools/test_predict.py",
            "tests/onnx/test_contract.py", "tests/onnx/test_sessions.py",
            "tests/stages/test_export.py"), 240),
    Module("prepare (split, scans, image checks)", "pipeline/stages/prepare.py",
           ("tests/stages/test_prepare.py",), 90,
           ("split_class", "scan_csv", "scan_folder", "decode_candidate", "ordered_map",
            "_rejected_hint")),
    Module("export (the checks)", "pipeline/stages/export.py", ("tests/stages/test_export.py",),
           150, ("_check", "preprocessing_check", "_logits", "_run_fixed", "_exact_gate",
                 "_fp16_gate", "_int8_gate", "_engine_checks")),
    Module("bench (the accuracy rule: summary, ratios, headline, fastest)",
           "pipeline/stages/bench.py",
           ("tests/stages/test_bench.py::test_the_summary_ratios_headline_and_fastest_path_never_"
            "advertise_an_inaccurate_file",
            "tests/stages/test_bench.py::test_without_a_cpu_fp32_row_the_reference_is_pytorch_"
            "and_without_either_nothing_counts",
            "tests/stages/test_bench.py::test_cuda_options_carry_the_tf32_choice",
            "tests/stages/test_bench.py"), 240,
           ("summary_lines", "_best_cpu_path", "fastest", "ratios", "headline",
            "paired_speedup", "paired_rows", "paired_lines")),
    Module("sessions (accurate rows, provider choice)", "pipeline/onnx/sessions.py",
           ("tests/onnx/test_sessions.py",
            "tests/stages/test_bench.py::test_without_a_cpu_fp32_row_the_reference_is_pytorch_"
            "and_without_either_nothing_counts",
            "tests/stages/test_bench.py::test_the_summary_ratios_headline_and_fastest_path_never_"
            "advertise_an_inaccurate_file"), 120,
           ("reference_accuracy", "accurate_rows", "auto_provider", "resolve_providers")),
    Module("blocks", "pipeline/core/blocks.py",
           ("tests/core/test_blocks.py", "tests/stages/test_finetune.py"), 240),
    Module("transfer_scores", "pipeline/core/transfer_scores.py",
           ("tests/core/test_transfer_scores.py", "tests/tools/test_advise.py"), 120),
    Module("advise (scores, regime, candidates, apply)", "pipeline/tools/advise.py",
           ("tests/tools/test_advise.py", "-k", "not verify"), 180,
           ("candidate_names", "sample_rows", "score_layers", "place", "deep_blocks",
            "params_lines", "apply_to_params", "Copies")),
    Module("parallel", "pipeline/core/parallel.py", ("tests/tools/test_predict.py",), 90),
    Module("predict (output, resume, summary)", "pipeline/tools/predict.py",
           ("tests/tools/test_predict.py",), 120),
    Module("auto (resolution)", "pipeline/core/auto.py", ("tests/core/test_auto.py",), 60),
    Module("ood (scores, fit, metrics)", "pipeline/core/ood.py", ("tests/core/test_ood.py",), 60),
    Module("runner-engines (the engine check)", "pipeline/onnx/runner.py",
           ("tests/stages/test_export.py::test_a_file_is_refused_on_an_engine_its_export_did_"
            "not_pass", "tests/onnx/test_sessions.py", "tests/onnx/test_runner.py"), 240,
           ("_variant", "_check_engine", "_suggest")),
    Module("card (variant engines)", "pipeline/stages/card.py",
           ("tests/stages/test_export.py::test_card_engine_cells_for_reports_with_and_without_"
            "engines",
            "tests/stages/test_export.py::test_card_reads_every_figure_from_the_stage_outputs",
            "tests/stages/test_export.py"), 150,
           ("_engine_results", "_engine_cell", "_offered")),
)


def ensure_cosmic_ray() -> None:
    try:
        import cosmic_ray  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", COSMIC_RAY], check=True)


def lane_env(lane: Path, fixtures: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the clone's package first, also for the `pipeline` commands the tests start
    env["PYTHONPATH"] = str(lane)
    env["PIPELINE_TEST_FIXTURE_CACHE"] = str(fixtures)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def signature_annotations(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Spans of the annotations of function arguments and returns: with ``from __future__
    import annotations`` (every module here) they are never evaluated, so their mutants are
    equivalent. Class-level annotations stay in scope (params parsing reads dataclass hints)."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            args = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]
            for ann in [x.annotation for x in args] + [node.returns]:
                if ann is not None:
                    spans.append(((ann.lineno, ann.col_offset),
                                  (ann.end_lineno, ann.end_col_offset)))
    return spans


def sample(session: Path, module: Module, per_module: int, source: str) -> tuple[int, int]:
    """Mark every mutant outside the sample as skipped; returns (sampled, in scope)."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session)) as db:
        items = list(db.pending_work_items)

        def key(item):
            m = item.mutations[0]
            return (tuple(m.start_pos), tuple(m.end_pos), m.operator_name, m.occurrence)

        annotations = signature_annotations(source)

        def counts(item) -> bool:
            m = item.mutations[0]
            if module.definitions and m.definition_name not in module.definitions:
                return False
            return not any(a <= tuple(m.start_pos) < b for a, b in annotations)

        in_scope = sorted(filter(counts, items), key=key)
        step = max(1, math.ceil(len(in_scope) / per_module))
        keep = {i.job_id for i in in_scope[::step]}
        skipped = [i.job_id for i in items if i.job_id not in keep]
        if skipped:
            db.set_multiple_results(skipped, WorkResult(
                output="outside the sample", worker_outcome=WorkerOutcome.SKIPPED))
        return len(keep), len(in_scope)


def run_module(module: Module, lane: Path, sessions: Path, fixtures: Path, per_module: int,
               rerun_survivors: bool) -> dict:
    stem = module.stem
    config, session = sessions / f"{stem}.toml", sessions / f"{stem}.sqlite"
    source = (lane / module.path).read_text(encoding="utf-8")
    source_sha = hashlib.sha256(source.encode()).hexdigest()
    stamp = sessions / f"{stem}.source-sha256"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module.path}"\n'
        f"timeout = {module.timeout_s}\n"
        "excluded-modules = []\n"
        f'test-command = "{shlex.join(module.test_command())}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n', encoding="utf-8")
    env = lane_env(lane, fixtures)
    # the tests must pass on unmutated code, or every mutant would count as killed
    baseline = subprocess.run(module.test_command(), cwd=lane, env=env, capture_output=True,
                              text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{module.name}: its tests fail on unmutated code; fix them first:\n"
                         + baseline.stdout[-3000:])
    cosmic = [str(Path(sys.executable).parent / "cosmic-ray")]
    rerun = None
    if rerun_survivors:
        if not session.is_file() or not stamp.is_file() or stamp.read_text() != source_sha:
            raise SystemExit(f"{module.name}: no kept session for this source in {sessions}; "
                             "run without --rerun-survivors")
        with contextlib.closing(sqlite3.connect(session)) as db, db:
            rerun = db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
        n_scope = json.loads((sessions / f"{stem}.scope.json").read_text())["in_scope"]
    else:
        session.unlink(missing_ok=True)
        subprocess.run(cosmic + ["init", str(config), str(session)], cwd=lane, env=env,
                       check=True, stdout=subprocess.DEVNULL)
        n_sample, n_scope = sample(session, module, per_module, source)
        stamp.write_text(source_sha)
        (sessions / f"{stem}.scope.json").write_text(json.dumps({"in_scope": n_scope,
                                                                 "sampled": n_sample}))
    start = time.monotonic()
    subprocess.run(cosmic + ["exec", str(config), str(session)], cwd=lane, env=env, check=True)
    result = collect(session, module, n_scope, time.monotonic() - start)
    if rerun is not None:
        result["rerun_of_survivors"] = {"ran": rerun,
                                        "killed_now": rerun - result["survived"]}
    return result


def collect(session: Path, module: Module, n_scope: int, seconds: float) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db

    mutants = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == "skipped":
                continue
            m = item.mutations[0]
            if result.worker_outcome != "normal":
                outcome = f"not run ({result.worker_outcome})"
            elif result.output == "timeout":
                outcome = "timeout"
            else:
                outcome = result.test_outcome.value
            mutants.append({"line": m.start_pos[0], "function": m.definition_name,
                            "operator": m.operator_name, "occurrence": m.occurrence,
                            "outcome": outcome, "diff": result.diff})
    ran = [m for m in mutants if not m["outcome"].startswith("not run")]
    killed = sum(m["outcome"] in ("killed", "timeout") for m in ran)
    mutants.sort(key=lambda m: (m["line"], m["operator"], m["occurrence"]))
    return {"module": module.name, "path": module.path, "tests": list(module.tests),
            "functions": list(module.definitions) or "all", "mutants_in_scope": n_scope,
            "sampled": len(mutants), "ran": len(ran), "killed": killed,
            "timeouts": sum(m["outcome"] == "timeout" for m in ran),
            "survived": sum(m["outcome"] == "survived" for m in ran),
            "score": round(killed / len(ran), 4) if ran else None,
            "seconds": round(seconds, 1), "mutants": mutants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=50, help="mutants per module, at most")
    parser.add_argument("--jobs", type=int, default=2, help="lanes (clones) run side by side")
    parser.add_argument("--modules", default="", help="comma-separated names (first word)")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run only the survivors of the kept sessions again")
    parser.add_argument("--sessions", default=".mutation", help="where the sessions are kept")
    parser.add_argument("--out", default="reports/mutation.json")
    args = parser.parse_args()
    wanted = {w.strip() for w in args.modules.split(",") if w.strip()}
    modules = [m for m in MODULES if not wanted or m.name.split()[0] in wanted]
    if not modules:
        sys.exit(f"--modules: none of {sorted(wanted)} is in {[m.name.split()[0] for m in MODULES]}")
    ensure_cosmic_ray()
    work = Path(tempfile.mkdtemp(prefix="pipeline-mutation-"))
    fixtures = work / "fixtures"
    sessions = (REPO / args.sessions).resolve()
    sessions.mkdir(parents=True, exist_ok=True)
    lanes = []
    for j in range(max(1, min(args.jobs, len(modules)))):
        lane = work / f"lane{j}"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(lane)], check=True)
        lanes.append(lane)
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=lanes[0],
                                   text=True).strip()
    print(f"mutation run of HEAD {head} in {work}; sessions in {sessions}", flush=True)
    # the session fixtures, built once from unmutated code
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/stages/test_export.py", "-k", "checks_pass"], cwd=lanes[0],
                   env=lane_env(lanes[0], fixtures), check=True, stdout=subprocess.DEVNULL)
    queue = sorted(modules, key=lambda m: -m.timeout_s)  # the slowest first: lanes end together
    lock = threading.Lock()

    def worker(lane: Path) -> None:
        while True:
            with lock:
                if not queue:
                    return
                module = queue.pop(0)
            result = run_module(module, lane, sessions, fixtures, args.sample,
                                args.rerun_survivors) | {"head": head}
            stem = module.stem
            history = sessions / f"{stem}.runs.json"
            runs = json.loads(history.read_text()) if history.is_file() else []
            runs = ([] if not args.rerun_survivors else runs) + [
                {k: v for k, v in result.items() if k != "mutants"}]
            (sessions / f"{stem}.result.json").write_text(json.dumps(result, indent=1))
            history.write_text(json.dumps(runs, indent=1))
            with lock:
                print(f"{module.name}: {result['killed']}/{result['ran']} killed "
                      f"({result['seconds']:.0f} s)", flush=True)

    threads = [threading.Thread(target=worker, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shutil.rmtree(work, ignore_errors=True)
    write_report(sessions, REPO / args.out, args.sample)


def write_report(sessions: Path, out: Path, per_module: int) -> None:
    """The score per module from every kept session (this run's and earlier ones)."""
    ordered = []
    for module in MODULES:
        stem = module.stem
        if (sessions / f"{stem}.result.json").is_file():
            result = json.loads((sessions / f"{stem}.result.json").read_text())
            result["runs"] = json.loads((sessions / f"{stem}.runs.json").read_text())
            ordered.append(result)
    total_ran = sum(r["ran"] for r in ordered)
    total_killed = sum(r["killed"] for r in ordered)
    report = {"tool": COSMIC_RAY, "sample_per_module": per_module,
              "cpu": cpu_name(), "killed": total_killed, "ran": total_ran,
              "score": round(total_killed / total_ran, 4) if total_ran else None,
              "modules": ordered}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"\n{'module':40s} {'in scope':>8s} {'ran':>5s} {'killed':>6s} {'score':>6s}")
    for r in ordered:
        print(f"{r['module']:40s} {r['mutants_in_scope']:8d} {r['ran']:5d} {r['killed']:6d} "
              f"{(r['score'] or 0) * 100:5.1f}%")
    print(f"{'all':40s} {'':8s} {total_ran:5d} {total_killed:6d} "
          f"{(report['score'] or 0) * 100:5.1f}%\nwrote {out}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"unknown ({os.cpu_count()} CPUs)"


if __name__ == "__main__":
    main()
