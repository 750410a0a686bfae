#!/usr/bin/env bash
# One device call that re-measures the engine after a change (issue 13): the CUDA engine tests (compiled
# forwards must have no graph breaks), an in-engine step trace under the 256 x 2K load, the serving sweep at
# 256 concurrent requests and the decode-step roofline. Each part has its own time limit and writes under
# OUT (default $OUT, the device tool's output folder), so a part that runs long costs only itself.
#
#   bash benchmarks/device_engine.sh            # about 9 minutes on one H100
#   VARIANTS=gqa-4,mla bash benchmarks/device_engine.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results/device}
VARIANTS=${VARIANTS:-gqa-4,mla,gta-4,gla-2}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py -k "compiled or features" \
    > "$OUT/tests_gpu.txt" 2>&1
tail -2 "$OUT/tests_gpu.txt"

TORCH_LOGS=graph_breaks timeout 100 python3 -m benchmarks.engine_step_trace --variant gqa-4 --trace-steps 30 \
    --max-steps 40 --out "$OUT" > "$OUT/trace_log.txt" 2>&1
echo "graph breaks in the engine trace: $(grep -c 'Graph break' "$OUT/trace_log.txt")"
grep "^step" "$OUT/trace_log.txt" | tail -5

timeout 240 python3 -m benchmarks.bench_serve --variants "$VARIANTS" --concurrency 256 --time-budget 230 \
    --out "$OUT" > "$OUT/serve_log.txt" 2>&1
grep -h "^|" "$OUT"/*serve*.md | cut -c1-200

timeout 100 python3 -m benchmarks.engine_roofline --variants "$VARIANTS" --batch 64,256 --compile on \
    --out "$OUT" > "$OUT/roofline_log.txt" 2>&1
grep -h "^|" "$OUT"/engine_roofline*.md | head -12
