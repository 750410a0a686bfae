#!/usr/bin/env bash
# Create .venv (or $KVSLIM_VENV) with CPU torch 2.13.0, triton and kvslim (editable) + test/HF extras.
# Idempotent: re-running only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSLIM_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.kvslim-installed"
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU), triton and kvslim into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # KVSLIM_TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU wheel where PyPI's default is CUDA.
  if [ -n "${KVSLIM_TORCH_INDEX:-}" ]; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" --index-url "$KVSLIM_TORCH_INDEX"
  else
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q triton -e ".[hf,test]"
  echo "$want" > "$stamp"
fi
