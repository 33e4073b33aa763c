#!/usr/bin/env bash
# Issue 30's device bench in one command: decode, memory forward and reference encoding, each
# figure beside its bound measured in the same run (bench/gpu.py says which). Under 8 minutes on
# an H200; `--device cpu` is the dry run the test suite makes (tiny preset, seconds).
#
#   bench/gpu.sh --device cuda --out bench/results/gpu.json
#   bench/gpu.sh --device cpu --out /tmp/gpu-cpu.json
#
# Python: $PYTHON, else the project's .venv (CPU torch), else python3 on PATH (a device image's
# CUDA torch: the venv is not carried to a device machine). Needs torch only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch' 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
# 9 minutes hard stop: the bench keeps itself within its budget and writes its JSON after every
# section, so even a stop here leaves what was measured
exec timeout 540 "$PY" bench/gpu.py "$@"
