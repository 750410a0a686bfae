"""``kvslim bench serve``: load generator (TTFT / ITL / E2E percentiles, throughput, table + PNG)."""

from __future__ import annotations

import math

from kvslim.checkpoint import check_output_file
from kvslim.cli import engine_args as ea


def add(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: 'bench serve' loads a server (TTFT, ITL, E2E, tok/s)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    s = sub.add_parser("serve", help="load generator against a server (or one started in-process)")
    s.add_argument("--url", help="server to load (default: start one in-process from the model/engine flags)")
    ea.add_model_args(s)
    ea.add_engine_args(s)
    ea.add_server_args(s, network=False)
    g = s.add_argument_group("load")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    g.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals, req/s (default inf)")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--input-range", type=float, default=0.0, help="uniform +- fraction of --input-len")
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--output-range", type=float, default=0.0, help="uniform +- fraction of --output-len")
    g.add_argument("--load-seed", type=int, default=0)
    g.add_argument("--api-key", metavar="KEY", help="send 'Authorization: Bearer KEY' (default: $KVSLIM_API_KEY)")
    g.add_argument("--plot", metavar="PNG", help="save TTFT/ITL/E2E CDFs")
    g.add_argument("--json", metavar="PATH", help="save the summary as JSON")
    s.set_defaults(func=run)


def run(args) -> int:
    from kvslim.engine.bench import bench_serve

    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        if path:
            check_output_file(path, flag=flag)
    source = ea.source_from_args(args)
    summary = bench_serve(
        url=args.url, source=source, engine=ea.engine_config_from_args(args) if source else None,
        server=ea.server_config_from_args(args), plot=args.plot, json_path=args.json,
        num_requests=args.num_requests, concurrency=args.concurrency, request_rate=args.request_rate,
        input_len=args.input_len, input_range=args.input_range, output_len=args.output_len,
        output_range=args.output_range, seed=args.load_seed, api_key=ea.api_key_from_args(args),
    )
    return 0 if summary["completed"] == summary["num_requests"] else 1
