"""The Gluon Hopper tied kernel (issue 14) vs our ``tl`` kernel vs FlashInfer at the compute-bound shapes.

MLA h_q=128 (q_len 1/2/4) and GLA-2 h_q=128 (q_len 1/2), B=64, L=8192, page 64, bf16; CUDA-graph
replay time with an L2 flush (``benchmarks.timing.bench_graph``), achieved TFLOP/s, % of the
copy bandwidth and of the bf16 GEMM peak measured in the same run. Correctness first: each
kernel is compared with the fp64 oracle on a small ragged case (max error printed) and, at
each timed shape, with the fp32 oracle on two sequences. Markdown + JSON to ``--out``.

    python3 benchmarks/bench_hopper.py --out $OUT [--no-flashinfer]

Runs in well under 2 minutes on an H200, FlashInfer's FA3 MLA JIT build aside (minutes when not
cached: pass ``--no-flashinfer`` to skip it). Each row is printed as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.decode_problem import Problem, check, measure_ceilings, spec_for  # noqa: E402
from benchmarks.timing import bench_graph  # noqa: E402
from kvslim.kernels import decode_tied  # noqa: E402
from kvslim.kernels.hopper_tied import decode_tied_hopper  # noqa: E402
from kvslim.kernels.reference import decode_tied_ref  # noqa: E402

SHAPES = [("mla", 1), ("mla", 2), ("mla", 4), ("gla-2", 1), ("gla-2", 2)]
# hopper_tied configs timed besides the default (PIPE: async wgmma, the softmax overlaps PV)
_MLA = [("hopper-bn32x3", {"BLOCK_N": 32, "STAGES": 3}),
        ("hopper-pipe-bn32x4", {"BLOCK_N": 32, "STAGES": 4, "PIPE": True})]
_GLA = [("hopper-pipe-bn64x4", {"BLOCK_N": 64, "STAGES": 4, "PIPE": True})]
EXTRA = {("mla", 1): _MLA, ("mla", 2): _MLA[1:], ("mla", 4): _MLA[1:], ("gla-2", 1): _GLA, ("gla-2", 2): _GLA}


def kw_of(p):
    return dict(num_state_heads=p.S, state_dim=p.sd, nope_dim=p.nope, rope_dim=p.rope, v_dim=p.dv,
                softmax_scale=p.scale)


def ours(p, kw, impl):
    return lambda: decode_tied(p.q, p.cache, p.block_table, p.seq_lens, impl=impl, **kw)


def small_check(log) -> bool:
    """Both impls vs the fp64 oracle: ragged lengths, page 48, 1 and 3 splits, MLA and GLA-2."""
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, S, sd, q_len, splits in (("mla", 1, 512, 2, 1), ("mla", 1, 512, 1, 3), ("gla-2", 2, 256, 2, 2)):
        page, lens, h_q = 48, [q_len, 333, 1200], 128  # every seq_len >= q_len (the contract)
        npp = -(-max(lens) // page) + 1
        cache = torch.full((3 * npp + 2, page, S * sd + 64), float("nan"), device="cuda", dtype=torch.bfloat16)
        bt = torch.randperm(cache.shape[0], device="cuda", generator=g)[: 3 * npp].view(3, npp).to(torch.int32)
        for b, n in enumerate(lens):
            rows = torch.randn(n, cache.shape[-1], device="cuda", generator=g).to(torch.bfloat16)
            flat = cache[bt[b].long()].view(-1, cache.shape[-1])
            flat[:n] = rows
            cache[bt[b].long()] = flat.view(npp, page, -1)
        sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(3, q_len, h_q, sd + 64, device="cuda", generator=g).to(torch.bfloat16)
        kw = dict(num_state_heads=S, state_dim=sd, nope_dim=sd, rope_dim=64, v_dim=sd, softmax_scale=(sd + 64) ** -0.5)
        ro, rl = decode_tied_ref(q.double(), cache.double(), bt, sl, **kw)
        for impl in ("hopper", "triton"):
            try:
                o, lse = decode_tied(q, cache, bt, sl, num_splits=splits, impl=impl, **kw)
                torch.cuda.synchronize()
            except Exception as e:
                log(f"  check {name} q_len={q_len} splits={splits} {impl}: FAILED TO RUN {type(e).__name__}: {e}")
                ok = False
                continue
            eo = (o.double() - ro).abs().max().item()
            el = (lse.double() - rl).abs().max().item()
            bad = not (eo < 3e-2 and el < 1e-2)  # NaN fails too
            ok &= not bad
            log(f"  check {name} q_len={q_len} splits={splits} {impl}: max |o err| {eo:.2e} (|o| max "
                f"{ro.abs().max().item():.2f}), max |lse err| {el:.2e}{' FAIL' if bad else ''}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--L", type=int, default=8192)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    t0 = time.time()
    gpu = torch.cuda.get_device_name()
    import triton

    log(f"# bench_hopper: {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    ok = small_check(log)
    copy_bw, gemm = measure_ceilings()
    log(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")
    fi = None
    if not args.no_flashinfer:
        try:
            from benchmarks.peers import flashinfer_peer

            flashinfer_peer.load_flashinfer()
            fi = flashinfer_peer
            log(flashinfer_peer.describe())
        except Exception as e:
            log(f"flashinfer: not importable ({type(e).__name__}: {str(e)[:120]})")
    rows = []
    for name, q_len in SHAPES:
        p = Problem(spec_for(name, 128), args.B, args.L, q_len, 64)
        kw = kw_of(p)
        cands = [(impl, ours(p, kw, impl)) for impl in ("hopper", "triton")]
        for i, (vname, cfg) in enumerate(EXTRA.get((name, q_len), [])):  # other configs that fit
            cands.insert(1 + i, (vname, lambda p=p, kw=kw, cfg=cfg: decode_tied_hopper(
                p.q, p.cache, p.block_table, p.seq_lens, config=cfg, **kw)))
        if fi is not None and p.S == 1:
            for vname, build in fi.variants(p):
                if vname.endswith("fa3"):
                    try:
                        fn, to_bqhd = build()
                        cands.append((vname, lambda fn=fn, to_bqhd=to_bqhd: to_bqhd(fn())))
                    except Exception as e:
                        log(f"  {vname}: could not run: {type(e).__name__}: {str(e)[:100]}")
        for kname, fn in cands:
            try:
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                err = check(p, out)
                t = bench_graph(fn)
            except Exception as e:
                log(f"| {name} | {q_len} | {kname} | failed: {type(e).__name__}: {str(e)[:100]} |")
                continue
            r = dict(shape=name, h_q=128, B=p.B, L=p.L, q_len=q_len, page=64, kernel=kname, us=round(t * 1e6, 1),
                     TFLOPs=round(p.flops / t / 1e12, 1), pct_copy=round(100 * p.bytes / t / copy_bw, 1),
                     pct_gemm=round(100 * p.flops / t / gemm, 1), rel_err=err)
            rows.append(r)
            log(f"  {name} q_len={q_len} {kname}: {r['us']} us, {r['TFLOPs']} TFLOP/s, err {err}")
        del p
        torch.cuda.empty_cache()
    log("")
    log("| shape | q_len | kernel | us | TFLOP/s | % copy BW | % GEMM peak | rel err |")
    log("|---|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        log(f"| {r['shape']} h{r['h_q']} | {r['q_len']} | {r['kernel']} | {r['us']} | {r['TFLOPs']} | "
            f"{r['pct_copy']} | {r['pct_gemm']} | {r['rel_err']} |")
    log(f"\nsmall-case check: {'ok' if ok else 'FAILED'}; total {time.time() - t0:.0f} s")
    tag = time.strftime("%Y-%m-%d") + "_hopper_" + gpu.replace(" ", "_")
    with open(os.path.join(args.out, tag + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, copy_tb_s=copy_bw / 1e12,
                       gemm_tflops=gemm / 1e12, check_ok=ok, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
