#!/usr/bin/env bash
# Create .venv (if missing) and install temper with its test extras.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (2.13.0) so that pip does
# not pull a multi-GB CUDA build; with a GPU, an already installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q -e ".[test]"
