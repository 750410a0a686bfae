"""The engine's decode step against its roofline (issue 13): graph replay time vs bytes / copy bandwidth.

For each variant and batch: a random-weight model of ``--shape`` (default ``1b``) in bf16, the
engine's own :class:`~kvslim.engine.runner.ModelRunner` (paged pools, CUDA graphs, page 16),
every sequence holding ``--context`` cached tokens. Timed in one process:

* **copy bandwidth**: a 1 GiB device-to-device copy (read + write bytes / time);
* **step**: one replay of the runner's decode graph (the whole step: embeddings, every layer,
  lm_head), median over ``--reps`` replays, eager (``compile=False``) and ``torch.compile``;
* **roofline**: (weight bytes read once + KV bytes read: B x context x layers x row bytes) / copy bandwidth;
* **breakdown**: device time per kernel category in one profiled (non-graph) step: attention
  kernels, GEMMs, cache-row writes, everything else (norms, RoPE, casts, copies, fused Inductor kernels).

    python -m benchmarks.engine_roofline [--variants gqa-4,gta-4,mla,gla-2] [--batch 64,256] [--compile both]

Writes ``benchmarks/results/engine_roofline_<GPU>.{md,json}`` (appends rows of the same day).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from benchmarks.timing import event_median

OUT = Path(__file__).resolve().parent / "results"
CATEGORIES = ("attention", "gemm", "cache write", "other")


def category(name: str) -> str:
    n = name.lower()
    if "_tied_kernel" in n or "_separate_kernel" in n or "combine" in n:
        return "attention"
    if "_write_rows" in n:
        return "cache write"
    if any(k in n for k in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul")):
        return "gemm"
    return "other"


def page_sizes(arg: str) -> list:
    """``--page-size``: comma-separated positive ints or ``auto`` (the engine's default for each variant)."""
    out = []
    for x in arg.split(","):
        if x == "auto":
            out.append(x)
        elif x.isdigit() and int(x) > 0:
            out.append(int(x))
        else:
            raise SystemExit(f"--page-size: expected positive ints or 'auto', got {x!r}")
    return out


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() / event_median(lambda: b.copy_(a), 10)


def replay_time(graph, reps: int) -> float:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return event_median(graph.replay, reps)


def breakdown(runner, b: int) -> dict[str, float]:
    """Seconds of device time per category in one non-graph decode forward of batch ``b``."""
    from torch.profiler import ProfilerActivity, profile

    runner._graph_forward(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner._graph_forward(b)
        torch.cuda.synchronize()
    out = dict.fromkeys(CATEGORIES, 0.0)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[category(ev.name)] += ev.device_time * 1e-6
    return out


def measure(preset: str, shape: str, batches: list[int], context: int, page_size: int | str, compile: bool,
            kv_dtype: str | None, reps: int, fuse: bool = False, compile_mode: str | None = None) -> list[dict]:
    from kvslim.engine.config import default_page_size
    from kvslim.engine.runner import ModelRunner
    from kvslim.engine.source import random_model
    from kvslim.rows import RowFormat

    model = random_model(preset, shape, device="cuda", max_len=context + 64).to(torch.bfloat16)
    spec = model.spec
    if page_size == "auto":
        page_size = default_page_size(spec)
    fmt = RowFormat.for_spec(spec, kv_dtype or "bf16")
    pages_per_seq = -(-(context + 1) // page_size)
    B = max(batches)
    t0 = time.perf_counter()
    runner = ModelRunner(model, num_pages=B * pages_per_seq + 1, page_size=page_size,
                         max_pages_per_seq=pages_per_seq, max_batch=B, kv_format=fmt, cuda_graphs=True,
                         graph_batches=tuple(batches), compile=compile, fuse_projections=fuse,
                         compile_mode=compile_mode if compile else None)
    t_build = time.perf_counter() - t0
    updates = [(i, 0, list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq))) for i in range(B)]
    runner.update_table(updates)
    emb = model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    if model.lm_head.weight is emb:
        weight_bytes += emb.numel() * emb.element_size()
    rows = []
    for b in batches:
        runner.decode([1] * b, [context] * b, list(range(b)))  # copies the table and inputs, replays once
        torch.cuda.synchronize()
        step = replay_time(runner.graphs[b], reps)
        kv_bytes = b * (context + 1) * len(model.model.layers) * fmt.row_bytes
        cats = breakdown(runner, b)
        rows.append(dict(variant=preset + (f"+{kv_dtype}" if kv_dtype else ""), batch=b, context=context,
                         page_size=page_size, compile=compile, fuse=fuse, compile_mode=compile_mode if compile else None,
                         step_ms=step * 1e3, weight_bytes=weight_bytes,
                         kv_bytes=kv_bytes, build_s=t_build, **{f"{k}_ms": v * 1e3 for k, v in cats.items()}))
    del runner, model
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="gqa-4,gta-4,mla,gla-2")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--context", type=int, default=2560)
    ap.add_argument("--page-size", default="auto",
                    help="comma-separated page sizes; 'auto' = the engine's default for the variant "
                         "(kvslim.engine.config.default_page_size: 64 for MLA/GLA, 16 for the others)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both")
    ap.add_argument("--fuse", choices=("off", "on", "both"), default="on",
                    help="fused q/k/v and gate/up GEMMs (EngineConfig.fuse_projections)")
    ap.add_argument("--kv-dtype", default=None, help="e.g. fp8 (default: bf16 rows)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args(argv)
    pages = page_sizes(args.page_size)
    if not torch.cuda.is_available():
        raise SystemExit("engine_roofline needs a CUDA device")
    batches = sorted(int(b) for b in args.batch.split(","))
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}
    rows = []
    for v in args.variants.split(","):
        for c, f, page in [(c, f, p) for c in modes[args.compile] for f in modes[args.fuse]
                           for p in pages]:
            for r in measure(v, args.shape, batches, args.context, page, c, args.kv_dtype, args.reps, f,
                             args.compile_mode):
                r["roofline_ms"] = (r["weight_bytes"] + r["kv_bytes"]) / bw * 1e3
                r["ratio"] = r["step_ms"] / r["roofline_ms"]
                rows.append(r)
                print(f"{r['variant']:8s} B={r['batch']:4d} page={r['page_size']:3d} compile={c!s:5s} fuse={f!s:5s} "
                      f"step {r['step_ms']:7.3f} ms  roofline "
                      f"{r['roofline_ms']:6.3f} ms  = {r['ratio']:.2f}x  | attn {r['attention_ms']:.2f} gemm "
                      f"{r['gemm_ms']:.2f} write {r['cache write_ms']:.2f} other {r['other_ms']:.2f} ms "
                      f"(build {r['build_s']:.0f} s)", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engine_roofline_{gpu.replace(' ', '_')}{args.tag}"
    meta = dict(date=date, gpu=gpu, torch=torch.__version__, copy_tb_s=bw / 1e12, shape=args.shape)
    (stem.with_suffix(".json")).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    mode = f"; compile mode `{args.compile_mode}`" if args.compile_mode else ""
    lines = [f"# Engine decode step vs roofline ({gpu}, {date})", "",
             f"torch {torch.__version__}; `{args.shape}` random-weight shape in bf16, {args.context} cached tokens "
             f"per sequence, CUDA-graph replay of the engine runner's decode step "
             f"(median of {args.reps}); copy bandwidth {bw / 1e12:.2f} TB/s measured in the same run; roofline = "
             "(weight bytes + KV bytes) / copy bandwidth. Breakdown: device time per category in one profiled "
             "non-graph step (sums may exceed the graph step: no overlap, profiler overhead)" + mode + ".", "",
             "| variant | B | page | compile | fused GEMMs | step ms | roofline ms | step / roofline | attention | GEMM "
             "| cache write | other |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['page_size']} | {'on' if r['compile'] else 'off'} | "
                     f"{'on' if r['fuse'] else 'off'} | {r['step_ms']:.3f} | "
                     f"{r['roofline_ms']:.3f} | {r['ratio']:.2f}x | {r['attention_ms']:.2f} | {r['gemm_ms']:.2f} | "
                     f"{r['cache write_ms']:.2f} | {r['other_ms']:.2f} |")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md", flush=True)


if __name__ == "__main__":
    main()
