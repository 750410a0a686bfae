"""The engine's CLI commands: ``kvslim generate``, ``kvslim serve``, ``kvslim bench serve``.

``kvslim/cli.py`` registers them; this module holds their flags and bodies so the CLI
file stays a thin list. Data parallelism (``--dp M``) starts M server processes (each
an engine, tensor-parallel over ``--tp N`` GPUs of its own) and puts
:mod:`kvslim.engine.router` in front of them on the requested port.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from kvslim.engine.source import SHAPES, ModelSource, load_tokenizer


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="checkpoint dir (kvslim or Hugging Face; tokenizer files used)")
    g.add_argument("--random-model", metavar="PRESET",
                   help="random weights with this attention, e.g. gqa-4, gta-4, mla, gla-2 (speed benchmarks)")
    g.add_argument("--model-shape", choices=sorted(SHAPES), default="small",
                   help="shape of a --random-model (default small; 1b ~ 1.4B params)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir (default: --model)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, else float32")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--num-pages", type=int, help="KV pages per layer pool (default: sized from memory)")
    g.add_argument("--kv-memory", type=float, metavar="GIB", help="GiB for the KV pool (per rank)")
    g.add_argument("--mem-util", type=float, default=0.9, help="GPU memory fraction to fill (default 0.9)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per page (default 16)")
    g.add_argument("--max-batch", type=int, default=64, help="running sequences at most (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    g.add_argument("--max-model-len", type=int, help="prompt + output limit (default: the model's)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly on CUDA")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    g.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in a thread of the server process (default: its own process)")
    g.add_argument("--device-offset", type=int, default=0, help=argparse.SUPPRESS)


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_engine(args):
    """(engine, tokenizer, tp session or None, model name) from the parsed flags."""
    from kvslim.engine.engine import LLMEngine
    from kvslim.engine.tp import TPSession

    device = _device(args)
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    source = ModelSource(path=args.model, preset=args.random_model, shape=args.model_shape, seed=args.seed,
                         dtype=dtype, max_len=max(4096, args.max_model_len or 0))
    tok_dir = args.tokenizer or args.model
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    session = None
    if args.tp > 1:
        session = TPSession(args.tp, device=device, device_offset=args.device_offset)
        model = session.load(source)
    else:
        dev = f"cuda:{args.device_offset}" if device == "cuda" else device
        if device == "cuda":
            torch.cuda.set_device(dev)
        model = source.build(dev)
    if args.num_pages is None and args.kv_memory is None and device != "cuda":
        raise ValueError("on CPU give --num-pages or --kv-memory to size the KV pool")
    try:
        engine = LLMEngine(
            model, num_pages=args.num_pages,
            kv_memory=None if args.kv_memory is None else int(args.kv_memory * 2**30),
            page_size=args.page_size, max_batch=args.max_batch, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, cuda_graphs=False if args.no_cuda_graphs else None,
            mem_util=args.mem_util, eos_token_id=tokenizer.eos_token_id if tokenizer else None, tp=session,
        )
    except BaseException:
        if session is not None:
            session.close()
        raise
    name = os.path.basename(os.path.normpath(args.model)) if args.model else f"random-{args.random_model}"
    return engine, tokenizer, session, name


# ---------------------------------------------------------------------- generate
def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_engine_args(p)
    g = p.add_argument_group("request")
    g.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    g.add_argument("--tokens", help="prompt as comma-separated token ids (tokenizer-less models)")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--sample-seed", type=int, help="per-request sampling seed")
    g.add_argument("--stop-token-ids", help="comma-separated ids that end generation")


def run_generate(args) -> int:
    from kvslim.engine.scheduler import SamplingParams
    from kvslim.engine.server import TextStream

    if (args.prompt is None) == (args.tokens is None):
        raise ValueError("give exactly one of --prompt TEXT or --tokens IDS")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.sample_seed,
        stop_token_ids=tuple(int(t) for t in args.stop_token_ids.split(",")) if args.stop_token_ids else (),
    )
    engine, tok, session, _ = build_engine(args)
    try:
        if args.prompt is not None:
            if tok is None:
                raise ValueError("--prompt needs a tokenizer (--model DIR with tokenizer files, or --tokenizer)")
            ids = tok.encode(args.prompt)
        else:
            try:
                ids = [int(t) for t in args.tokens.split(",") if t.strip()]
            except ValueError:
                raise ValueError(f"--tokens must be comma-separated ints, got {args.tokens!r}") from None
        text = TextStream(tok, [])

        def on_event(seq, t):
            sys.stdout.write(text.feed(t))
            sys.stdout.flush()

        t0 = time.perf_counter()
        seq = engine.add_request(ids, params, listener=on_event)
        while engine.has_unfinished():
            engine.step()
        dt = time.perf_counter() - t0
        sys.stdout.write("\n")
        print(f"[{len(ids)} prompt + {len(seq.output)} new tokens in {dt:.2f} s, "
              f"{len(seq.output) / dt:.1f} tok/s, finish: {seq.finish_reason}]", file=sys.stderr)
    finally:
        if session is not None:
            session.close()
    return 0


# ------------------------------------------------------------------------- serve
def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    g.add_argument("--model-name", help="name reported by the API (default: from --model)")
    g.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503 (default 1024)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel engine replicas behind a router (default 1)")
    g.add_argument("--port-file", help=argparse.SUPPRESS)


def _child_argv(args) -> list[str]:
    """Flags of one data-parallel replica (a ``kvslim serve`` of its own)."""
    out = []
    for flag, val in (("--model", args.model), ("--random-model", args.random_model),
                      ("--model-shape", args.model_shape), ("--seed", args.seed), ("--tokenizer", args.tokenizer),
                      ("--device", args.device), ("--dtype", args.dtype), ("--num-pages", args.num_pages),
                      ("--kv-memory", args.kv_memory), ("--mem-util", args.mem_util),
                      ("--page-size", args.page_size), ("--max-batch", args.max_batch),
                      ("--max-num-batched-tokens", args.max_num_batched_tokens),
                      ("--max-model-len", args.max_model_len), ("--tp", args.tp),
                      ("--model-name", args.model_name), ("--max-waiting", args.max_waiting)):
        if val is not None:
            out += [flag, str(val)]
    if args.no_cuda_graphs:
        out.append("--no-cuda-graphs")
    if args.engine_in_process:
        out.append("--engine-in-process")
    return out


def start_from_args(args, *, host: str = "127.0.0.1", port: int = 0):
    """(started Server, TP session or None): the engine in its own process unless --engine-in-process."""
    from kvslim.engine.loop import EngineLoop
    from kvslim.engine.process import EngineProcess
    from kvslim.engine.server import Server

    max_waiting = getattr(args, "max_waiting", 1024)
    if args.engine_in_process:
        engine, tok, session, name = build_engine(args)
        loop = EngineLoop(engine, max_waiting=max_waiting)
    else:
        tok_dir = args.tokenizer or args.model
        tok = load_tokenizer(tok_dir) if tok_dir else None
        loop, session = EngineProcess(args, max_waiting=max_waiting), None
        name = loop.name
    model_name = getattr(args, "model_name", None) or name
    return Server(loop, tok, host=host, port=port, model_name=model_name).start(), session


def run_serve(args) -> int:
    if args.dp < 1:
        raise ValueError(f"--dp must be >= 1, got {args.dp}")
    if args.dp > 1:
        from kvslim.engine.router import run_router

        return run_router(_child_argv(args), dp=args.dp, tp=args.tp, host=args.host, port=args.port,
                          port_file=args.port_file)
    srv, session = start_from_args(args, host=args.host, port=args.port)
    s = srv.loop.stats()
    print(f"kvslim serve: {srv.url} | model {srv.model_name} | {s['num_pages']} pages x "
          f"{s['page_size']} tokens | max_model_len {s['max_model_len']} | tp {args.tp} | "
          f"cuda graphs {s['cuda_graphs']} | engine {'thread' if args.engine_in_process else 'process'}",
          flush=True)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(srv.port))
        os.replace(args.port_file + ".tmp", args.port_file)
    try:
        while srv.loop.alive:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        srv.shutdown()
        if session is not None:
            session.close()
    return 0


# --------------------------------------------------------------------- bench serve
def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server to load (default: start one in-process from the model/engine flags)")
    add_model_args(p)
    add_engine_args(p)
    g = p.add_argument_group("load")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    g.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals, req/s (default inf)")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--input-range", type=float, default=0.0, help="uniform +- fraction of --input-len")
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--output-range", type=float, default=0.0, help="uniform +- fraction of --output-len")
    g.add_argument("--load-seed", type=int, default=0)
    g.add_argument("--plot", metavar="PNG", help="save TTFT/ITL/E2E CDFs")
    g.add_argument("--json", metavar="PATH", help="save the summary as JSON")


def run_bench_serve(args) -> int:
    import json

    from kvslim.engine.bench import format_summary, plot_summary, run_bench

    srv = session = None
    url = args.url
    if url is None:
        if args.model is None and args.random_model is None:
            raise ValueError("give --url of a running server, or --model/--random-model to start one")
        srv, session = start_from_args(args)
        url = srv.url
    try:
        summary = run_bench(url, num_requests=args.num_requests, concurrency=args.concurrency,
                            request_rate=args.request_rate, input_len=args.input_len, input_range=args.input_range,
                            output_len=args.output_len, output_range=args.output_range, seed=args.load_seed)
    finally:
        if srv is not None:
            srv.shutdown()
        if session is not None:
            session.close()
    print(format_summary(summary))
    if args.plot:
        print(f"plot: {plot_summary(summary, args.plot)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "_raw"}, f, indent=2)
    return 0 if summary["completed"] == summary["num_requests"] else 1
