"""Launch decode kernels a fixed number of times for Nsight Compute (issues 14, 15).

Each case (variant, h_q, B, L, page, kv dtype) builds a :class:`benchmarks.decode_problem.Problem`
and launches our kernel ``--warmup`` times (compiles; profile with ``--launch-skip``) and then once
more. Run under ``ncu`` to compare, e.g., the bf16 and fp8 rows of one shape::

    ncu --clock-control none -k regex:_kernel --launch-skip 1 --launch-count 1 ... \\
        python3 -m benchmarks.ncu_decode --cases mla:16:64:8192:64:bf16

Without ncu it prints each case's time per launch (CUDA events, no L2 flush; for a quick look only,
``bench_fp8.py`` is the measurement of record).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.decode_problem import Problem, spec_for


def parse_case(text: str) -> tuple:
    """``variant:h_q:B:L:page:kv`` -> a tuple (``kv`` is bf16 or fp8)."""
    parts = text.split(":")
    if len(parts) != 6:
        raise SystemExit(f"--cases: expected variant:h_q:B:L:page:kv, got {text!r}")
    name, *nums, kv = parts
    try:
        h_q, B, L, page = (int(x) for x in nums)
    except ValueError:
        raise SystemExit(f"--cases: h_q, B, L and page must be integers, got {text!r}") from None
    if kv not in ("bf16", "fp8"):
        raise SystemExit(f"--cases: kv must be bf16 or fp8, got {kv!r} in {text!r}")
    return name, h_q, B, L, page, kv


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", required=True, help="comma-separated variant:h_q:B:L:page:kv")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--config", default="", help="kernel config overrides as k=v,k=v (ints), for every case")
    args = ap.parse_args(argv)
    config = {k: int(v) for k, v in (kv.split("=") for kv in args.config.split(",") if kv)} or None
    for text in args.cases.split(","):
        name, h_q, B, L, page, kv = parse_case(text)
        p = Problem(spec_for(name, h_q), B, L, 1, page, kv_dtype=kv)
        fn = p.ours(config=config)
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3
        print(f"{text}: {us:.1f} us, {p.bytes / us / 1e6:.3f} TB/s (this format's bytes)", flush=True)


if __name__ == "__main__":
    main()
