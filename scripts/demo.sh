#!/usr/bin/env bash
# The main demo on a fresh machine: set up .venv, then plan -> convert -> evaluate -> generate
# on SmolLM2-135M with held-out State of the Union text (see kvslim/demo.py; args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${KVSLIM_VENV:-.venv}/bin/python" -m kvslim.demo "$@"
