"""The engine's prefill forward against the GEMM peak (issue 13): where a 2K-prompt step's time goes.

For each variant: a random-weight model of ``--shape`` (default ``1b``) in bf16 and the engine's own
:class:`~kvslim.engine.runner.ModelRunner` (paged pools, page ``--page-size``); one prefill step of
``--batch`` sequences x ``--tokens`` new tokens (the serving sweep's 8192-token budget = 4 x 2048),
either fresh (start 0) or continuing after ``--cached`` tokens. Timed in one process:

* **GEMM peak**: an 8192^3 bf16 matrix product;
* **step**: ``runner.prefill`` (host work included, synchronised), median over ``--reps``, eager and
  with the runner's ``compile`` (prefill through ``torch.compile``, kernels as custom ops);
* **model FLOPs**: 2 x (layer weights) x tokens + 2 x lm_head (last positions) + causal attention in
  its naive (expanded) form, 2 x h_q x (d_qk + d_v) per visible key;
* **breakdown**: device time per kernel category in one profiled step, and the host wall time of it.

The compiled and eager logits are compared (bf16: relative error).

    python -m benchmarks.prefill_step [--variants gqa-4,gta-4,mla,gla-2] [--cached 0,2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from benchmarks.engine_roofline import CATEGORIES, category
from benchmarks.timing import event_median, gemm_peak

OUT = Path(__file__).resolve().parent / "results"


def model_flops(model, B: int, T: int, start: int) -> float:
    spec = model.spec
    emb = model.model.embed_tokens.weight
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    visible = B * sum(start + i + 1 for i in range(T))  # (query, key) pairs under the causal mask
    attn = 2 * spec.num_heads * (spec.qk_head_dim + spec.out_head_dim) * visible * len(model.model.layers)
    return 2 * layer_params * B * T + 2 * emb.numel() * B + attn


def profile_step(fn) -> tuple[dict[str, float], float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    out = dict.fromkeys(CATEGORIES, 0.0)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name.lower()
            cat = "attention" if ("flash" in name or "fmha" in name or "_prefill" in name or "sdpa" in name
                                  or "attention" in name) else category(ev.name)
            out[cat] += ev.device_time * 1e-6
    return out, wall


def measure(preset: str, shape: str, B: int, T: int, cached: list[int], page_size: int, compile: str,
            reps: int, peak: float, ref: dict) -> list[dict]:
    """``compile``: ``off`` (eager), ``layer`` or ``model`` (``ModelRunner``'s ``prefill_compile``)."""
    from kvslim.engine.runner import ModelRunner
    from kvslim.engine.source import random_model

    L = max(cached) + T
    model = random_model(preset, shape, device="cuda", max_len=L + 64).to(torch.bfloat16)
    pages_per_seq = -(-L // page_size)
    t0 = time.perf_counter()
    runner = ModelRunner(model, num_pages=B * pages_per_seq + 1, page_size=page_size,
                         max_pages_per_seq=pages_per_seq, max_batch=B, cuda_graphs=False, compile=compile != "off",
                         prefill_compile="model" if compile == "model" else "layer")
    pages = [list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)) for i in range(B)]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (B, L), generator=g).tolist()
    rows = []
    for start in sorted(cached):
        if start:  # the history: prefilled once (fresh) so the continuing chunk reads real rows
            runner.prefill([t[:start] for t in tokens], [0] * B, pages)
        chunks = [t[start : start + T] for t in tokens]

        def step(chunks=chunks, start=start, prefill=runner.prefill):
            return prefill(chunks, [start] * B, pages)

        logits = step()  # compiles (first call) and warms up
        torch.cuda.synchronize()
        t_build = time.perf_counter() - t0
        key = (preset, start)
        err = None
        if key in ref:
            a, r = logits.float(), ref[key]
            err = float((a - r).norm() / r.norm())
        else:
            ref[key] = logits.float()
        t = event_median(step, reps)
        cats, wall = profile_step(step)
        flops = model_flops(model, B, T, start)
        rows.append(dict(variant=preset, compile=compile, batch=B, tokens=T, start=start, page_size=page_size,
                         step_ms=t * 1e3, tflops=flops / t / 1e12, peak_frac=flops / t / peak, model_tflop=flops / 1e12,
                         profiled_wall_ms=wall * 1e3, rel_err_vs_eager=err, build_s=t_build,
                         **{f"{k}_ms": v * 1e3 for k, v in cats.items()}))
    del runner, model, step
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="gqa-4,gta-4,mla,gla-2")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--cached", default="0,2048", help="history lengths before the chunk (0 = fresh prompt)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--compile", choices=("off", "on", "layer", "model", "both", "all"), default="both",
                    help="on = layer (the engine's default: one decoder layer compiled, reused by every layer), "
                         "model (the whole forward as one graph), both = off + layer, all = off + layer + model")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_step needs a CUDA device")
    peak = gemm_peak()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    cached = [int(c) for c in args.cached.split(",")]
    modes = {"off": ["off"], "on": ["layer"], "layer": ["layer"], "model": ["model"], "both": ["off", "layer"],
             "all": ["off", "layer", "model"]}[args.compile]
    rows, ref = [], {}
    for v in args.variants.split(","):
        for c in modes:
            for r in measure(v, args.shape, args.batch, args.tokens, cached, args.page_size, c, args.reps, peak, ref):
                rows.append(r)
                err = "" if r["rel_err_vs_eager"] is None else f" err {r['rel_err_vs_eager']:.1e}"
                print(f"{v:7s} compile={c:5s} start {r['start']:5d}: {r['step_ms']:7.2f} ms  {r['tflops']:5.0f} TFLOP/s "
                      f"= {r['peak_frac']:.0%} of peak | attn {r['attention_ms']:.1f} gemm {r['gemm_ms']:.1f} "
                      f"write {r['cache write_ms']:.1f} other {r['other_ms']:.1f} ms, profiled wall "
                      f"{r['profiled_wall_ms']:.1f}{err} (build {r['build_s']:.0f} s)", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"prefill_step_{gpu.replace(' ', '_')}"
    meta = dict(date=date, gpu=gpu, torch=torch.__version__, gemm_tflops=peak / 1e12, shape=args.shape)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Engine prefill step vs GEMM peak ({gpu}, {date})", "",
             f"torch {torch.__version__}; `{args.shape}` random-weight shape in bf16; one `ModelRunner.prefill` of "
             f"{args.batch} x {args.tokens} new tokens (page {args.page_size}), host work included, median of "
             f"{args.reps}; bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s measured in the same run; model FLOPs count "
             "the weights and causal attention in its expanded form. Breakdown: device ms per category in one "
             "profiled step.", "",
             "| variant | compile | history | step ms | TFLOP/s | of peak | attention | GEMM | cache write | other "
             "| profiled wall ms | rel. err vs eager |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = "" if r["rel_err_vs_eager"] is None else f"{r['rel_err_vs_eager']:.1e}"
        lines.append(f"| {r['variant']} | {r['compile']} | {r['start']} | {r['step_ms']:.2f} | "
                     f"{r['tflops']:.0f} | {r['peak_frac']:.0%} | {r['attention_ms']:.2f} | {r['gemm_ms']:.2f} | "
                     f"{r['cache write_ms']:.2f} | {r['other_ms']:.2f} | {r['profiled_wall_ms']:.1f} | {err} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md", flush=True)


if __name__ == "__main__":
    main()
