"""FP8 vs bf16 KV cache decode (issue 15): the same shapes, both cache formats, in one run on one GPU.

Shapes: the issue's memory-bound ones (GQA-8 h_q=32, GLA-8 h_q=128, MLA h_q=16; B=64, L=8192) at
page 64 and 16, plus MLA h_q=128 (compute-bound, for reference). Each row: our kernel on a bf16
cache and on kvslim's fp8 row (``kvslim.rows``) of the same values, checked against the fp32 oracle
on the dequantized rows, timed as CUDA-graph replays with an L2 flush (``benchmarks.timing``);
TB/s counts each format's own bytes; copy bandwidth and bf16 GEMM peak are measured in the run.

Usage (GPU):  python -m benchmarks.bench_fp8 [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from benchmarks.decode_problem import Problem, check, measure_ceilings, row, spec_for
from benchmarks.timing import bench_graph

SHAPES = [("gqa-8", 32, 64, 8192, 1, 64), ("gqa-8", 32, 64, 8192, 1, 16), ("gla-8", 128, 64, 8192, 1, 64),
          ("gla-8", 128, 64, 8192, 1, 16), ("mla", 16, 64, 8192, 1, 64), ("mla", 16, 64, 8192, 1, 16),
          ("mla", 128, 64, 8192, 1, 64)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    copy_bw, gemm = measure_ceilings()
    print(f"copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for name, h_q, B, L, q_len, page in SHAPES:
        pair = {}
        for kv in ("bf16", "fp8"):
            p = Problem(spec_for(name, h_q), B, L, q_len, page, kv_dtype=kv)
            fn = p.ours()
            o, _ = fn()
            ok = check(p, o)
            r = row("kvslim", p, bench_graph(fn), copy_bw, gemm, f"err {ok}")
            r["kv_dtype"], r["row_bytes"] = kv, p.fmt.row_bytes
            pair[kv] = r
            del p, fn, o
            torch.cuda.empty_cache()
        pair["fp8"]["speedup"] = round(pair["bf16"]["us"] / pair["fp8"]["us"], 3)
        pair["fp8"]["byte_ratio"] = round(pair["bf16"]["row_bytes"] / pair["fp8"]["row_bytes"], 3)
        for r in pair.values():
            print(json.dumps(r), flush=True)
            rows.append(r)
    meta = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "copy_TBps": round(copy_bw / 1e12, 3), "gemm_TFLOPs": round(gemm / 1e12, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# FP8 vs bf16 KV cache: decode kernel time (issue 15)", "",
             f"{meta['date']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}; copy "
             f"{meta['copy_TBps']} TB/s and bf16 GEMM {meta['gemm_TFLOPs']} TFLOP/s measured in the same run; "
             "CUDA-graph replays with L2 flush; `python -m benchmarks.bench_fp8`.", "",
             "| shape | page | bf16 µs | fp8 µs | speed-up | bytes ratio | fp8 TB/s | fp8 % copy | check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b16, f8 in zip(rows[::2], rows[1::2]):
        lines.append(f"| {b16['variant']} h_q={b16['h_q']} B={b16['B']} L={b16['L']} | {b16['page']} | {b16['us']} | "
                     f"{f8['us']} | {f8['speedup']}x | {f8['byte_ratio']}x | {f8['TBps']} | {f8['pct_copy']} | "
                     f"{f8['note']} |")
    (out / "fp8_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
