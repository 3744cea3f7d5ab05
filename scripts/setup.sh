#!/usr/bin/env bash
# Create .venv and install pipeline with its test extras, then prove the install works.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Warnings about missing file:// index folders from a local pip config are noise; keep the rest.
log=.venv/pip-install.log
status=0
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".[dev]" >"$log" 2>&1 || status=$?
grep -v "^WARNING: Location 'file:" "$log" || true
if [ "$status" -ne 0 ]; then
  echo "setup: pip install failed (exit $status); full log in $log" >&2
  exit 1
fi
# Fail loudly on a broken torch/torchvision pair instead of at the first stage.
.venv/bin/python - <<'PY'
import sys
import torch
from pipeline.core.backbones import import_torchvision
from pipeline.core.errors import PipelineError
try:
    tv = import_torchvision()
except PipelineError as exc:
    sys.exit(f"setup: {exc}")
import onnxruntime
print(f"setup: ok (torch {torch.__version__}, torchvision {tv.__version__}, "
      f"onnxruntime {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()})")
PY
