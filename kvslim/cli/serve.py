"""``kvslim serve``: the OpenAI-compatible HTTP server (``--tp N`` ranks, ``--dp M`` replicas)."""

from __future__ import annotations

import argparse
import os

from kvslim.cli import engine_args as ea


def add(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE, metrics)",
                              description="Serve a model over HTTP with continuous batching; --tp N, --dp M.")
    ea.add_model_args(p)
    ea.add_engine_args(p)
    ea.add_server_args(p)
    p.add_argument("--port-file", help=argparse.SUPPRESS)  # scripts/tests: the port, written once listening
    p.set_defaults(func=run)


def _write_port(path: str):
    def on_ready(port: int) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(path + ".tmp", path)
    return on_ready


def run(args) -> int:
    from kvslim.engine.serve import serve

    source = ea.source_from_args(args)
    if source is None:
        raise ValueError("give --model DIR or --random-model PRESET")
    return serve(source=source, engine=ea.engine_config_from_args(args), server=ea.server_config_from_args(args),
                 tokenizer=args.tokenizer, on_ready=_write_port(args.port_file) if args.port_file else None)
