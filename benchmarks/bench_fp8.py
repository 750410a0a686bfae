"""FP8 vs bf16 KV cache decode (issues 14, 15): the same shapes, both cache formats, old vs new kernel paths.

Shapes (L = 8192, q_len 1):

* the issue's memory-bound ones: GQA-8 h_q=32, GLA-8 h_q=128, MLA h_q=16 (B=64) at page 64 and 16,
  plus MLA h_q=128 (compute-bound, for reference);
* per-rank head counts (issue 14: 8 or 16 query heads per state head, as under TP=8/16): MLA with
  h_q = 8 / 16 and GLA-2 with h_q = 16 / 32, B = 64 and 128, page 64.

Configs, side by side in one process: ``new`` = the launchers' defaults (fp8 tiles converted once
where loaded, ``FP8_PATH=2``; per-row page ids, ``GATHER=0``: the per-page gather ``GATHER=1`` measured slower at page 16); ``old`` = the
kernels measured on 2026-12-02 (``FP8_PATH=1``, ``GATHER=0`` and that day's fp8 tile configs), for
the fp8 rows and, at page 16, for bf16; ``page-tile`` (bf16 GLA-8 at page 16): one page per tile,
4 stages. Each row: checked against the fp32 oracle on the dequantized rows, timed as CUDA-graph
replays with an L2 flush (``benchmarks.timing``); TB/s counts each format's own bytes; copy bandwidth
and bf16 GEMM peak are measured in the run. Every kernel is compiled first by ``--jobs`` parallel
processes (Triton's disk cache then serves the timed pass); about 2-3 minutes on one H200.

Usage (GPU):  export PYTHONPATH=$PWD; python3 benchmarks/bench_fp8.py [--out benchmarks/results]
    [--only mla,gla-8] [--jobs 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.decode_problem import Problem, check, measure_ceilings, row, spec_for
from benchmarks.timing import bench_graph

L = 8192
MAIN = [("gqa-8", 32, 64, L, 1, 64), ("gqa-8", 32, 64, L, 1, 16), ("gla-8", 128, 64, L, 1, 64),
        ("gla-8", 128, 64, L, 1, 16), ("mla", 16, 64, L, 1, 64), ("mla", 16, 64, L, 1, 16),
        ("mla", 128, 64, L, 1, 64)]
PER_RANK = [(name, h_q, B, L, 1, 64) for name, h_q in (("mla", 8), ("mla", 16), ("gla-2", 16), ("gla-2", 32))
            for B in (64, 128) if (name, h_q, B) != ("mla", 16, 64)]  # MLA h_q=16 B=64 is in MAIN
SHAPES = MAIN + PER_RANK


def old_config(p: Problem) -> dict:
    """The configuration the 2026-12-02 kernels ran with (benchmarks/results/fp8_decode.md's fp8 column)."""
    from kvslim.kernels.heuristics import next_pow2

    cfg = {"FP8_PATH": 1, "GATHER": 0}
    if p.fmt.is_fp8 and not p.tied:
        cfg["num_warps"] = 8
    if p.fmt.is_fp8 and p.tied:
        g = p.h_q // p.S
        block_m = max(16, next_pow2(min(g, 64) * p.q_len))
        if next_pow2(p.sd) >= 256 and block_m < 64:
            cfg.update(BLOCK_N=32, num_warps=8)
        elif next_pow2(p.sd) < 256:  # GTA: the bf16 warps
            cfg["num_warps"] = 2 if block_m <= 16 else (4 if block_m <= 64 else 8)
    return cfg


def configs(shape, kv: str) -> dict:
    """Named config overrides for one (shape, kv dtype): None = the launcher's defaults."""
    name, h_q, B, _, q_len, page = shape
    out = {"new": None}
    if kv == "fp8" or page < 64:
        out["old"] = "old"
    if kv == "bf16" and name == "gla-8" and page == 16:
        out["page-tile"] = {"BLOCK_N": 16, "num_stages": 4}
    return out


def cases(only):
    """Every (shape, kv dtype, config name) of the run, in table order."""
    for shape in SHAPES:
        if only and shape[0] not in only:
            continue
        for kv in ("bf16", "fp8"):
            for cname in configs(shape, kv):
                yield shape, kv, cname


SWEEP_SHAPES = [("gqa-8", 32, 64, L, 1, 64), ("gla-8", 128, 64, L, 1, 64), ("mla", 16, 64, L, 1, 64)]


def sweep_configs(shape) -> list[tuple[dict, int | None]]:
    """The fp8 config grid of ``--sweep`` for one shape: (kernel config overrides, KV splits or None)."""
    tied = shape[0] != "gqa-8"
    grid = []
    for path in (2, 0):
        for bn in ((32, 64) if tied else (32, 64, 128)):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    for splits in (None, 2, 4, 8):
                        if path == 0 and (stages != 3 or splits not in (None, 4)):
                            continue  # the per-element path: a coarse look only
                        grid.append(({"FP8_PATH": path, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages},
                                     splits))
    return grid


def sweep(only, out: Path, part: int | None = None, parts: int = 1) -> None:
    """Time every fp8 config of :func:`sweep_configs` (and the bf16 default) at the issue's page-64 shapes.

    With ``part`` given, only compiles (warm-up) every ``parts``-th case; errors are reported by the timed pass.
    """
    todo = []
    for shape in SWEEP_SHAPES:
        if only and shape[0] not in only:
            continue
        todo.append((shape, "bf16", None, None))
        todo += [(shape, "fp8", cfg, sp) for cfg, sp in sweep_configs(shape)]
    if part is not None:
        todo = todo[part::parts]
    rows, base, last, p = [], {}, None, None
    copy_bw = gemm = None
    if part is None:
        copy_bw, gemm = measure_ceilings()
    for shape, kv, cfg, splits in todo:
        if (shape, kv) != last:
            p = None
            torch.cuda.empty_cache()
            p, last = make(shape, kv), (shape, kv)
        fn = p.ours(num_splits=splits, config=cfg)
        if part is not None:
            try:
                fn()
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - the timed pass reports it
                pass
            continue
        try:
            o, _ = fn()
            r = row("kvslim", p, bench_graph(fn), copy_bw, gemm, f"err {check(p, o)}")
        except Exception as e:  # noqa: BLE001 - one failing config must not end the run
            r = row("kvslim", p, float("nan"), copy_bw, gemm, f"{type(e).__name__}: {str(e)[:60]}")
        r.update(kv_dtype=kv, config=cfg or {}, splits=splits)
        if kv == "bf16":
            base[shape] = r["us"]
        r["vs_bf16"] = round(base[shape] / r["us"], 3) if r["us"] == r["us"] else None
        print(json.dumps(r), flush=True)
        rows.append(r)
    if part is not None:
        return
    meta = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "copy_TBps": round(copy_bw / 1e12, 3), "gemm_TFLOPs": round(gemm / 1e12, 1)}
    out.mkdir(parents=True, exist_ok=True)
    tag = torch.cuda.get_device_name().replace(" ", "_")
    (out / f"fp8_sweep_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# FP8 decode config sweep (issue 15), {meta['gpu']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}; copy {meta['copy_TBps']} TB/s measured "
             "in the same run; B=64, L=8K, page 64; CUDA-graph replays with L2 flush; "
             "`python3 -m benchmarks.bench_fp8 --sweep`. vs bf16 = the bf16 default's time / this time. "
             "Fastest 5 fp8 configs per shape, then the default.", ""]
    for shape in SWEEP_SHAPES:
        rs = [r for r in rows if (r["variant"].split("+")[0], r["h_q"]) == (shape[0], shape[1])]
        if not rs:
            continue
        ok = sorted((r for r in rs if r["kv_dtype"] == "fp8" and r["us"] == r["us"]), key=lambda r: r["us"])
        lines += [f"## {shape[0]} h_q={shape[1]} (bf16 default {base.get(shape)} µs)", "",
                  "| config | splits | µs | vs bf16 | TB/s | % copy | check |", "|---|---:|---:|---:|---:|---:|---|"]
        for r in ok[:5] + [r for r in rs if r["kv_dtype"] == "fp8" and r["config"] == {} ]:
            lines.append(f"| {r['config'] or 'default'} | {r['splits'] or 'auto'} | {r['us']} | {r['vs_bf16']}x | "
                         f"{r['TBps']} | {r['pct_copy']} | {r['note']} |")
        lines.append(f"\n{len(ok)} of {sum(r['kv_dtype'] == 'fp8' for r in rs)} fp8 configs ran.\n")
    (out / f"fp8_sweep_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def make(shape, kv):
    name, h_q, B, L_, q_len, page = shape
    return Problem(spec_for(name, h_q), B, L_, q_len, page, kv_dtype=kv)


def warm(only, part: int, parts: int) -> None:
    """Compile (call once) every case whose index is ``part`` mod ``parts``; errors are reported by the timed pass."""
    todo = [c for i, c in enumerate(cases(only)) if i % parts == part]
    last = None
    for shape, kv, cname in todo:
        if (shape, kv) != last:
            p, last = make(shape, kv), (shape, kv)
        cfg = configs(shape, kv)[cname]
        try:
            p.ours(config=old_config(p) if cfg == "old" else cfg)()
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - the timed pass reports it
            pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--only", default="", help="comma-separated variants (gqa-8, gla-8, gla-2, mla)")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes before timing (0: none)")
    ap.add_argument("--warm-part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sweep", action="store_true", help="time a grid of fp8 configs at the page-64 shapes instead")
    a = ap.parse_args(argv)
    only = {x for x in a.only.split(",") if x}
    if a.sweep and a.warm_part:
        part, parts = map(int, a.warm_part.split("/"))
        sweep(only, Path(a.out), part, parts)
        return
    if a.warm_part:
        part, parts = map(int, a.warm_part.split("/"))
        warm(only, part, parts)
        return
    if a.jobs:
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_fp8", "--only", a.only, "--warm-part",
                                   f"{i}/{a.jobs}"] + (["--sweep"] if a.sweep else []), cwd=root, env=env)
                 for i in range(a.jobs)]
        for pr in procs:
            pr.wait()
    if a.sweep:
        sweep(only, Path(a.out))
        return
    copy_bw, gemm = measure_ceilings()
    print(f"copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s", flush=True)
    rows, base, last = [], {}, None
    for shape, kv, cname in cases(only):
        if (shape, kv) != last:
            p, last = None, None
            torch.cuda.empty_cache()
            p, last = make(shape, kv), (shape, kv)
        cfg = configs(shape, kv)[cname]
        cfg = old_config(p) if cfg == "old" else cfg
        fn = p.ours(config=cfg)
        try:
            o, _ = fn()
            r = row("kvslim", p, bench_graph(fn), copy_bw, gemm, f"err {check(p, o)}")
        except Exception as e:  # noqa: BLE001 - one failing config must not end the run
            r = row("kvslim", p, float("nan"), copy_bw, gemm, f"{type(e).__name__}: {str(e)[:80]}")
        r.update(kv_dtype=kv, config=cname, overrides=cfg or {}, row_bytes=p.fmt.row_bytes,
                 G=p.h_q // (p.S if p.tied else p.h_kv))
        if kv == "bf16" and cname == "new":
            base[shape] = r["us"]
        r["vs_bf16"] = round(base[shape] / r["us"], 3) if shape in base and r["us"] == r["us"] else None
        print(json.dumps(r), flush=True)
        rows.append(r)
    meta = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "copy_TBps": round(copy_bw / 1e12, 3), "gemm_TFLOPs": round(gemm / 1e12, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# FP8 vs bf16 KV cache: decode kernel time, old vs new kernel paths (issues 14, 15)", "",
             f"{meta['date']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}; copy "
             f"{meta['copy_TBps']} TB/s and bf16 GEMM {meta['gemm_TFLOPs']} TFLOP/s measured in the same run; "
             "CUDA-graph replays with L2 flush; `python3 benchmarks/bench_fp8.py`. `new` = defaults "
             "(FP8_PATH=2, GATHER=0), `old` = the 2026-12-02 kernels (FP8_PATH=1, GATHER=0, that day's fp8 "
             "tiles); vs bf16 = bf16 `new` time / this time; % copy counts this format's bytes.", "",
             "| shape | G | page | kv | config | µs | vs bf16 | TB/s | % copy | check |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['variant'].split('+')[0]} h_q={r['h_q']} B={r['B']} | {r['G']} | {r['page']} | "
                     f"{r['kv_dtype']} | {r['config']} | {r['us']} | {'-' if r['vs_bf16'] is None else r['vs_bf16']}x | {r['TBps']} | "
                     f"{r['pct_copy']} | {r['note']} |")
    (out / "fp8_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
