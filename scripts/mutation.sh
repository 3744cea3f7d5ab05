#!/usr/bin/env bash
# Mutation score of the modules where a silent bug costs users most (params parsing, image
# validation, the model contract and runner, the export checks, calibration, the split, the
# atomic writes): mutmut 3 (config in pyproject.toml [tool.mutmut]) mutates them, runs the
# tests that cover each mutant, and scripts/mutation_report.py prints the score per module and
# writes reports/mutation.json. Not run in CI (hours on 2 cores; see docs/development.md).
# Usage: bash scripts/mutation.sh [mutant-name globs, e.g. 'pipeline.core.params.*'; default:
# the functions listed in scripts/mutation_targets.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
# the tests' session fixtures are built once (unmutated) and reused by every mutant run: a
# mutant in code that only the fixture build runs must then be killed by a direct test
export PIPELINE_TEST_FIXTURE_CACHE="$PWD/mutants-fixtures"
# mutmut forks a worker per mutant from a process that has torch and onnxruntime loaded; one
# thread per library made those forks hang less often (they still do: see docs/development.md)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
rm -rf "$PIPELINE_TEST_FIXTURE_CACHE"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/stages/test_export.py -k "checks_pass" >/dev/null
mkdir -p mutants/data/images  # mutmut copies also_copy files, not their folders
if [ "$#" -eq 0 ]; then mapfile -t targets < scripts/mutation_targets.txt; set -- "${targets[@]}"; fi
.venv/bin/mutmut run "$@" || true
.venv/bin/mutmut results --all true > mutants/results.txt
.venv/bin/python scripts/mutation_report.py mutants/results.txt reports/mutation.json
