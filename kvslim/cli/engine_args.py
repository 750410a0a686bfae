"""Flags shared by ``generate``, ``serve`` and ``bench serve``, and their one translation to configs.

:func:`configs_from_args` turns the parsed flags into the ``ModelSource``, ``EngineConfig``
and ``ServerConfig`` objects the engine takes; nothing below the CLI sees ``argparse``.
"""

from __future__ import annotations

import argparse
import os

from kvslim.engine.config import PREFILL_COMPILE, EngineConfig, ServerConfig
from kvslim.engine.source import SHAPES, ModelSource
from kvslim.runtime import DTYPES

API_KEY_ENV = "KVSLIM_API_KEY"


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="checkpoint dir (kvslim or Hugging Face; tokenizer files used) or "
                   "a known model: smollm2, qwen2.5-coder-0.5b")
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
    g.add_argument("--page-size", type=int, default=None,
                   help="tokens per page (default: 64 for MLA/GLA caches, 16 for the others, as measured)")
    g.add_argument("--kv-dtype", choices=["auto", "bf16", "fp16", "fp32", "fp8"], default="auto",
                   help="KV cache dtype (default auto = the model's; fp8 = e4m3 with a fp32 scale per token "
                        "per 128-channel tile, RoPE key in bf16: more pages, fewer bytes per step)")
    g.add_argument("--max-batch", type=int, default=64, help="running sequences at most (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    g.add_argument("--max-model-len", type=int, help="prompt + output limit (default: the model's)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly on CUDA")
    g.add_argument("--no-overlap", dest="overlap", action="store_false", default=True,
                   help="read each decode step's tokens before launching the next (default: greedy decode "
                        "steps launch step n+1 before reading step n)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step and prefill forwards (fuses norms, RoPE, casts around "
                        "the kernels; slower start-up). Default: on with CUDA, off on CPU")
    g.add_argument("--prefill-compile", choices=PREFILL_COMPILE, default="layer",
                   help="with --compile, compile prefill forwards per decoder layer (one graph every layer reuses: "
                        "start-up does not grow with depth; default) or as one graph of the whole model")
    g.add_argument("--fuse-projections", action="store_true",
                   help="one GEMM for q/k/v (or q + latent down-projection) and one for gate/up per layer")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    g.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true", default=True,
                   help="share the cached pages of equal prompt prefixes between requests (default on)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn prefix caching off")
    g.add_argument("--num-speculative-tokens", type=int, default=0, metavar="K",
                   help="n-gram (prompt lookup) proposals verified per decode step, 0-7 (default 0 = off)")
    g.add_argument("--prompt-lookup-min", type=int, default=1, help="shortest n-gram matched (default 1)")
    g.add_argument("--prompt-lookup-max", type=int, default=3, help="longest n-gram matched (default 3)")


def add_server_args(p: argparse.ArgumentParser, *, network: bool = True) -> None:
    g = p.add_argument_group("server")
    if network:
        g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
        g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
        g.add_argument("--model-name", help="name reported by the API (default: from --model)")
        g.add_argument("--dp", type=int, default=1, help="data-parallel engine replicas behind a router (default 1)")
        g.add_argument("--api-key", metavar="KEY",
                       help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; the variable keeps "
                            "the key out of the process list)")
        g.add_argument("--max-connections", type=int, default=1024,
                       help="connections served at once; more get 503 (default 1024)")
        g.add_argument("--read-timeout", type=float, default=30.0,
                       help="seconds for a request's headers and body together, else 408 (default 30)")
        g.add_argument("--write-timeout", type=float, default=60.0,
                       help="seconds one write to a client may block before it counts as gone (default 60)")
    g.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503 (default 1024)")
    g.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in a thread of the server process (default: its own process)")


def source_from_args(args) -> ModelSource | None:
    """The model recipe of ``--model`` / ``--random-model`` (None when neither is given)."""
    if args.model is None and args.random_model is None:
        return None
    from kvslim.eval.models import resolve_model_dir

    return ModelSource(path=resolve_model_dir(args.model), preset=args.random_model, shape=args.model_shape, seed=args.seed)


def engine_config_from_args(args) -> EngineConfig:
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    return EngineConfig(
        num_pages=args.num_pages, kv_memory_gib=args.kv_memory, mem_util=args.mem_util, page_size=args.page_size,
        max_batch=args.max_batch, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, cuda_graphs=False if args.no_cuda_graphs else None,
        compile=args.compile, prefill_compile=getattr(args, "prefill_compile", "layer"),
        fuse_projections=getattr(args, "fuse_projections", False),
        kv_dtype=None if args.kv_dtype == "auto" else args.kv_dtype,
        device=args.device or "auto", dtype=args.dtype, tp=args.tp,
        enable_prefix_caching=getattr(args, "prefix_caching", True),
        num_speculative_tokens=getattr(args, "num_speculative_tokens", 0),
        prompt_lookup_min=getattr(args, "prompt_lookup_min", 1), prompt_lookup_max=getattr(args, "prompt_lookup_max", 3),
        overlap=getattr(args, "overlap", True),
    )


def api_key_from_args(args) -> str | None:
    """``--api-key``, else ``$KVSLIM_API_KEY``, else None (no auth)."""
    return getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None


def server_config_from_args(args) -> ServerConfig:
    d = ServerConfig()
    return ServerConfig(
        host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 0),
        model_name=getattr(args, "model_name", None), max_waiting=args.max_waiting, dp=getattr(args, "dp", 1),
        engine_in_process=args.engine_in_process, api_key=api_key_from_args(args),
        max_connections=getattr(args, "max_connections", d.max_connections),
        read_timeout=getattr(args, "read_timeout", d.read_timeout),
        write_timeout=getattr(args, "write_timeout", d.write_timeout),
    )
