"""The library calls behind ``kvslim serve`` and ``kvslim generate``.

* :func:`launch`: an HTTP server over an engine (in its own process by default, or in a thread);
* :func:`serve`: :func:`launch` (or a data-parallel router over ``dp`` replicas) until interrupted;
* :func:`generate`: one request through the engine, streamed as text.
"""

from __future__ import annotations

import sys
import time

from kvslim.engine.build import EngineBundle, build_engine
from kvslim.engine.config import EngineConfig, ServerConfig
from kvslim.engine.scheduler import SamplingParams, Sequence
from kvslim.engine.source import ModelSource
from kvslim.eval.tokenizer import open_tokenizer


def launch(source: ModelSource, engine: EngineConfig, server: ServerConfig, *, tokenizer=None):
    """Start a server over the engine of ``(source, engine)``; returns ``(Server, bundle or None)``.

    With ``server.engine_in_process`` the engine runs in a thread of this process (the bundle
    is returned so that its TP group can be closed); otherwise in a process of its own.
    """
    from kvslim.engine.loop import EngineLoop
    from kvslim.engine.process import EngineProcess
    from kvslim.engine.server import Server

    bundle = None
    if server.engine_in_process:
        bundle = build_engine(source, engine, tokenizer=tokenizer)
        loop, tok = EngineLoop(bundle.engine, max_waiting=server.max_waiting), bundle.tokenizer
    else:
        tok = open_tokenizer(tokenizer if tokenizer is not None else source.path)
        loop = EngineProcess(source, engine, tokenizer=tokenizer, max_waiting=server.max_waiting)
    srv = Server(loop, tok, host=server.host, port=server.port, model_name=server.model_name or source.name,
                 request_timeout=server.request_timeout, **server.http_options)
    return srv.start(), bundle


def serve(*, source: ModelSource, engine: EngineConfig, server: ServerConfig, tokenizer=None,
          on_ready=None) -> int:
    """Serve until interrupted (Ctrl-C / SIGTERM) or the engine stops; ``on_ready(port)`` once listening."""
    if server.dp > 1:
        from kvslim.engine.router import run_router

        return run_router(source, engine, server, tokenizer=tokenizer, on_ready=on_ready)
    srv, bundle = launch(source, engine, server, tokenizer=tokenizer)
    try:
        s = srv.loop.stats()
        print(f"kvslim serve: {srv.url} | model {srv.model_name} | {s['num_pages']} pages x "
              f"{s['page_size']} tokens | kv {s['kv_dtype']} ({s['kv_bytes_per_token']} B/token) | "
              f"max_model_len {s['max_model_len']} | tp {engine.tp} | "
              f"cuda graphs {s['cuda_graphs']} | engine {'thread' if server.engine_in_process else 'process'} | "
              f"api key {'on' if server.api_key else 'off'}", flush=True)
        if on_ready is not None:
            on_ready(srv.port)
        while srv.loop.alive:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        srv.shutdown()
        if bundle is not None:
            bundle.close()
    return 0


def generate(*, source: ModelSource, engine: EngineConfig, params: SamplingParams, prompt: str | None = None,
             tokens: list[int] | None = None, tokenizer=None, out=None, err=None) -> Sequence:
    """Generate for one prompt (``prompt`` text or ``tokens`` ids), streaming the text to ``out``."""
    from kvslim.engine.server import TextStream

    out = out or sys.stdout
    err = err or sys.stderr
    if (prompt is None) == (tokens is None):
        raise ValueError("give exactly one of --prompt TEXT or --tokens IDS")
    bundle: EngineBundle = build_engine(source, engine, tokenizer=tokenizer)
    try:
        tok = bundle.tokenizer
        if prompt is not None:
            if tok is None:
                raise ValueError("--prompt needs a tokenizer (--model DIR with tokenizer files, or --tokenizer)")
            ids = tok.encode(prompt)
        else:
            ids = list(tokens)
        text = TextStream(tok, [])

        def on_event(seq, t):
            out.write(text.feed(t))
            out.flush()

        t0 = time.perf_counter()
        seq = bundle.engine.add_request(ids, params, listener=on_event)
        while bundle.engine.has_unfinished():
            bundle.engine.step()
        dt = time.perf_counter() - t0
        out.write("\n")
        print(f"[{len(ids)} prompt + {len(seq.output)} new tokens in {dt:.2f} s, "
              f"{len(seq.output) / dt:.1f} tok/s, finish: {seq.finish_reason}]", file=err)
        return seq
    finally:
        bundle.close()
