"""Decode-attention benchmark: kvslim's two Triton kernels vs peers, on one GPU.

For each (variant, B, L, q_len): correctness vs a torch peer first, then the median
time (CUDA-graph replays, L2 flushed between calls), achieved TB/s and TFLOP/s,
and their fraction of the copy bandwidth / bf16 GEMM peak measured in the same run.

Timing: each kernel is replayed from a CUDA graph (10 calls, each after a 256 MB L2
flush; the flush-only graph's time subtracted), as decode runs under CUDA graphs; this
also checks that our launchers are capturable.

Bytes and FLOPs (DESIGN.md §6): bytes = KV bytes read (B·L·row_dim·2) + q + o;
FLOPs = 2·B·q_len·h_q·L·(d_qk + d_v). Every TB/s column uses these *compressed-cache*
bytes, also for peers that read a bigger, expanded K/V: it is then a speed, comparable
across rows, not that peer's own memory traffic.

Peers (in benchmarks/peers/): torch SDPA (cuDNN / flash / efficient backends; GQA-native
where the backend takes ``enable_gqa``, else on contiguous expanded K/V), the naive
absorbed torch path for MLA/GLA/GTA (matmuls over the latent), SGLang's Triton decode
kernel (loaded from its source file with stand-in modules; q_len = 1, page size 1, best of
4-32 splits), FlashInfer's paged GQA decode and paged MLA wrappers (opt-in, from the
stripped carry in .whl/flashinfer/; JIT-built at first use).

Usage (on the GPU, from the repo root):  python -m benchmarks.bench_decode --mode key|sweep|tune --out DIR
    [--peers ours,torch,sdpa,sglang,flashinfer | all] [--only gqa-8:page=64 mla:q_len=1 ...]

The shape lists, the config sweep (``tune``) and the driver are here; one shape's problem and
timed rows are in ``decode_problem.py``, the CSV / markdown / plots in ``decode_report.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import triton

from benchmarks.decode_problem import (
    DEFAULT_PEERS,
    PEERS,
    Problem,
    measure_ceilings,
    parse_peers,
    run_shape,
    shape_filter,
    spec_for,
)
from benchmarks.decode_report import write_results
from benchmarks.peers import flashinfer_peer
from benchmarks.timing import bench

KEY_SHAPES = [
    # (variant, h_q, B, L, q_len, page)
    ("gqa-8", 32, 64, 8192, 1, 64),
    ("gqa-8", 32, 64, 8192, 1, 16),
    ("gqa-8", 32, 64, 8192, 1, 1),
    ("gqa-4", 32, 64, 8192, 1, 64),
    ("gta-8", 32, 64, 8192, 1, 64),
    ("gta-4", 32, 64, 8192, 1, 64),
    ("mla", 16, 64, 8192, 1, 64),
    ("mla", 16, 64, 8192, 1, 1),
    ("mla", 16, 64, 8192, 2, 64),
    ("mla", 16, 64, 8192, 4, 64),
    ("mla", 128, 64, 8192, 1, 64),
    ("mla", 128, 64, 8192, 2, 64),
    ("mla", 128, 64, 8192, 4, 64),
    ("gla-2", 128, 64, 8192, 1, 64),
    ("gla-2", 128, 64, 8192, 2, 64),
    ("gla-4", 128, 64, 8192, 1, 64),
    ("gla-8", 128, 64, 8192, 1, 64),
    ("gla-8", 128, 64, 8192, 1, 16),
    ("gla-2", 32, 64, 8192, 1, 64),
]


def sweep_shapes():
    out = []
    for name, h_q in (("gqa-8", 32), ("gta-8", 32), ("mla", 16), ("gla-2", 32)):
        for B in (1, 8, 64, 128):
            for L in (1024, 8192, 32768):
                for q_len in (1, 2, 4):
                    if q_len > 1 and (L != 8192 or B not in (8, 64)):
                        continue
                    out.append((name, h_q, B, L, q_len, 64))
    return out


def tune(copy_bw, gemm, log=print):
    """Config sweep for our kernels at the key shapes (used to pick heuristics.py's numbers)."""

    def cfgs(hs, ns, ws, ss):
        return [
            dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=s)
            for h in hs
            for n in ns
            for w in ws
            for s in ss
        ]

    grid = [
        # (variant, h_q, q_len, page, configs, splits)
        (
            "gqa-8",
            32,
            1,
            64,
            cfgs([4], [64], [4], [3, 4]) + cfgs([4], [32], [4], [4]) + cfgs([4], [128], [4], [3]),
            [None],
        ),
        (
            "gta-8",
            32,
            1,
            64,
            [dict(c, SPG=g) for g in (1, 2) for c in cfgs([4], [64], [2, 4], [2, 3])],
            [None, 2],
        ),
        ("mla", 16, 1, 64, cfgs([16], [32, 64], [4], [2, 3, 4]), [None, 8]),
        ("mla", 16, 1, 1, cfgs([16], [32, 64], [4], [2, 3]), [None]),
        ("mla", 128, 1, 64, cfgs([64], [32, 64], [8], [2, 3]), [None, 4]),
        ("mla", 128, 2, 64, cfgs([32], [64], [8], [2, 3]) + cfgs([32], [32], [8], [3]), [None]),
    ]
    for name, h_q, q_len, page, cfg_list, split_list in grid:
        p = Problem(spec_for(name, h_q), 64, 8192, q_len, page)
        res = []
        for cfg in cfg_list:
            for splits in split_list:
                try:
                    t = bench(p.ours(num_splits=splits, config=cfg), rep=25)
                except Exception as e:  # out of resources
                    log(f"  {name} {cfg} failed: {type(e).__name__}")
                    break
                res.append((t, cfg, splits))
        res.sort(key=lambda x: x[0])
        for t, cfg, splits in res[:4] + res[-1:]:
            log(
                f"TUNE {name} h_q={h_q} q_len={q_len} page={page} {t * 1e6:.1f}us {p.bytes / t / 1e12:.2f}TB/s "
                f"{p.flops / t / 1e12:.0f}TF splits={splits} {cfg}"
            )
        del p
        torch.cuda.empty_cache()

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("key", "sweep", "tune", "all"), default="key")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-peers", action="store_true", help="time our kernels only (= --peers ours)")
    ap.add_argument(
        "--peers",
        type=parse_peers,
        default=None,
        help=f"comma list of {', '.join(PEERS)} or 'all' (default {DEFAULT_PEERS}; FlashInfer needs "
        "the carry in .whl/flashinfer, see NOTES.md). Sweep-only shapes always run ours alone.",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="VARIANT[:key=value]",
        help="run only the shapes matching any filter, e.g. gqa-8:page=64 mla:q_len=1:page=64 "
        "(keys h_q, B, L, q_len, page; VARIANT may be *)",
    )
    ap.add_argument(
        "--max-seconds", type=float, default=None, help="skip the remaining shapes after this long"
    )
    args = ap.parse_args()
    peers = {"ours"} if args.no_peers else (args.peers or parse_peers(DEFAULT_PEERS))
    wanted = shape_filter(args.only)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    copy_bw, gemm = measure_ceilings()
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        copy_bw=copy_bw,
        gemm=gemm,
    )
    print(
        f"# {meta['gpu']} torch {meta['torch']} triton {meta['triton']}: copy {copy_bw / 1e12:.2f} TB/s, "
        f"GEMM {gemm / 1e12:.0f} TFLOP/s; peers {','.join(p for p in PEERS if p in peers)}",
        flush=True,
    )
    logs = []

    def log(s):
        print(s, flush=True)
        logs.append(s)

    if args.mode in ("tune",):
        tune(copy_bw, gemm, log)
        return
    fi_desc = None
    if "flashinfer" in peers:
        try:
            flashinfer_peer.load_flashinfer()
            fi_desc = flashinfer_peer.describe()
        except Exception as e:
            fi_desc = f"flashinfer: could not run: {flashinfer_peer.reason(e)}"
        log(f"# {fi_desc}")
    results = []
    shapes = []
    if args.mode in ("key", "all"):
        shapes += [(s, True) for s in KEY_SHAPES]
    if args.mode in ("sweep", "all"):
        shapes += [(s, False) for s in sweep_shapes() if s not in KEY_SHAPES]
    shapes = [(s, w) for s, w in shapes if wanted(s)]
    if not shapes:
        raise SystemExit("no shape matches --only")
    t0 = time.time()
    for (name, h_q, B, L, q_len, page), with_peers in shapes:
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            log(f"time budget spent: skipped {name} h_q={h_q} B={B} L={L} q_len={q_len} and the rest")
            break
        log(f"{name} h_q={h_q} B={B} L={L} q_len={q_len} page={page}")
        try:
            run_shape(
                name,
                h_q,
                B,
                L,
                q_len,
                page,
                copy_bw,
                gemm,
                peers=peers if with_peers else {"ours"} & peers,
                results=results,
                log=log,
            )
        except torch.cuda.OutOfMemoryError:
            log("  OOM")
            torch.cuda.empty_cache()
    if not results:
        raise SystemExit("no rows measured")
    why = [
        x.strip()
        for x in logs
        if x.strip().startswith(("sdpa refused", "sglang:", "sglang failed", "time budget", "flashinfer"))
    ]
    meta["notes"] = [
        "Peers: `sdpa-*(gqa)` = torch SDPA with `enable_gqa=True` on contiguous [B, h_kv, L, d] K/V; "
        "`(expanded)` = on K/V materialised to h_q heads (the backend refuses GQA); for GTA the key "
        "`concat(state[:64], rope)` is materialised first (not timed). SDPA rows with q_len > 1 run without "
        "the causal mask among new tokens (its is_causal is top-left aligned), which only helps them. "
        "`torch-absorbed` = bf16 matmuls over the latent/state + fp32 softmax. `sglang-triton` = SGLang "
        "0.5.10.post1 `decode_attention_fwd` loaded from its source file (token pool = page size 1, random "
        "token order, best of 4/8/16/32 splits); it has no q_len > 1 path and its MLA layout cannot express "
        "GTA/GLA rows (a shared rope key after S state heads). Its rows carry the shape's page column but "
        "always run page size 1.",
        "",
    ]
    if "flashinfer" in peers:
        meta["notes"] += [
            f"FlashInfer ({fi_desc}): JIT-built from a stripped wheel carried to the device (benchmarks/NOTES.md, "
            "Peers), reading views of the same paged cache (no copies): `flashinfer-decode` = "
            "BatchDecodeWithPagedKVCacheWrapper, CUDA-core kernel (fa2, q_len 1); `flashinfer-tc-fa2` = the same "
            "wrapper with use_tensor_cores=True (FA2 prefill kernel); K and V are strided views of our [K|V] "
            "rows (NHD). `flashinfer-mla-fa2` / `-fa3` = BatchMLAPagedAttentionWrapper with our [latent|rope] "
            "rows as its packed paged KV, causal for q_len > 1. Each is planned once outside the timed region; "
            "`err` as for ours.",
            "",
        ]
    else:
        meta["notes"] += [
            "FlashInfer was not run in this table (`--peers ...,flashinfer` with the stripped carry in "
            ".whl/flashinfer; see benchmarks/NOTES.md, Peers).",
            "",
        ]
    meta["notes"] += [
        "Peers that refused a shape (from the run log):",
        "",
        *[f"    {x}" for x in dict.fromkeys(why)],
    ]
    write_results(results, args.out, meta)


if __name__ == "__main__":
    main()
