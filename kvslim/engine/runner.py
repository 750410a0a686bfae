"""Model runner: the engine-side forward over the paged pools, with CUDA-graph decode.

The runner loops the model's own layers (embedding -> decoder layers -> norm -> lm_head)
with a :class:`~kvslim.cache.LayerCache` over the pools and the allocator's block table
(``check_bounds=False``: the scheduler guarantees every written position has a page, and
the check's host sync would break graph capture), so the model code is untouched. Two kinds of forward:

* ``prefill(chunks, starts, pages)``: chunks of one length T of several sequences, each
  at its own start (T may exceed the decode kernels' q_len limit; the attention modules then
  take the prefill kernels on CUDA, ``kvslim.kernels.prefill``, and their SDPA path on CPU);
* ``decode(tokens [B], starts [B], slots [B], updates)``: one new token per running
  sequence, each at its own length, through ``kvslim.kernels`` (Triton on CUDA, torch
  reference on CPU). Sequence ``i``'s pages are row ``slots[i]`` of a persistent host
  block table ``[max_batch + 1, max_pages]`` (pinned on CUDA); ``updates`` carries only
  the pages added since the last step (``(slot, first column, pages)``, a first column of
  0 clears the row), so building the inputs costs O(new pages), not O(batch x pages).
  Tokens, starts and slots go to the device in one copy; the rows of the batch are
  gathered from the device copy of the table on the device. The last row of the table
  is all zeros: the scratch page. Every decode forward also leaves each row's greedy token
  (argmax, -1 where the row's maximum is not finite) in a persistent device buffer, and
  ``src`` lets the next decode take its input tokens from that buffer on the device
  (row ``i`` feeds the token of row ``src[i]`` of the previous decode): how the engine's
  overlapped decode (``kvslim/engine/overlap.py``) launches step n+1 before the host has read
  step n's tokens. ``greedy_to_host`` / ``read_greedy`` copy those tokens to (pinned) host
  memory behind an event and wait for them;
* ``verify(chunks, starts, pages)``: speculative verification, chunks of one length
  q_len = 1 + k <= 8 (the last sampled token and k proposals) through the kernels, returning
  the logits of every position. It always runs eagerly (no CUDA graph): graphs are captured
  for q_len = 1 only, so the graph path of plain decode is untouched.

On CUDA, decode is captured in CUDA graphs for a set of batch sizes; a batch is padded
to the next captured size with rows whose slot is the scratch row (token 0, start 0), so
they only ever write the scratch page. The gather of tokens (from the staging buffer or the
previous step's greedy tokens), starts and block-table rows, and the greedy tokens of the
output, are part of the graph. Capture is skipped on CPU and can be turned off. The kernels and
the cache writes are free of host synchronisation, which is what makes the capture legal.

Tensor parallelism: the runner of every rank holds its own shard of the model and of
the pools; the other ranks' processes replay rank 0's forwards (``kvslim/engine/tp.py``).
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvslim.cache import LayerCache
from kvslim.engine.allocator import SCRATCH_PAGES
from kvslim.engine.config import DEFAULT_GRAPH_BATCHES, PREFILL_COMPILE
from kvslim.kernels import MAX_Q_LEN
from kvslim.rows import RowFormat, kv_dtype_name

#: torch.compile recompilations allowed per compiled function (Dynamo's default is 8). Dynamo keys its cache
#: on the code object, which every runner in a process shares, and each runner adds its own guard sets (its
#: ``self``; batch 1 vs more, chunk length 1 / <= MAX_Q_LEN / longer, first chunk or not): an exactness
#: gate plus two served variants in one process hit 8 on the H100 (2026-12-07) and Dynamo then ran later
#: prefills eagerly, silently. Raised only around this runner's compiled calls.
RECOMPILE_LIMIT = 64

def layer_step(layer, x, positions, pool, block_table, start, fmt, write_impl, history):
    """One decoder layer over its pool (the unit ``prefill_compile="layer"`` compiles)."""
    cache = LayerCache(pool, block_table, start, check_bounds=False, fmt=fmt, write_impl=write_impl, history=history)
    return layer(x, positions, cache)

# Prefill attention backends: not cuDNN, which builds (~2 ms of host time) an execution plan for
# every new (chunk length, cached length) shape, i.e. for almost every prefill forward.
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

class ModelRunner:
    """Holds the pools and runs forwards of one rank's model.

    Args:
        model: a ``Transformer`` (or one rank's shard of it, see ``tp.shard_model``).
        num_pages, page_size: pool shape (same on every layer and rank).
        max_pages_per_seq: width of the decode block table (= max_model_len / page_size).
        max_batch: largest decode batch.
        kv_format: the cache row (``kvslim.rows.RowFormat``; default: rows of the model's dtype), or one
            per layer (per-layer latent ranks: each layer's pool has its own row width).
        cuda_graphs: capture decode graphs (CUDA only; ``None`` = on CUDA).
        graph_batches: batch sizes to capture (clipped to ``max_batch``).
        compile: run decode through ``torch.compile`` (one graph over all layers, the kernels as
            custom ops, ``kvslim.kernels.ops``; compiled for a dynamic batch before capture), and
            prefill / verify forwards through a second compiled function (dynamic batch and length).
        fuse_projections: fuse each layer's input projections and gate+up into one GEMM each
            (``Transformer.fuse_projections``, done in place on ``model``).
        compile_mode: ``torch.compile`` mode of the decode step (e.g. ``max-autotune-no-cudagraphs``:
            Inductor times its Triton GEMM templates against cuBLAS for the skinny decode GEMMs).
        prefill_compile: with ``compile``, what a prefill / verify forward compiles: ``layer`` (one
            decoder layer, reused by every layer; embedding, final norm and head eager) or ``model``
            (the whole forward); see ``kvslim.engine.config.PREFILL_COMPILE``.
    """

    def __init__(self, model, *, num_pages: int, page_size: int, max_pages_per_seq: int, max_batch: int,
                 kv_format: RowFormat | list[RowFormat] | None = None, cuda_graphs: bool | None = None,
                 graph_batches=DEFAULT_GRAPH_BATCHES, compile: bool = False, fuse_projections: bool = False,
                 compile_mode: str | None = None, prefill_compile: str = "layer"):
        if prefill_compile not in PREFILL_COMPILE:
            raise ValueError(f"prefill_compile must be one of {PREFILL_COMPILE}, got {prefill_compile!r}")
        self.model = model
        if fuse_projections:
            model.fuse_projections()
        self.compiled = compile
        self._decode_fn = torch.compile(self._run, dynamic=True, mode=compile_mode) if compile else self._run
        # prefill / verify forwards: (tokens, start, block_table, every_position, history) -> logits
        if compile and prefill_compile == "model":
            # a separate code object, so prefill's guards (chunk length, fresh, every position) never evict decode's
            self._prefill_fn = torch.compile(self._run_prefill, dynamic=True)
        else:
            step = torch.compile(layer_step, dynamic=True) if compile else layer_step
            self._prefill_fn = functools.partial(self._run, step=step)
        # the cache write takes the attention's kernel choice (impl="triton" also under TRITON_INTERPRET)
        self.write_impl = "triton" if model.model.layers[0].self_attn.impl == "triton" else "auto"
        p = next(model.parameters())
        self.device = p.device
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.max_batch = max_batch
        layers = model.model.layers
        self.row_dims = [layer.self_attn.local.row_dim for layer in layers]
        self.row_dim = self.row_dims[0]  # layer 0's (row_dims: every layer's)
        if kv_format is None:
            kv_format = RowFormat(kv_dtype_name(p.dtype), self.row_dim)
        if isinstance(kv_format, RowFormat) and len(set(self.row_dims)) > 1:
            # one KV dtype for layers of different widths: each layer gets its own row in that dtype
            kv_format = [RowFormat.for_spec(layer.self_attn.local, kv_format.kv_dtype) for layer in layers]
        fmts = list(kv_format) if isinstance(kv_format, (list, tuple)) else [kv_format] * len(layers)
        if len(fmts) != len(layers):
            raise ValueError(f"kv_format: {len(fmts)} row formats for {len(layers)} layers")
        for i, (fmt, row) in enumerate(zip(fmts, self.row_dims)):
            if fmt.row_dim != row:
                raise ValueError(f"kv_format rows have {fmt.row_dim} elements, this rank's attention of layer {i} {row}")
        self.kv_formats = fmts
        self.kv_format = fmts[0]
        self.layer_fmts = [fmt if fmt.is_fp8 else None for fmt in fmts]
        self.pools = [
            torch.zeros(num_pages, page_size, fmt.storage_width, dtype=fmt.storage_dtype, device=self.device)
            for fmt in fmts
        ]
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.use_graphs = cuda_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batches = sorted({b for b in graph_batches if b <= max_batch} | {max_batch})
        # decode inputs: persistent block table (row max_batch = scratch) and one staging buffer
        # [tokens; starts; slots; src]; host copies are pinned on CUDA so their copies are asynchronous
        # (on CPU the host buffers are the device buffers: the same code path, without the copies)
        cuda = self.device.type == "cuda"
        self.scratch_slot = max_batch
        self.table = torch.zeros(max_batch + 1, max_pages_per_seq, dtype=torch.int32, pin_memory=cuda)
        self._table_np = self.table.numpy()
        self._stage_host = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=cuda)
        self._stage_np = self._stage_host.numpy()
        self._dirty: list[int] = []  # [lo, hi) of table rows changed since the last device copy
        self._copied = None  # CUDA event after the last host-to-device copies
        self._table_dev = torch.zeros_like(self.table, device=self.device) if cuda else self.table
        self._stage = torch.zeros_like(self._stage_host, device=self.device) if cuda else self._stage_host
        # greedy token of each row of the last decode forward (-1: non-finite logits), and two host
        # buffers for it (step n's copy is read while step n+1's may be in flight), each with an event
        self.greedy = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._greedy_host = torch.zeros(2, max_batch, dtype=torch.long, pin_memory=cuda)
        self._greedy_events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self._greedy_turn = 0
        self.setup_times: dict = {}
        if self.use_graphs:
            self._capture()

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, start: torch.Tensor, block_table: torch.Tensor,
                 decode: bool = False, every_position: bool = False, history: int | None = None) -> torch.Tensor:
        """tokens ``[B, T]``, start ``[B]`` int32, block_table ``[B, P]`` int32 -> last-position logits ``[B, V]``
        (``[B, T, V]`` with ``every_position``).

        ``decode``: through the decode function (compiled when the runner was built with ``compile``).
        ``history``: every start equals this (known on the host; None: unequal). Lets latent attention
        prefill on expanded K/V: SDPA over a first chunk's own rows (0) or over the gathered history.
        """
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if self.compiled else nullcontext():
            if decode:
                return self._decode_fn(tokens, start, block_table)
            return self._prefill_fn(tokens, start, block_table, every_position, history)

    def _run_prefill(self, tokens, start, block_table, every_position=False, history=None):
        return self._run(tokens, start, block_table, every_position, history)

    def _run(self, tokens: torch.Tensor, start: torch.Tensor, block_table: torch.Tensor,
             every_position: bool = False, history: int | None = None, step=layer_step) -> torch.Tensor:
        """The forward; ``step`` runs one layer (the compiled ``layer_step`` for per-layer compiled prefill)."""
        m = self.model
        T = tokens.shape[1]
        positions = start.long()[:, None] + torch.arange(T, device=tokens.device)[None, :]
        x = m.model.embed_tokens(tokens)
        for layer, pool, fmt in zip(m.model.layers, self.pools, self.layer_fmts):
            x = step(layer, x, positions, pool, block_table, start, fmt, self.write_impl, history)
        if every_position:
            return m.lm_head(m.model.norm(x)).float()
        x = m.model.norm(x[:, -1:])
        return m.lm_head(x)[:, 0].float()

    def prefill(self, chunks: list[list[int]], starts: list[int], page_lists: list[list[int]]) -> torch.Tensor:
        """Chunks of equal length T, each continuing its sequence at ``starts[i]`` -> logits ``[B, V]``."""
        t, s = self.upload(chunks, torch.long), self.upload(starts, torch.int32)
        with sdpa_kernel(PREFILL_SDPA):
            # only chunks longer than MAX_Q_LEN read it: shorter ones get None, one guard set fewer to compile
            equal = min(starts) == max(starts) and len(chunks[0]) > MAX_Q_LEN
            history = starts[0] if equal else None
            return self._forward(t, s, self.upload(self._table(page_lists), torch.int32), history=history)

    def verify(self, chunks: list[list[int]], starts: list[int], page_lists: list[list[int]]) -> torch.Tensor:
        """Chunks of equal length q_len <= 8 at ``starts[i]`` -> logits of every position ``[B, q_len, V]`` (eager)."""
        t, s = self.upload(chunks, torch.long), self.upload(starts, torch.int32)
        return self._forward(t, s, self.upload(self._table(page_lists), torch.int32), every_position=True)

    def upload(self, data, dtype: torch.dtype) -> torch.Tensor:
        """Host data (lists, an array or a tensor) as a tensor on the runner's device. On CUDA it goes through
        pinned memory with a non-blocking copy: a copy from pageable memory first waits for the stream to drain
        (CUDA's rule for pageable host-to-device copies), so each prefill forward's inputs would stall the host
        until the GPU had finished everything queued before them, and host and device work could not overlap.
        (The pinned block is not reused before its copy completes: torch's host allocator records the copy.)"""
        t = torch.as_tensor(data, dtype=dtype)
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def _table(page_lists: list[list[int]]) -> torch.Tensor:
        """Block table ``[B, max(2, max pages)]`` int32, padded with the scratch page (at least two columns:
        a width of 1 would be one more specialisation, so one more compile, of the compiled prefill)."""
        width = max(2, max(len(p) for p in page_lists))
        bt = np.full((len(page_lists), width), SCRATCH_PAGES - 1, dtype=np.int32)
        for i, p in enumerate(page_lists):
            bt[i, : len(p)] = p
        return torch.from_numpy(bt)

    def update_table(self, updates) -> None:
        """Write ``(slot, first column, pages)`` entries into the host block table (column 0 clears the row)."""
        if not updates:
            return
        t = self._table_np
        lo, hi = self._dirty or (self.max_batch, 0)
        for slot, col, pages in updates:
            if col == 0:
                t[slot] = SCRATCH_PAGES - 1
            t[slot, col : col + len(pages)] = pages
            lo, hi = min(lo, slot), max(hi, slot + 1)
        self._dirty = [lo, hi]

    def decode(self, tokens: list[int] | None, starts: list[int], slots: list[int], updates=(),
               src: list[int] | None = None) -> torch.Tensor:
        """One token per sequence (block-table row ``slots[i]``, after applying ``updates``) -> logits ``[B, V]``.

        ``src``: row ``i``'s token is the greedy token of row ``src[i]`` of the previous decode forward,
        read on the device (``tokens`` is then None); without it the tokens come from ``tokens``.
        """
        B = len(starts)
        b = next(x for x in self.graph_batches if x >= B) if self.use_graphs else B
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the pinned buffers
        self.update_table(updates)
        st = self._stage_np
        if src is None:
            st[0, :B] = tokens
            st[3, :B] = -1
        else:
            st[0, :B] = 0
            st[3, :B] = src
        st[1, :B] = starts
        st[2, :B] = slots
        if b > B:  # padding rows: token 0 at position 0 of the scratch row
            st[:2, B:b] = 0
            st[2, B:b] = self.scratch_slot
            st[3, B:b] = -1
        if self.device.type != "cuda":
            return self._graph_forward(B)
        if self._dirty:
            lo, hi = self._dirty
            self._table_dev[lo:hi].copy_(self.table[lo:hi], non_blocking=True)
            self._dirty = []
        self._stage[:, :b].copy_(self._stage_host[:, :b], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        if self.use_graphs:
            self.graphs[b].replay()
            return self._outs[b][:B]
        return self._graph_forward(B)

    def _graph_forward(self, b: int) -> torch.Tensor:
        """The decode forward over the first ``b`` rows of the device staging buffer and table; leaves
        the rows' greedy tokens in ``self.greedy``."""
        stage = self._stage
        src = stage[3, :b]
        prev = self.greedy.index_select(0, src.clamp(min=0)).clamp(min=0)  # a failed row feeds token 0
        tokens = torch.where(src >= 0, prev, stage[0, :b])
        bt = self._table_dev.index_select(0, stage[2, :b])
        logits = self._forward(tokens[:, None], stage[1, :b].to(torch.int32), bt, decode=True)
        vals, idx = logits.max(-1)  # as LLMEngine._sample: NaN propagates, so a non-finite row is -1
        self.greedy[:b].copy_(torch.where(torch.isfinite(vals), idx, -1))
        return logits

    def greedy_to_host(self, n: int):
        """Start copying the greedy tokens of the first ``n`` rows of the last decode forward to host
        memory (non-blocking, after the forward on the stream); returns the handle of ``read_greedy``.
        Two buffers alternate: a handle must be read before the next-but-one call."""
        i = self._greedy_turn
        self._greedy_turn ^= 1
        buf = self._greedy_host[i, :n]
        buf.copy_(self.greedy[:n], non_blocking=True)
        event = None
        if self._greedy_events is not None:
            event = self._greedy_events[i]
            event.record()
        return buf, event

    @staticmethod
    def read_greedy(handle) -> list[int]:
        """Wait for a ``greedy_to_host`` copy (the step's one host sync) and return its tokens."""
        buf, event = handle
        if event is not None:
            event.synchronize()
        return buf.tolist()

    def _capture(self) -> None:
        dev = self.device
        self._stage[2].fill_(self.scratch_slot)
        self._stage[3].fill_(-1)
        self._outs: dict[int, torch.Tensor] = {}
        pool = None
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        t0 = time.perf_counter()
        warm = {}
        with torch.cuda.stream(stream):  # warm up (allocator, Triton autotune/compile)
            for b in self.graph_batches:
                t = time.perf_counter()
                self._graph_forward(b)
                torch.cuda.synchronize(dev)
                warm[b] = time.perf_counter() - t
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        for b in reversed(self.graph_batches):  # largest first so smaller graphs share its pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._outs[b] = self._graph_forward(b)
            pool = g.pool() if pool is None else pool
            self.graphs[b] = g
        torch.cuda.synchronize(dev)
        # where start-up goes (the H100 serve run of 2026-12-07 spent 55-102 s here): the first warm-up
        # forward carries the torch.compile of the decode step, later ones Triton JIT of new specialisations
        self.setup_times = {"warmup_s": t1 - t0, "capture_s": time.perf_counter() - t1,
                            "warmup_by_batch_s": {b: round(v, 3) for b, v in warm.items()}}
