"""Serving benchmark: GQA vs GTA vs MLA vs GLA at equal model shape and equal KV memory.

For each attention variant: a random-weight model of one shape (default ``1b``) and an
engine whose KV pool fills the same memory (so smaller bytes/token => more pages). Two
modes (``--mode engine|http|both``):

* ``engine``: the ``LLMEngine`` in this process, driven by a closed loop
  (``kvslim.engine.bench.run_engine_bench``): ``num_requests`` requests, at most
  ``concurrency`` in flight, a new one added when one finishes; per-token times from the
  engine listener. Measures the engine (scheduler + forwards + sampling), no HTTP.
* ``http``: ``kvslim serve`` in its own process (engine in a third) and the load
  generator of ``kvslim bench serve`` in this one. Measures what a client sees.

First a correctness gate: on the same device, the engine (CUDA graphs on) must produce
the greedy tokens of ``model.generate`` (fp32 ``tiny`` models). The results (markdown
table, JSON rows, PNG) are rewritten after every row, so a killed run keeps what it did;
``--time-budget`` skips work that would not fit instead of being killed.

A variant ``NAME+fp8`` (e.g. ``mla+fp8``) runs that preset over an fp8 KV cache (``kvslim.rows``).

    python -m benchmarks.bench_serve --mode engine --variants gqa-4,gta-4,mla,gla-2 \
        --concurrency 64,256 --input-len 2048 --output-len 1024 --max-batch 256 --kv-memory 40 \
        --time-budget 500 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

from kvslim.engine.allocator import page_bytes
from kvslim.engine.bench import run_bench, run_engine_bench
from kvslim.engine.config import PREFILL_COMPILE, EngineConfig
from kvslim.engine.engine import LLMEngine, SamplingParams
from kvslim.engine.source import SHAPES, ModelSource, random_model
from kvslim.spec import AttentionSpec

RATIOS = (("gta-4", "gqa-4"), ("gla-2", "mla"))


def log(msg: str) -> None:
    print(msg, flush=True)


def _metrics(url: str) -> dict:
    host, port = url.rsplit("/", 1)[-1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{name: value}``, summed over labels (a ``--dp`` router labels each replica)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + float(val)
    return out


def split_variant(v: str) -> tuple[str, str | None]:
    """``mla+fp8`` -> ``("mla", "fp8")``: a preset and the KV dtype of its cache (None: the model's)."""
    preset, _, kv = v.partition("+")
    return preset, kv or None


def check_exact(device: str, variants: list[str]) -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    for v in variants:
        preset, kv = split_variant(v)
        m = random_model(preset, "tiny", device=device)
        ref = m.generate(prompts, max_new_tokens=16, kv_dtype=kv)
        eng = LLMEngine(m, EngineConfig(num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=16,
                                        kv_dtype=kv))
        out = eng.generate(prompts, SamplingParams(max_tokens=16), arrival_steps=[0, 0, 2, 3, 5, 9])
        same = sum(a == b for a, b in zip(out, ref))
        lines.append(f"exactness {v}: {same}/{len(ref)} sequences equal model.generate "
                     f"(cuda graphs {eng.runner.use_graphs})" + ("" if same == len(ref) else " — MISMATCH"))
        del m, eng
    return lines


def _row(v: str, mode: str, bpt: int, pages: int, c: int, s: dict, preempt: int, setup: float) -> dict:
    r = dict(variant=v, mode=mode, bytes_per_token_layer=bpt, pages=pages, concurrency=c,
             num_requests=s["num_requests"], completed=s["completed"], tok_s=s["output_throughput"],
             wall_s=s["wall_s"], ttft_p50=s["ttft_s"]["p50"], ttft_p99=s["ttft_s"]["p99"],
             itl_p50=s["itl_s"]["p50"], itl_p99=s["itl_s"]["p99"], tpot_p50=s["tpot_s"]["p50"],
             e2e_p50=s["e2e_s"]["p50"], preemptions=preempt, setup_s=setup, errors=s["errors"][:2],
             timed_out=s.get("timed_out", False))
    if mode == "engine":
        r.update({k: s[k] for k in ("steps", "decode_steps", "mean_decode_batch", "decode_step_ms", "prefill_s")})
    else:
        r["tokens_per_event"] = s["tokens_per_event"]
    return r


def _num_requests(args, c: int) -> int:
    return args.num_requests or c


def engine_rows(args, v: str, bpt: int, device: str, concs: list[int], deadline: float, est: dict, emit) -> None:
    t0 = time.perf_counter()
    dev = "cuda" if device == "cuda" else "cpu"
    preset, kv = split_variant(v)
    model = ModelSource(preset=preset, shape=args.shape, dtype=args.dtype,
                        max_len=max(4096, args.max_model_len)).build(dev)
    t_model = time.perf_counter() - t0
    log(f"[{v}] model built in {t_model:.1f} s; building the engine (pool, decode compile, CUDA-graph capture)")
    config = EngineConfig(kv_memory_gib=args.kv_memory, page_size=args.page_size, max_batch=args.max_batch,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, cuda_graphs=False if args.no_cuda_graphs else None,
                          kv_dtype=kv, compile=args.compile, prefill_compile=args.prefill_compile,
                          overlap=not args.no_overlap)
    engine = LLMEngine(model, config)
    log(f"[{v}] engine built in {time.perf_counter() - t0 - t_model:.1f} s; warm-up")
    # warm-up outside the measurement: a short closed loop of the same prompts, so the first row does
    # not pay one-time costs (Triton specialisations of short prefill chunks, cuBLAS/SDPA shapes, allocator)
    tw = time.perf_counter()
    w = min(64, max(concs))
    ws = run_engine_bench(engine, num_requests=w, concurrency=w, input_len=args.input_len, output_len=8,
                          seed=args.seed + 1, deadline=deadline, progress_every=args.progress_every, log=log)
    if ws["timed_out"]:
        log(f"[{v}] the time budget ran out in the warm-up ({ws['completed']}/{w} requests)")
    t_warm = time.perf_counter() - tw
    setup = time.perf_counter() - t0
    pages = engine.allocator.num_usable
    log(f"[{v}] engine setup {setup:.1f} s (model {t_model:.1f} s, pool + graphs {setup - t_model - t_warm:.1f} s, "
        f"warm-up {w} requests {t_warm:.1f} s), "
        f"{pages} pages of {engine.allocator.page_size} tokens, cuda graphs {engine.runner.use_graphs}, "
        f"overlap {engine.pipeline.enabled}")
    st = engine.runner.setup_times
    if st:
        slow = sorted(st["warmup_by_batch_s"].items(), key=lambda kv: -kv[1])[:4]
        log(f"[{v}] graphs: warm-up forwards {st['warmup_s']:.1f} s (slowest batches {slow}), "
            f"capture {st['capture_s']:.1f} s")
    try:
        for c in concs:
            n = _num_requests(args, c)
            left = deadline - time.perf_counter()
            guess = est.get(("engine", c))
            if left <= 0 or (guess is not None and guess > left):
                log(f"[{v}] engine c={c}: SKIPPED, {max(0.0, left):.0f} s of the time budget left"
                    + (f", a row took ~{guess:.0f} s before" if guess is not None else ""))
                continue
            log(f"[{v}] engine c={c}: {n} requests, in {args.input_len} / out {args.output_len}")
            tr = time.perf_counter()
            s = run_engine_bench(engine, num_requests=n, concurrency=c, input_len=args.input_len,
                                 output_len=args.output_len, seed=args.seed, deadline=deadline,
                                 progress_every=args.progress_every, log=log)
            est[("engine", c)] = max(est.get(("engine", c), 0.0), time.perf_counter() - tr)
            if s["timed_out"]:
                log(f"[{v}] engine c={c}: time budget ran out mid-row, {s['completed']}/{n} requests completed")
            emit(_row(v, "engine", bpt, pages, c, s, s["preemptions"], setup))
    finally:
        del engine, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            log(f"[{v}] engine freed: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated, "
                f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved")


def http_rows(args, v: str, bpt: int, concs: list[int], deadline: float, est: dict, emit) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pf = os.path.join(tmp, "port")
        preset, kv = split_variant(v)
        cmd = [sys.executable, "-m", "kvslim", "serve", "--random-model", preset, "--model-shape", args.shape,
               "--kv-dtype", kv or "auto",
               "--dtype", args.dtype, "--kv-memory", str(args.kv_memory),
               "--max-batch", str(args.max_batch), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--max-model-len", str(args.max_model_len), "--port", "0",
               "--port-file", pf] + (["--page-size", str(args.page_size)] if args.page_size else []) + (
                   ["--no-cuda-graphs"] if args.no_cuda_graphs else []) + (
                   ["--no-overlap"] if args.no_overlap else []) + (
                   [] if args.compile is None else ["--compile" if args.compile else "--no-compile"])
        cmd += ["--prefill-compile", args.prefill_compile]
        if args.tp > 1:
            cmd += ["--tp", str(args.tp)]
        if args.dp > 1:
            cmd += ["--dp", str(args.dp)]
        proc = subprocess.Popen(cmd, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
        try:
            while not os.path.exists(pf):
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"server for {v} did not start (or the time budget ran out)")
                time.sleep(0.2)
            with open(pf) as f:
                url = f"http://127.0.0.1:{int(f.read())}"
            setup = time.perf_counter() - t0
            log(f"[{v}] http server up in {setup:.1f} s at {url}")
            for c in concs:
                n = _num_requests(args, c)
                left = deadline - time.perf_counter()
                guess = est.get(("http", c))
                if left <= 0 or (guess is not None and guess > left):
                    log(f"[{v}] http c={c}: SKIPPED, {max(0.0, left):.0f} s of the time budget left")
                    continue
                log(f"[{v}] http c={c}: {n} requests")
                before = int(_metrics(url)["kvslim_preemptions_total"])
                tr = time.perf_counter()
                s = run_bench(url, num_requests=n, concurrency=c, input_len=args.input_len,
                              output_len=args.output_len, seed=args.seed, progress=False,
                              timeout=max(1.0, min(3600.0, deadline - time.perf_counter())))
                est[("http", c)] = max(est.get(("http", c), 0.0), time.perf_counter() - tr)
                m = _metrics(url)
                emit(_row(v, "http", bpt, int(m["kvslim_kv_pages_total"]), c, s,
                          int(m["kvslim_preemptions_total"]) - before, setup))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _f(x: float, scale: float = 1.0, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.{nd}f}"


def ratio_lines(rows: list[dict]) -> list[str]:
    out = []
    for a, b in RATIOS:
        for r in rows:
            if r["variant"] != a:
                continue
            ref = next((q for q in rows if q["variant"] == b and q["mode"] == r["mode"]
                        and q["concurrency"] == r["concurrency"]), None)
            if ref is None or not ref["tok_s"] or not ref["itl_p50"]:
                continue
            out.append(f"- {a} / {b} ({r['mode']}, concurrency {r['concurrency']}): throughput "
                       f"{r['tok_s'] / ref['tok_s']:.2f}×, ITL p50 {r['itl_p50'] / ref['itl_p50']:.2f}×"
                       + (f", ms per decode step {r['decode_step_ms'] / ref['decode_step_ms']:.2f}×"
                          if r["mode"] == "engine" and ref.get("decode_step_ms") else ""))
    return out


def render(args, name: str, notes: list[str], rows: list[dict], messages: list[str]) -> str:
    head = (f"# serving benchmark — {name}, shape {args.shape} {args.dtype}, KV pool {args.kv_memory} GiB per variant, "
            f"input {args.input_len}, output {args.output_len}, max batch {args.max_batch}, "
            f"prefill budget {args.max_num_batched_tokens} tokens/step"
            + (", overlapped decode off" if args.no_overlap else "")
            + (f", TP {args.tp} x DP {args.dp} (KV pool per rank)" if args.tp > 1 or args.dp > 1 else "") + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n")
    table = ["| variant | mode | B/token/layer | pages | conc | done | out tok/s | TTFT p50 ms | TTFT p99 ms | "
             "ITL p50 ms | ITL p99 ms | TPOT p50 ms | E2E p50 s | decode steps | mean batch | ms/decode step | "
             "prefill s | preempt | setup s |", "|" + "---|" * 19]
    for r in rows:
        eng = r["mode"] == "engine"
        table.append(
            f"| {r['variant']} | {r['mode']} | {r['bytes_per_token_layer']} | {r['pages']} | {r['concurrency']} | "
            f"{r['completed']}/{r['num_requests']}{' (timed out)' if r['timed_out'] else ''} | {_f(r['tok_s'], nd=0)} | "
            f"{_f(r['ttft_p50'], 1e3)} | {_f(r['ttft_p99'], 1e3)} | {_f(r['itl_p50'], 1e3, 2)} | "
            f"{_f(r['itl_p99'], 1e3, 2)} | {_f(r['tpot_p50'], 1e3, 2)} | {_f(r['e2e_p50'], nd=2)} | "
            f"{r['decode_steps'] if eng else '–'} | {_f(r['mean_decode_batch']) if eng else '–'} | "
            f"{_f(r['decode_step_ms'], nd=2) if eng else '–'} | {_f(r['prefill_s'], nd=2) if eng else '–'} | "
            f"{r['preemptions']} | {r['setup_s']:.1f} |")
    ratios = ratio_lines(rows)
    tail = ("\n\nRatios (same mode and concurrency):\n\n" + "\n".join(ratios)) if ratios else ""
    msgs = ("\n\n" + "\n".join(f"- {m}" for m in messages)) if messages else ""
    return head + "\n".join(table) + tail + msgs + "\n"


def plot(rows: list[dict], variants: list[str], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v in variants:
        for mode, style in (("engine", "-"), ("http", "--")):
            rs = [r for r in rows if r["variant"] == v and r["mode"] == mode]
            if not rs:
                continue
            lab = f"{v} ({mode})"
            axes[0].plot([r["concurrency"] for r in rs], [r["tok_s"] for r in rs], style, marker="o", label=lab)
            axes[1].plot([r["concurrency"] for r in rs], [1e3 * r["itl_p50"] for r in rs], style, marker="o",
                         label=lab)
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("ITL p50 (ms)")
    for ax in axes:
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("engine", "http", "both"), default="engine")
    ap.add_argument("--variants", default="gqa-4,gta-4,mla,gla-2")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--num-requests", type=int, default=0, help="requests per row (0 = the row's concurrency)")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--kv-memory", type=float, default=40.0, help="GiB of KV pool per variant (same for all)")
    ap.add_argument("--page-size", type=int, default=None, help="default: the engine's (EngineConfig.page_size)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192,
                    help="tokens per engine step (prefill chunks + decodes)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the engine's decode step and prefill (default: the engine's, on with CUDA)")
    ap.add_argument("--prefill-compile", choices=PREFILL_COMPILE, default="layer",
                    help="with compile: prefill compiled per decoder layer (default) or as one graph of the model")
    ap.add_argument("--no-overlap", action="store_true",
                    help="read each decode step's tokens before launching the next (A/B of the overlapped decode)")
    ap.add_argument("--time-budget", type=float, default=float("inf"),
                    help="seconds for the whole run; work that would not fit is skipped with a message")
    ap.add_argument("--progress-every", type=float, default=20.0, help="seconds between progress lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of each server (http mode)")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas behind a router (http mode)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if (args.tp > 1 or args.dp > 1) and args.mode != "http":
        ap.error("--tp / --dp run through `kvslim serve`: use --mode http")
    t_start = time.perf_counter()
    deadline = t_start + args.time_budget
    args.max_model_len = args.input_len + args.output_len + (args.page_size or 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    concs = [int(c) for c in args.concurrency.split(",")]
    modes = ("engine", "http") if args.mode == "both" else (args.mode,)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{time.strftime('%Y-%m-%d')}_serve_{name.replace(' ', '_')}")
    title = f"{name}: {args.shape} random-weight models, in {args.input_len} / out {args.output_len}"
    notes = check_exact(device, variants)
    for line in notes:
        log(line)
    log(f"exactness gate took {time.perf_counter() - t_start:.1f} s")
    rows: list[dict] = []
    messages: list[str] = []

    def save() -> None:
        with open(stem + ".md", "w") as f:
            f.write(render(args, name, notes, rows, messages))
        with open(stem + ".json", "w") as f:
            json.dump(dict(args=vars(args) | {"time_budget": str(args.time_budget)}, notes=notes, rows=rows,
                           messages=messages), f, indent=1)

    def emit(row: dict) -> None:
        rows.append(row)
        log(json.dumps(row))
        save()

    est: dict = {}
    for v in variants:
        sh = SHAPES[args.shape]
        preset, kv = split_variant(v)
        spec = AttentionSpec.preset(preset, num_heads=sh["heads"], head_dim=sh["head_dim"], hidden_size=sh["hidden"])
        bpt = page_bytes(spec, 1, 1, kv or getattr(torch, args.dtype))
        for mode in modes:
            left = deadline - time.perf_counter()
            setup_guess = est.get((mode, "setup"), 0.0)
            row_guess = min((t for k, t in est.items() if k[0] == mode and k[1] != "setup"), default=0.0)
            if left <= setup_guess + row_guess:
                msg = (f"{v} ({mode}) SKIPPED: {max(0.0, left):.0f} s of the {args.time_budget:.0f} s time budget "
                       f"left" + (f", setup alone took ~{setup_guess:.0f} s" if setup_guess else ""))
                log(msg)
                messages.append(msg)
                save()
                continue
            t0 = time.perf_counter()
            n_before = len(rows)
            try:
                if mode == "engine":
                    engine_rows(args, v, bpt, device, concs, deadline, est, emit)
                else:
                    http_rows(args, v, bpt, concs, deadline, est, emit)
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                msg = f"{v} ({mode}) FAILED: {type(e).__name__}: {e}"
                log(msg)
                messages.append(msg)
                save()
            if len(rows) > n_before:
                est[(mode, "setup")] = max(est.get((mode, "setup"), 0.0), rows[-1]["setup_s"])
            log(f"[{v}] {mode} done in {time.perf_counter() - t0:.1f} s; {time.perf_counter() - t_start:.0f} s "
                f"since start")
        if rows:
            plot(rows, variants, title, stem + ".png")
    save()
    log(render(args, name, notes, rows, messages))
    log(f"wrote {stem}.md, {stem}.json and {stem}.png in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
