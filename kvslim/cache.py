"""KV caches: one packed row per token per layer (DESIGN.md §1), stored in pages.

A cache is a list of per-layer pools ``[num_pages, page_size, width]`` (the width may differ by
layer: per-layer latent ranks, ``ModelConfig.layer_specs``) plus a block
table ``[B, max_pages]`` (int32) and ``seq_lens [B]`` (int32, tokens cached so far).
A contiguous cache is just the special case of one page per sequence, so modules,
kernels and the engine see a single layout. The row comes from the spec through a
:class:`~kvslim.rows.RowFormat` (``row_dim`` elements of the KV dtype, or the packed fp8 row
of ``row_bytes`` uint8), so the planner's bytes/token *is* the memory layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvslim.rows import RowFormat, dequantize_rows, quantize_rows, roundtrip_rows
from kvslim.spec import AttentionSpec


@dataclass
class LayerCache:
    """What one attention layer sees during a forward: its pool and where to write."""

    pool: torch.Tensor  # [num_pages, page_size, width]
    block_table: torch.Tensor  # [B, max_pages] int32
    start: torch.Tensor  # [B] int32: tokens cached before this forward
    check_bounds: bool = True  # False when the caller already checked capacity (saves a host sync)
    fmt: RowFormat | None = None  # the packed fp8 row; None: rows of the pool's dtype
    write_impl: str = "auto"  # how write() stores rows by default (see write)
    #: known on the host: every sequence's start equals this (0: a first prefill chunk, no history to read);
    #: None when unknown or unequal
    history: int | None = None

    @property
    def fresh(self) -> bool:
        return self.history == 0

    @property
    def is_fp8(self) -> bool:
        return self.fmt is not None and self.fmt.is_fp8

    def roundtrip(self, rows: torch.Tensor) -> torch.Tensor:
        """What reading ``rows`` back from this cache gives (fp8: quantized; else cast to the pool dtype)."""
        if self.is_fp8:
            return roundtrip_rows(rows, self.fmt)
        return rows.to(self.pool.dtype).to(rows.dtype)

    def write(self, rows: torch.Tensor, *, impl: str | None = None) -> None:
        """Store ``rows [B, T, row_dim]`` at positions ``start[b] + t`` (quantized for an fp8 cache).

        ``impl``: ``triton`` (one launch that also quantizes, ``kvslim.kernels.write``; the default
        on CUDA), ``torch`` (its oracle: ``quantize_rows`` + ``index_copy_``, the default on CPU).
        """
        impl = self.write_impl if impl is None else impl
        B, T, R = rows.shape
        want = self.fmt.row_dim if self.is_fp8 else self.pool.shape[-1]
        if want != R:
            raise ValueError(f"row width {R} does not match the cache's {want}")
        page_size = self.pool.shape[1]
        # The bounds check syncs with the host: never under CUDA-graph capture or torch.compile (asking
        # whether a stream is capturing is itself a graph break, one per layer, in a compiled forward).
        if self.check_bounds and not torch.compiler.is_compiling() and not (
                rows.is_cuda and torch.cuda.is_current_stream_capturing()):
            last = int(self.start.max()) + T - 1
            if last // page_size >= self.block_table.shape[1]:
                raise ValueError(
                    f"cache overflow: position {last} needs more than {self.block_table.shape[1]} pages of {page_size}"
                )
        if impl == "triton" or (impl == "auto" and self.pool.is_cuda):
            if torch.compiler.is_compiling():  # one opaque op in the traced graph (kvslim.kernels.ops)
                from kvslim.kernels.ops import fmt_args, write_rows_op

                write_rows_op(self.pool, rows, self.block_table, self.start, fmt_args(self.fmt))
                return
            from kvslim.kernels.write import write_rows

            write_rows(self.pool, rows, self.block_table, self.start, self.fmt if self.is_fp8 else None)
            return
        if impl not in ("auto", "torch"):
            raise ValueError(f"impl must be auto, triton or torch, got {impl!r}")
        if self.is_fp8:
            rows = quantize_rows(rows, self.fmt)
        pos = self.start.long()[:, None] + torch.arange(T, device=rows.device)[None, :]  # [B, T]
        pages = torch.gather(self.block_table.long(), 1, pos // page_size)
        flat = (pages * page_size + pos % page_size).reshape(-1)
        width = self.pool.shape[-1]
        self.pool.view(-1, width).index_copy_(0, flat, rows.reshape(-1, width).to(self.pool.dtype))

    def prefix_rows(self, length: int) -> torch.Tensor:
        """The first ``length`` rows ``[B, length, row]`` of every sequence (fp8: dequantized to float32),
        read page by page through the block table with no host sync (``length`` is known on the host)."""
        B, page_size = self.block_table.shape[0], self.pool.shape[1]
        n = -(-length // page_size)
        if n > self.block_table.shape[1]:
            raise ValueError(f"{length} rows need {n} pages, the block table has {self.block_table.shape[1]}")
        rows = self.pool[self.block_table[:, :n].long()]  # [B, n, page_size, width]
        rows = rows.reshape(B, n * page_size, self.pool.shape[-1])[:, :length]
        return dequantize_rows(rows, self.fmt, torch.float32) if self.is_fp8 else rows

    def gather(self, lengths: torch.Tensor) -> torch.Tensor:
        """Padded rows ``[B, max(lengths), row]`` of every sequence (zeros past its length)."""
        L = int(lengths.max())
        rows = self.prefix_rows(L)
        pos = torch.arange(L, device=self.pool.device)
        valid = pos[None, :] < lengths.long()[:, None].to(pos.device)
        return rows * valid[..., None].to(rows.dtype)


class KVCache:
    """Per-layer paged pools plus the batch's block table and lengths.

    Args:
        spec: attention spec of the layers (its ``row_dim_per_rank(tp_size)`` is the row), or one spec
            per layer (``ModelConfig.layer_specs``: per-layer latent ranks give pools of different widths).
        num_layers: number of attention layers.
        batch: sequences in the batch.
        max_len: tokens each sequence may hold.
        page_size: tokens per page (default: ``max_len``, i.e. contiguous).
        dtype, device: storage type and place.
        tp_size: tensor-parallel size (rows hold this rank's shard).
        kv_dtype: ``fp8`` for the packed e4m3 row (``kvslim.rows``); default: rows of ``dtype``.
    """

    def __init__(self, spec: AttentionSpec | Sequence[AttentionSpec], num_layers: int, *, batch: int, max_len: int,
                 page_size: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tp_size: int = 1, kv_dtype: str | None = None):
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        page_size = max_len if page_size is None else page_size
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        specs = [spec] * num_layers if isinstance(spec, AttentionSpec) else list(spec)
        if len(specs) != num_layers:
            raise ValueError(f"KVCache: {len(specs)} layer specs for num_layers={num_layers}")
        self.specs, self.spec = specs, specs[0]  # spec, row_dim, fmt: layer 0's (row_dims, fmts: every layer's)
        self.page_size = page_size
        self.max_len = max_len
        pages_per_seq = -(-max_len // page_size)
        self.row_dims = [s.row_dim_per_rank(tp_size) for s in specs]
        self.row_dim = self.row_dims[0]
        self.fmts = [RowFormat.for_spec(s, kv_dtype, tp_size) if kv_dtype == "fp8" else None for s in specs]
        self.fmt = self.fmts[0]
        self.pools = []
        for row_dim, fmt in zip(self.row_dims, self.fmts):
            width, store = (fmt.row_bytes, torch.uint8) if fmt else (row_dim, dtype)
            self.pools.append(torch.zeros(batch * pages_per_seq, page_size, width, dtype=store, device=device))
        self.block_table = torch.arange(batch * pages_per_seq, dtype=torch.int32, device=device).view(
            batch, pages_per_seq
        )
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)

    def subset(self, b: int) -> KVCache:
        """A view of sequence ``b`` alone (shares pools and length storage with this cache)."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.block_table = self.block_table[b : b + 1]
        view.seq_lens = self.seq_lens[b : b + 1]
        return view

    def layer(self, i: int, *, check_bounds: bool = True) -> LayerCache:
        return LayerCache(self.pools[i], self.block_table, self.seq_lens, check_bounds, self.fmts[i])

    def check_capacity(self, new_tokens: int) -> None:
        """Raise if any sequence cannot take ``new_tokens`` more (one host sync for all layers)."""
        need = int(self.seq_lens.max()) + new_tokens
        cap = self.block_table.shape[1] * self.page_size
        if need > cap:
            raise ValueError(f"cache overflow: a sequence needs {need} tokens but holds at most {cap}")

    def advance(self, n: int) -> None:
        self.seq_lens += n

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools)
