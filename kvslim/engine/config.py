"""Engine and server configuration: frozen, validated dataclasses carried everywhere as objects.

``EngineConfig`` goes from the CLI (or a library caller) to :func:`kvslim.engine.build.build_engine`,
to the engine process, to every tensor-parallel rank and data-parallel replica — pickled,
never rebuilt from command-line flags (nano-vllm's ``Config`` plays this part). ``ServerConfig``
holds what only the HTTP front needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from kvslim.engine.speculative import MAX_SPECULATIVE_TOKENS
from kvslim.rows import kv_dtype_name
from kvslim.runtime import DTYPES

#: decode batch sizes captured as CUDA graphs (clipped to ``max_batch``, which is always added). No 1: a lone
#: sequence replays the batch-2 graph with one padded row (the same weight bytes, one scratch row of KV),
#: because under torch.compile a batch of 1 is a specialisation of its own, one more compile of the whole
#: decode step at start-up (Dynamo specialises sizes 0 and 1 even with dynamic=True)
DEFAULT_GRAPH_BATCHES = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
DEVICES = ("auto", "cpu", "cuda")
#: what a compiled runner compiles for a prefill / verify forward: ``layer`` one decoder layer (every layer of
#: every runner reuses the graph: the layers share their code, their weights and pools are inputs), ``model``
#: the whole forward as one graph. Each prefill guard set (batch 1 or more, chunk length <= MAX_Q_LEN or
#: longer, first chunk, history or unequal starts) is a compile of its own, and a compile of the whole model
#: grows with its depth: on the H100 (2026-12-07) an MLA serve run's engine set-up did not finish in 235 s.
#: The decode step is always compiled whole (once, then captured in CUDA graphs).
PREFILL_COMPILE = ("layer", "model")


def _int(name: str, v, lo: int = 1, *, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _num(name: str, v, *, lo: float = 0.0, hi: float = math.inf, optional: bool = False, open_lo=True) -> None:
    if v is None and optional:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not ((v > lo if open_lo else v >= lo) and v <= hi):
        raise ValueError(f"{name} must be a finite number in {'(' if open_lo else '['}{lo}, {hi}], got {v!r}")


def default_page_size(spec) -> int:
    """Tokens per page when none is given: 64 for latent caches (MLA/GLA), 16 for the others.

    Measured with ``benchmarks/engine_roofline.py`` (H100, 2026-12-07, ``1b`` shape, 2560 cached tokens,
    compiled, ``results/engine_roofline_NVIDIA_H100_80GB_HBM3.md``): at B=256 page 64 takes MLA's decode
    step from 10.51 to 8.75 ms and GLA-2's from 9.13 to 9.00 ms; GQA-4 (12.68 vs 12.90 ms) and GTA-4
    (8.14 vs 8.09 ms) are even, and a smaller page keeps prefix caching finer.
    """
    return 64 if spec.is_latent else 16


@dataclass(frozen=True)
class EngineConfig:
    """How one engine (one replica: one or ``tp`` devices) runs.

    Args:
        num_pages: KV pages per layer pool; else sized from ``kv_memory_gib``, else (CUDA) from
            free device memory x ``mem_util``.
        kv_memory_gib: GiB of KV pool per rank.
        mem_util: fraction of device memory the engine may fill (CUDA).
        page_size: tokens per page (None: :func:`default_page_size` of the model's attention).
        max_batch: running sequences at most (largest decode batch / CUDA graph).
        max_num_batched_tokens: tokens fed per step (the chunked-prefill budget).
        max_model_len: prompt + output limit (default: the model's, capped by the pool).
        cuda_graphs: capture decode in CUDA graphs (None: on CUDA).
        graph_batches: decode batch sizes to capture.
        compile: run the decode step and the prefill forwards through ``torch.compile`` (Inductor
            fuses the elementwise work around the kernels, which stay custom ops; compiled before graph
            capture, so it costs start-up time once). None: on CUDA (H100, 2026-12-07: a 4 x 2048-token
            prefill step 1.4-1.7x faster, the B=256 decode step 1.2-1.3x), off on CPU.
        prefill_compile: with ``compile``, what a prefill forward compiles: ``layer`` (one decoder layer,
            reused by every layer, so a compile does not grow with depth; the default) or ``model`` (the
            whole forward as one graph). See ``PREFILL_COMPILE``.
        fuse_projections: one GEMM for q/k/v (or q + latent down-projection) and one for gate+up
            in every layer (``Transformer.fuse_projections``; same weights, no extra memory). Off by
            default: on the H200 (2026-12-03, ``1b`` shape) it changed the decode step by -2..+2 %
            (``benchmarks/results/engine_roofline_NVIDIA_H200_fuse.md``).
        kv_dtype: KV cache dtype: ``bf16``, ``fp16``, ``fp32`` or ``fp8`` (packed e4m3 rows with
            per-token tile scales, ``kvslim.rows``); None: the model's dtype.
        seed: seed of the engine RNG for requests without a seed of their own.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: model dtype name (None: bfloat16 on CUDA, float32 on CPU).
        tp: tensor-parallel ranks.
        device_offset: first GPU of this engine (data-parallel replicas use disjoint GPUs).
        enable_prefix_caching: share the cached pages of equal prompt prefixes between requests
            (``kvslim/engine/prefix.py``; on by default, as in vLLM: exact, and its cost is one
            hash per full page).
        num_speculative_tokens: n-gram (prompt lookup) proposals verified per decode step (greedy:
            longest agreeing prefix; sampled: rejection sampling),
            0 = off, at most 7 (q_len = 1 + k <= 8); ``kvslim/engine/speculative.py``.
        prompt_lookup_min, prompt_lookup_max: n-gram lengths matched against the sequence's own
            tokens (longest first).
        overlap: launch decode step n+1 before reading step n's tokens when step n is decode-only and
            greedy (``kvslim/engine/overlap.py``; exact, on by default). Ignored under ``tp > 1`` and
            with speculative decoding, which stay synchronous.
    """

    num_pages: int | None = None
    kv_memory_gib: float | None = None
    mem_util: float = 0.9
    page_size: int | None = None
    max_batch: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    cuda_graphs: bool | None = None
    graph_batches: tuple[int, ...] = DEFAULT_GRAPH_BATCHES
    compile: bool | None = None
    prefill_compile: str = "layer"
    fuse_projections: bool = False
    kv_dtype: str | None = None
    seed: int | None = None
    device: str = "auto"
    dtype: str | None = None
    tp: int = 1
    device_offset: int = 0
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    overlap: bool = True

    def __post_init__(self) -> None:
        _int("num_pages", self.num_pages, 2, optional=True)
        _num("kv_memory_gib", self.kv_memory_gib, optional=True)
        _num("mem_util", self.mem_util, hi=1.0)
        _int("page_size", self.page_size, optional=True)
        _int("max_batch", self.max_batch)
        _int("max_num_batched_tokens", self.max_num_batched_tokens)
        _int("max_model_len", self.max_model_len, optional=True)
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be None, True or False, got {self.cuda_graphs!r}")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be None, True or False, got {self.compile!r}")
        if self.prefill_compile not in PREFILL_COMPILE:
            raise ValueError(f"prefill_compile must be one of {PREFILL_COMPILE}, got {self.prefill_compile!r}")
        if not isinstance(self.fuse_projections, bool):
            raise ValueError(f"fuse_projections must be True or False, got {self.fuse_projections!r}")
        batches = tuple(self.graph_batches)
        for b in batches:
            _int("graph_batches entries", b)
        object.__setattr__(self, "graph_batches", batches)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", kv_dtype_name(self.kv_dtype))
        _int("seed", self.seed, 0, optional=True)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        _int("tp", self.tp)
        _int("device_offset", self.device_offset, 0)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        _int("num_speculative_tokens", self.num_speculative_tokens, 0)
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be <= {MAX_SPECULATIVE_TOKENS} (q_len = 1 + k <= 8), "
                             f"got {self.num_speculative_tokens}")
        _int("prompt_lookup_min", self.prompt_lookup_min)
        _int("prompt_lookup_max", self.prompt_lookup_max)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True or False, got {self.overlap!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.resolved_device == "cuda" else "float32")

    @property
    def kv_memory_bytes(self) -> int | None:
        return None if self.kv_memory_gib is None else int(self.kv_memory_gib * 2**30)

    def replace(self, **changes) -> EngineConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front of ``kvslim serve``.

    Args:
        host, port: bind address (127.0.0.1 by default; port 0 = any free port). Binding
            elsewhere without ``api_key`` prints a warning.
        model_name: name reported by the API (default: from the model source).
        max_waiting: queued requests before new ones get 503.
        dp: data-parallel engine replicas behind a router.
        engine_in_process: run the engine in a thread of the server process (default: its own process).
        request_timeout: seconds a request may take before it is aborted (504).
        api_key: ``/v1/*`` requests must send ``Authorization: Bearer <api_key>`` (None: no auth;
            ``/health`` and ``/metrics`` stay open). Not shown in ``repr``.
        max_connections: connections served at once; more get 503 and are closed.
        read_timeout: seconds for a request's line, headers and body together (408 after).
        write_timeout: seconds one write to a client may block (a client that stopped reading has left).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    max_waiting: int = 1024
    dp: int = 1
    engine_in_process: bool = False
    request_timeout: float = 600.0
    api_key: str | None = field(default=None, repr=False)
    max_connections: int = 1024
    read_timeout: float = 30.0
    write_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        _int("port", self.port, 0)
        if self.port > 65535:
            raise ValueError(f"port must be <= 65535, got {self.port}")
        _int("max_waiting", self.max_waiting, 0)
        _int("dp", self.dp)
        _num("request_timeout", self.request_timeout)
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.isascii()
                                             and self.api_key.isprintable() and self.api_key.strip() == self.api_key
                                             and self.api_key and " " not in self.api_key):
            raise ValueError("api_key must be a non-empty string of printable ASCII without spaces "
                             "(it is sent as 'Authorization: Bearer <key>')")
        _int("max_connections", self.max_connections)
        _num("read_timeout", self.read_timeout)
        _num("write_timeout", self.write_timeout)

    @property
    def http_options(self) -> dict:
        """The keyword arguments of :class:`~kvslim.engine.server.Server` and the router's server."""
        return dict(api_key=self.api_key, max_connections=self.max_connections, read_timeout=self.read_timeout,
                    write_timeout=self.write_timeout)

    def replace(self, **changes) -> ServerConfig:
        return replace(self, **changes)
