"""Where one engine step's wall time goes, inside the engine (issue 13): a profiler trace of a step.

The serving sweep of 2026-12-07 (H100) measured steps that prefill at ~157 ms, where their parts,
measured alone (decode graph, compiled prefill forwards, host work), add up to ~60 ms. This script
reproduces the sweep's load (``--requests`` prompts of ``--input-len`` arriving at once, the same
token budget) on the engine in this process and, for the steps picked by ``--trace-steps``, records:

* the step's wall time, its decode batch and prefill tokens, the prefill forwards it ran
  (batch x length, history known or not);
* Dynamo's compile counters before and after (a new graph inside a step = a recompile);
* a ``torch.profiler`` table (CPU + CUDA activities) of the step: the top ops by self CPU time
  and by device time, so host stalls (syncs, allocator, guards, Python) show next to the kernels.

    python -m benchmarks.engine_step_trace --variant gqa-4 --trace-steps 5,6,40 --out OUT
    python -m benchmarks.engine_step_trace --shape tiny --device cpu --requests 8 --input-len 64  # smoke run

Writes ``engine_step_trace_<variant>.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def compile_stats() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - a torch without Dynamo: no counters to report
        return {}
    return dict(counters.get("stats", {}))


def build(args):
    from kvslim.engine.config import EngineConfig
    from kvslim.engine.engine import LLMEngine
    from kvslim.engine.source import ModelSource

    model = ModelSource(preset=args.variant, shape=args.shape, dtype=args.dtype,
                        max_len=max(4096, args.input_len + args.output_len + 64)).build(args.device)
    cfg = EngineConfig(kv_memory_gib=args.kv_memory, max_batch=args.max_batch,
                       max_num_batched_tokens=args.budget, max_model_len=args.input_len + args.output_len + 64,
                       device=args.device, compile=args.compile)
    return LLMEngine(model, cfg)


def add_requests(engine, n: int, input_len: int, output_len: int, seed: int) -> None:
    from kvslim.engine.scheduler import SamplingParams

    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    for _ in range(n):
        engine.add_request(torch.randint(0, vocab, (input_len,), generator=g).tolist(),
                           SamplingParams(max_tokens=output_len, ignore_eos=True))


def trace(engine, steps: set[int], max_steps: int, sync) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    forwards: list[str] = []
    prefill = engine.runner.prefill

    def logged(chunks, starts, pages):  # record each prefill forward of the step
        forwards.append(f"{len(chunks)}x{len(chunks[0])} start {'=' if min(starts) == max(starts) else '!='}"
                        f"{starts[0]}")
        return prefill(chunks, starts, pages)

    engine.runner.prefill = logged
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    out = []
    for i in range(max_steps):
        if not engine.has_unfinished():
            break
        forwards.clear()
        before = compile_stats()
        if i in steps:
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                engine.step()
                sync()
                wall = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            engine.step()
            sync()
            wall = time.perf_counter() - t0
        after = compile_stats()
        n_dec, n_pre = engine.last_step
        line = (f"step {i}: {wall * 1e3:8.2f} ms  decode batch {n_dec}  prefill tokens {n_pre}  "
                f"forwards [{', '.join(forwards)}]")
        if after != before:
            line += f"  COMPILED: {before} -> {after}"
        out.append(line)
        print(line, flush=True)
        if i in steps:
            for key in ("self_cpu_time_total", "self_device_time_total"):
                try:
                    table = prof.key_averages().table(sort_by=key, row_limit=25)
                except Exception as e:  # noqa: BLE001 - a sort key this torch does not know
                    table = f"({key}: {e})"
                out += [f"--- step {i}, top ops by {key}", table]
    engine.runner.prefill = prefill
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="gqa-4")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv-memory", type=float, default=40.0)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens (the sweep's 8192)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=64, help="requests of a warm-up round (compiles, graphs)")
    ap.add_argument("--trace-steps", default="3,10,40", help="steps to profile (0-based, after the warm-up)")
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    engine = build(args)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    add_requests(engine, args.warmup, args.input_len, 4, seed=1)
    while engine.has_unfinished():
        engine.step()
    sync()
    head = [f"# engine step trace: {args.variant} {args.shape} {args.dtype} on {engine.device} "
            f"({torch.cuda.get_device_name() if engine.device.type == 'cuda' else 'CPU'}), torch {torch.__version__}",
            f"page {engine.allocator.page_size}, compile {engine.runner.compiled}, overlap {engine.pipeline.enabled}, "
            f"warm-up {args.warmup} requests {time.perf_counter() - t0:.1f} s, compile stats {compile_stats()}"]
    print("\n".join(head), flush=True)
    add_requests(engine, args.requests, args.input_len, args.output_len, seed=0)
    steps = {int(s) for s in args.trace_steps.split(",") if s.strip()}
    lines = head + trace(engine, steps, args.max_steps, sync)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_step_trace_{args.variant}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
