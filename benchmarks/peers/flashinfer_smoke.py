"""FlashInfer smoke test: load the carry, JIT-build and run each FlashInfer kernel once at a small shape.

    python -m benchmarks.peers.flashinfer_smoke [--variants flashinfer-decode,flashinfer-mla-fa2,...]

Prints the environment FlashInfer's JIT sees (nvcc, ninja, arch, cache dir), then for each
variant the plan + build time, the first-run time and the relative error vs kvslim's fp32
torch oracle. Shapes: GQA-8 h_q=32 d=128 (B=4, L=1000, page 16; q_len 1 and 2) and MLA
h_q=16 / 128 (B=4, L=1000, page 64; q_len 1 and 2). Exit status 1 if a variant failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import torch

from benchmarks.decode_problem import Problem, check, spec_for
from benchmarks.peers import flashinfer_peer as F

SHAPES = [
    # (variant, h_q, B, L, q_len, page)
    ("gqa-8", 32, 4, 1000, 1, 16),
    ("gqa-8", 32, 4, 1000, 2, 16),
    ("mla", 16, 4, 1000, 1, 64),
    ("mla", 128, 4, 1000, 1, 64),
    ("mla", 16, 4, 1000, 2, 64),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=None, help="comma list of variant names (default: all that apply)")
    args = ap.parse_args()
    only = set(args.variants.split(",")) if args.variants else None
    if not torch.cuda.is_available():
        raise SystemExit("flashinfer_smoke.py needs a CUDA GPU")
    t0 = time.time()
    try:
        F.load_flashinfer()
    except Exception as e:
        print(f"flashinfer: could not run: {F.reason(e)}", flush=True)
        raise SystemExit(1) from e
    print(f"# {F.describe()} (load {time.time() - t0:.1f} s)", flush=True)
    nvcc = os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc")
    try:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"# nvcc: {v[-1] if v else '?'}", flush=True)
    except Exception as e:
        print(f"# nvcc: {F.reason(e)}", flush=True)
    failed = 0
    for name, h_q, B, L, q_len, page in SHAPES:
        p = Problem(spec_for(name, h_q), B, L, q_len, page)
        for vname, build in F.variants(p):
            if only and vname not in only:
                continue
            tag = f"{vname} {name} h_q={h_q} B={B} L={L} q_len={q_len} page={page}"
            try:
                t1 = time.time()
                fn, to_bqhd = build()
                t_plan = time.time() - t1
                torch.cuda.synchronize()
                t2 = time.time()
                o = fn()
                torch.cuda.synchronize()
                t_run = time.time() - t2
                err = check(p, to_bqhd(o))
                print(
                    f"OK   {tag}: plan+build {t_plan:.1f} s, first run {t_run * 1e3:.1f} ms, err {err}",
                    flush=True,
                )
                failed += "FAIL" in err
            except Exception as e:
                failed += 1
                print(f"FAIL {tag}: could not run: {F.reason(e)}", flush=True)
        del p
    print(f"# total {time.time() - t0:.1f} s, {failed} failed", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
