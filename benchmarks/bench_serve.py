"""Serving benchmark: GQA vs GTA vs MLA vs GLA at equal model shape through the HTTP server.

For each attention variant: a random-weight model of one shape (default ``1b``), an
engine whose KV pool fills the same memory (so smaller bytes/token => more pages), a
live server on 127.0.0.1, and the load generator of ``kvslim bench serve`` at each
concurrency (the server in its own process, the load from this one). First a correctness gate: on the same device, the engine (CUDA graphs on)
must produce the greedy tokens of ``model.generate`` (fp32 ``tiny`` models).

    python benchmarks/bench_serve.py --variants gqa-4,gta-4,mla,gla-2 --concurrency 16,64 \
        --num-requests 128 --input-len 512 --output-len 256 --kv-memory 8

Prints a markdown table and writes it with a PNG under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

from kvslim.engine.allocator import page_bytes
from kvslim.engine.bench import run_bench
from kvslim.engine.engine import LLMEngine, SamplingParams
from kvslim.engine.source import SHAPES, random_model
from kvslim.spec import AttentionSpec


def _metrics(url: str) -> dict:
    host, port = url.rsplit("/", 1)[-1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    return dict(line.split() for line in text.splitlines() if line and not line.startswith("#"))


def check_exact(device: str, variants: list[str]) -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    for v in variants:
        m = random_model(v, "tiny", device=device)
        ref = m.generate(prompts, max_new_tokens=16)
        eng = LLMEngine(m, num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=16)
        out = eng.generate(prompts, SamplingParams(max_tokens=16), arrival_steps=[0, 0, 2, 3, 5, 9])
        same = sum(a == b for a, b in zip(out, ref))
        lines.append(f"exactness {v}: {same}/{len(ref)} sequences equal model.generate "
                     f"(cuda graphs {eng.runner.use_graphs})")
        del m, eng
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="gqa-4,gta-4,mla,gla-2")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--kv-memory", type=float, default=8.0, help="GiB of KV pool per variant (same for all)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    concs = [int(c) for c in args.concurrency.split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    notes = check_exact(device, variants)
    for line in notes:
        print(line, flush=True)
    rows = []
    for v in variants:
        sh = SHAPES[args.shape]
        spec = AttentionSpec.preset(v, num_heads=sh["heads"], head_dim=sh["head_dim"], hidden_size=sh["hidden"])
        bpt = page_bytes(spec, 1, 1, getattr(torch, args.dtype))
        t0 = time.perf_counter()
        # the server runs in its own process so the load generator does not share its GIL
        with tempfile.TemporaryDirectory() as tmp:
            pf = os.path.join(tmp, "port")
            cmd = [sys.executable, "-m", "kvslim", "serve", "--random-model", v, "--model-shape", args.shape,
                   "--dtype", args.dtype, "--kv-memory", str(args.kv_memory), "--page-size", str(args.page_size),
                   "--max-batch", str(args.max_batch), "--max-num-batched-tokens", str(max(2048, args.input_len)),
                   "--max-model-len", str(args.input_len + args.output_len + 64), "--port", "0",
                   "--port-file", pf] + (["--no-cuda-graphs"] if args.no_cuda_graphs else [])
            proc = subprocess.Popen(cmd, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
            try:
                while not os.path.exists(pf):
                    if proc.poll() is not None or time.perf_counter() - t0 > 600:
                        raise RuntimeError(f"server for {v} did not start")
                    time.sleep(0.2)
                with open(pf) as f:
                    url = f"http://127.0.0.1:{int(f.read())}"
                setup = time.perf_counter() - t0
                for c in concs:
                    s = run_bench(url, num_requests=args.num_requests, concurrency=c, input_len=args.input_len,
                                  output_len=args.output_len, progress=False)
                    m = _metrics(url)
                    rows.append(dict(variant=v, bytes_per_token_layer=bpt, pages=int(m["kvslim_kv_pages_total"]),
                                     concurrency=c, completed=s["completed"], tok_s=s["output_throughput"],
                                     ttft_p50=s["ttft_s"]["p50"], ttft_p99=s["ttft_s"]["p99"],
                                     itl_p50=s["itl_s"]["p50"], itl_p99=s["itl_s"]["p99"],
                                     e2e_p50=s["e2e_s"]["p50"], preemptions=int(m["kvslim_preemptions_total"]),
                                     setup_s=setup, errors=s["errors"][:2]))
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    head = (f"# serving benchmark — {name}, shape {args.shape} {args.dtype}, KV pool {args.kv_memory} GiB, "
            f"{args.num_requests} requests, input {args.input_len}, output {args.output_len}\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n")
    table = ["| variant | B/token/layer | pages | conc | done | out tok/s | TTFT p50 ms | TTFT p99 ms | "
             "ITL p50 ms | ITL p99 ms | E2E p50 s | preempt |", "|" + "---|" * 12]
    for r in rows:
        table.append(f"| {r['variant']} | {r['bytes_per_token_layer']} | {r['pages']} | {r['concurrency']} | "
                     f"{r['completed']} | {r['tok_s']:.0f} | {1e3 * r['ttft_p50']:.1f} | {1e3 * r['ttft_p99']:.1f} | "
                     f"{1e3 * r['itl_p50']:.2f} | {1e3 * r['itl_p99']:.2f} | {r['e2e_p50']:.2f} | "
                     f"{r['preemptions']} |")
    text = head + "\n".join(table) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{time.strftime('%Y-%m-%d')}_serve_{name.replace(' ', '_')}")
    with open(stem + ".md", "w") as f:
        f.write(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        axes[0].plot([r["concurrency"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=v)
        axes[1].plot([r["concurrency"] for r in rs], [1e3 * r["itl_p50"] for r in rs], marker="o", label=v)
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("ITL p50 (ms)")
    for ax in axes:
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{name}: {args.shape} random-weight models, in {args.input_len} / out {args.output_len}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.md and {stem}.png")


if __name__ == "__main__":
    main()
