#!/usr/bin/env bash
# One device call that re-measures the engine after a change (issue 13): the CUDA engine tests (compiled
# forwards must have no graph breaks), an in-engine step trace under the 256 x 2K load, the serving sweep at
# 256 concurrent requests and the decode-step roofline. Each part has its own time limit and writes under
# OUT (default $OUT, the device tool's output folder), so a part that runs long costs only itself.
#
#   bash benchmarks/device_engine.sh            # about 9 minutes on one H100
#   VARIANTS=gqa-4,mla bash benchmarks/device_engine.sh
#   SERVE_VARIANTS=gqa-4,mla SWEEP=mla bash benchmarks/device_engine.sh   # serve two variants, then the fp8
#                                                 # config sweep (bench_fp8 --sweep --only mla) in the time saved
# Time limits per part (seconds): T_TESTS, T_TRACE, T_SERVE, T_ROOF, T_SWEEP. PARTS picks parts
# (default tests,trace,serve,roof; the sweep runs when SWEEP is set). On an H100 (2026-12-07) the GPU tests
# needed more than 110 s and the trace wrote nothing in 80 s (compiling the 1b model takes ~50 s), so:
#   PARTS=trace,roof T_TRACE=200 bash benchmarks/device_engine.sh
# engine_roofline builds (compiles + captures) each variant in 42-69 s there: T_ROOF=300 for all four. It measures
# each variant at the engine's own page size (--page-size auto: 64 for MLA/GLA, 16 for GQA/GTA; the leases up to
# 2026-12-07 used 16 for all).
# PARTS=prefill (not in the default) times a 4 x 2048 prefill step eager, compiled per layer (the engine's
# default) and compiled whole (benchmarks/prefill_step.py --compile all), with each one's build time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results/device}
VARIANTS=${VARIANTS:-gqa-4,mla,gta-4,gla-2}
SERVE_VARIANTS=${SERVE_VARIANTS:-$VARIANTS}
T_TESTS=${T_TESTS:-150} T_TRACE=${T_TRACE:-100} T_SERVE=${T_SERVE:-240} T_ROOF=${T_ROOF:-100} T_SWEEP=${T_SWEEP:-150}
T_PREFILL=${T_PREFILL:-240} PREFILL_VARIANTS=${PREFILL_VARIANTS:-mla,gqa-4}
SWEEP=${SWEEP:-}
PARTS=${PARTS:-tests,trace,serve,roof}
want() { [[ ",$PARTS," == *",$1,"* ]]; }
for p in ${PARTS//,/ }; do
  case "$p" in tests|trace|serve|roof|prefill) ;;
    *) echo "PARTS: unknown part '$p' (tests, trace, serve, roof, prefill)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"

want tests && timeout "$T_TESTS" python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py -k "compiled or features or lone" \
    > "$OUT/tests_gpu.txt" 2>&1
want tests && tail -2 "$OUT/tests_gpu.txt"

if want trace; then
TORCH_LOGS=graph_breaks timeout "$T_TRACE" python3 -m benchmarks.engine_step_trace --variant gqa-4 --trace-steps 30 \
    --max-steps 40 --out "$OUT" > "$OUT/trace_log.txt" 2>&1
echo "graph breaks in the engine trace: $(grep -c 'Graph break' "$OUT/trace_log.txt")"
grep "^step" "$OUT/trace_log.txt" | tail -5
grep -q "^step" "$OUT/trace_log.txt" || echo "the trace printed no step (timed out?): its graph-break count means nothing"
fi

want serve && timeout "$T_SERVE" python3 -m benchmarks.bench_serve --variants "$SERVE_VARIANTS" --concurrency 256 \
    --time-budget $((T_SERVE - 10)) \
    --out "$OUT" > "$OUT/serve_log.txt" 2>&1
want serve && grep -h "model built\|engine built\|engine setup\|graphs:\|recompile_limit\|FAILED\|exactness" \
    "$OUT/serve_log.txt" | cut -c1-200
want serve && grep -h "^|" "$OUT"/*serve*.md | cut -c1-200

want roof && timeout "$T_ROOF" python3 -m benchmarks.engine_roofline --variants "$VARIANTS" --batch 64,256 --compile on \
    --out "$OUT" > "$OUT/roofline_log.txt" 2>&1
want roof && grep -h "^|" "$OUT"/engine_roofline*.md | head -12

want prefill && timeout "$T_PREFILL" python3 -m benchmarks.prefill_step --variants "$PREFILL_VARIANTS" --compile all \
    --out "$OUT" > "$OUT/prefill_log.txt" 2>&1
want prefill && grep -v "^ \|Warning\|warn" "$OUT/prefill_log.txt" | tail -14

if [ -n "$SWEEP" ]; then
  timeout "$T_SWEEP" python3 -m benchmarks.bench_fp8 --sweep --only "$SWEEP" --jobs 12 --out "$OUT" \
      > "$OUT/sweep_log.txt" 2>&1
  grep -h "^|\|^##" "$OUT"/fp8_sweep_*.md
fi
