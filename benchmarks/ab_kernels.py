"""A/B the decode kernels of several source trees (git revisions) and configs, side by side.

Each tree is a directory holding a ``kvslim`` package (e.g. made with
``git archive REV kvslim | tar -x -C .ab/REV``); ``.`` is the working tree. Every tree runs
in its own subprocess (so each imports its own ``kvslim``) over the same shapes and random
data, and prints one JSON line per (shape, config); the driver prints a table of medians.

    python -m benchmarks.ab_kernels --trees .,.ab/707486c --shapes gla-8:128,mla:16
    python -m benchmarks.ab_kernels --trees . --shapes gta-8:32 \
        --configs 'BLOCK_N=64,num_warps=2,num_stages=2;BLOCK_N=128,num_warps=4,num_stages=3'
    python -m benchmarks.ab_kernels --trees . --kv-dtype fp8 --shapes mla:16,gla-8:128:1:16 --graph \
        --configs 'default;FP8_PATH=1,GATHER=0,BLOCK_N=32,num_warps=8;BLOCK_N=32'

Shapes are ``variant:h_q[:q_len[:page]]`` at ``--batch`` x ``--seq-len`` (d_h = 128). Times:
``triton.testing.do_bench`` median (warm L2 between calls) and, with ``--graph``, CUDA-graph
replays with a 256 MB L2 flush before each call (flush-only graph subtracted), as in
bench_decode. ``%copy`` uses a device copy measured in the same process. The trees' own
``kvslim`` is put first on ``sys.path`` in each subprocess; ``benchmarks.timing`` always
comes from this checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_config(text: str) -> dict | None:
    if not text or text == "default":
        return None
    out = {}
    for kv in text.split(","):
        k, v = kv.split("=")
        v = v.strip()
        out[k.strip()] = int(v) if v.lstrip("-").isdigit() else v
    return out


def child(args) -> None:
    """Time every (shape, config) with the kernels of the ``kvslim`` in ``args.tree``; JSON lines out."""
    import torch
    import triton

    from benchmarks.timing import bench_graph  # imports no kvslim: this checkout's, whatever the tree

    sys.path.insert(0, os.path.abspath(args.tree))
    import kvslim
    from kvslim.spec import AttentionSpec

    assert os.path.abspath(os.path.dirname(kvslim.__file__)).startswith(os.path.abspath(args.tree)), (
        kvslim.__file__
    )
    from kvslim.kernels.separate import decode_separate_triton
    from kvslim.kernels.tied import decode_tied_triton

    dt = torch.bfloat16

    def measure_copy():
        src = torch.randn(1 << 29, device="cuda", dtype=dt)
        dst = torch.empty_like(src)
        return (
            2
            * src.numel()
            * 2
            / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
        )

    copy_bw = 1.0 if args.warm_only else measure_copy()

    for shape in args.shapes.split(","):
        parts = shape.split(":")
        name, h_q = parts[0], int(parts[1])
        q_len = int(parts[2]) if len(parts) > 2 else 1
        page = int(parts[3]) if len(parts) > 3 else 64
        spec = AttentionSpec.preset(name, num_heads=h_q, head_dim=128)
        B, L = args.batch, args.seq_len
        torch.manual_seed(0)
        npages = B * (-(-L // page))
        cache = torch.randn(npages, page, spec.row_dim, device="cuda", dtype=dt).mul_(0.5)
        fmt_kw, row_bytes = {}, spec.row_dim * 2
        if args.kv_dtype == "fp8":  # the packed rows of kvslim.rows (trees from before it cannot run these)
            from kvslim.rows import quantize_rows

            fmt = spec.row_format("fp8")
            cache, fmt_kw, row_bytes = quantize_rows(cache, fmt), {"kv_format": fmt}, fmt.row_bytes
        bt = torch.randperm(npages, device="cuda").to(torch.int32).view(B, -1).contiguous()
        sl = torch.full((B,), L, dtype=torch.int32, device="cuda")
        if spec.is_tied:
            dqk = spec.nope_dim + spec.rope_dim
        else:
            dqk = spec.head_dim
        q = torch.randn(B, q_len, h_q, dqk, device="cuda", dtype=dt)
        nbytes = B * L * row_bytes
        for ctext in args.configs.split(";"):
            cfg = parse_config(ctext) or {}
            kw = dict(num_splits=cfg.pop("num_splits", args.num_splits), **fmt_kw)
            if cfg:
                kw["config"] = cfg
            if spec.is_tied:
                fn = functools.partial(
                    decode_tied_triton,
                    q,
                    cache,
                    bt,
                    sl,
                    num_state_heads=spec.num_state_heads,
                    state_dim=spec.state_dim,
                    nope_dim=spec.nope_dim,
                    rope_dim=spec.rope_dim,
                    v_dim=spec.state_dim,
                    softmax_scale=spec.softmax_scale,
                    **kw,
                )
            else:
                fn = functools.partial(
                    decode_separate_triton,
                    q,
                    cache,
                    bt,
                    sl,
                    num_kv_heads=spec.num_kv_heads,
                    head_dim=spec.head_dim,
                    softmax_scale=spec.head_dim**-0.5,
                    **kw,
                )
            if args.warm_only:
                with contextlib.suppress(Exception):  # the timed pass reports it
                    fn()
                continue
            try:
                t_db = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3
                t_g = bench_graph(fn) if args.graph else float("nan")
                err = None
            except Exception as e:  # noqa: BLE001 - one bad config must not end the sweep
                t_db = t_g = float("nan")
                err = f"{type(e).__name__}: {str(e)[:120]}"
            print(
                json.dumps(
                    dict(
                        tree=args.tree,
                        shape=shape,
                        config=ctext or "default",
                        do_bench_us=t_db * 1e6,
                        graph_us=t_g * 1e6,
                        copy_pct=100 * nbytes / t_db / copy_bw,
                        copy_tbs=copy_bw / 1e12,
                        error=err,
                    )
                ),
                flush=True,
            )
        del cache, q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default=".")
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="gla-8:128,gla-4:128,gla-2:128,mla:16,mla:128,gta-8:32,gqa-8:32")
    ap.add_argument(
        "--configs", default="default", help="';'-separated config overrides, e.g. BLOCK_N=64,num_warps=4"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="cache rows (fp8: kvslim.rows)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--num-splits", type=int, default=None)
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays with an L2 flush")
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes before timing")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    if args.tree:
        child(args)
        return
    rows = []
    # each tree's subprocess runs this module in this cwd (relative --trees stay relative to it)
    # and finds this package through the repo root on PYTHONPATH
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}

    def cmd_for(tree, shapes, configs, extra=()):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.ab_kernels",
            "--tree",
            tree,
            "--shapes",
            shapes,
            "--configs",
            configs,
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--kv-dtype",
            args.kv_dtype,
            *extra,
        ]
        if args.num_splits:
            cmd += ["--num-splits", str(args.num_splits)]
        return cmd

    # Compile every (tree, shape, config) first in parallel processes (Triton's on-disk cache
    # then serves the timed pass), so a sweep costs one compile wave, not a sum of compiles.
    warm = [
        cmd_for(t, s, c, ["--warm-only"])
        for t in args.trees.split(",")
        for s in args.shapes.split(",")
        for c in args.configs.split(";")
    ]
    running: list = []
    for c in warm:
        while len(running) >= args.jobs:
            running.pop(0).wait()
        running.append(subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    for r in running:
        r.wait()
    for tree in args.trees.split(","):
        cmd = cmd_for(tree, args.shapes, args.configs, ["--graph"] if args.graph else [])
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            print(f"tree {tree} failed:\n{p.stderr[-2000:]}", flush=True)
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\n| shape | config | {' | '.join(args.trees.split(','))} |")
    print("|---|---|" + "---|" * len(args.trees.split(",")))
    keys = sorted(
        {(r["shape"], r["config"]) for r in rows}, key=lambda k: [r["shape"] for r in rows].index(k[0])
    )
    for shape, cfg in keys:
        cells = []
        for tree in args.trees.split(","):
            r = next(
                (r for r in rows if r["tree"] == tree and r["shape"] == shape and r["config"] == cfg), None
            )
            if r is None or r["error"]:
                cells.append("-" if r is None else "err")
            else:
                g = f" / {r['graph_us']:.0f}" if r["graph_us"] == r["graph_us"] else ""
                cells.append(f"{r['do_bench_us']:.0f}{g} µs ({r['copy_pct']:.0f}%)")
        print(f"| {shape} | {cfg} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
