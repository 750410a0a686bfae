"""The Triton launchers as ``torch.library`` custom ops, so ``torch.compile`` can trace a decode step.

Under ``torch.compile`` (``kvslim.engine`` with ``compile=True``) Dynamo cannot trace into a
launcher (host-side heuristics, ``kernel.warmup`` occupancy queries), and a graph break per
attention layer would cut the step into 2 x layers graphs that Inductor fuses separately. As
opaque custom ops with a fake (meta) implementation, the decode kernels and the cache-row write
stay single launches inside one traced graph, and Inductor fuses everything around them
(RMSNorm + residual, RoPE, the row ``cat``, casts, SiLU * up) — the same kernels still run.

``kvslim.kernels.decode_*``, ``kvslim.kernels.prefill_*`` and ``LayerCache.write`` call these ops
only while compiling (the engine compiles its prefill / verify forward too); eager
code calls the launchers directly (no dispatcher cost). The ``kv_format`` of the launchers is
passed as the four ints of an fp8 :class:`~kvslim.rows.RowFormat` (``[]`` for none), since a
custom op's schema takes only tensors and scalars.
"""

from __future__ import annotations

import torch

from kvslim.rows import RowFormat


def fmt_args(fmt: RowFormat | None) -> list[int]:
    """A ``RowFormat`` as custom-op arguments: ``[row_dim, quant, plain, tile]`` for fp8, ``[]`` else."""
    if fmt is None or not fmt.is_fp8:
        return []
    return [fmt.row_dim, fmt.quant, fmt.plain, fmt.tile]


def _fmt(args: list[int]) -> RowFormat | None:
    if not args:
        return None
    row_dim, quant, plain, tile = args
    return RowFormat("fp8", row_dim, quant=quant, plain=plain, tile=tile)


@torch.library.custom_op("kvslim::decode_separate", mutates_args=())
def decode_separate_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                       num_kv_heads: int, head_dim: int, softmax_scale: float, num_splits: int,
                       fmt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvslim.kernels.separate.decode_separate_triton`` (``num_splits`` 0 = heuristic)."""
    from kvslim.kernels.separate import decode_separate_triton

    return decode_separate_triton(q, cache, block_table, seq_lens, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                  softmax_scale=softmax_scale, num_splits=num_splits or None, kv_format=_fmt(fmt))


@decode_separate_op.register_fake
def _(q, cache, block_table, seq_lens, num_kv_heads, head_dim, softmax_scale, num_splits, fmt):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, head_dim), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("kvslim::decode_tied", mutates_args=())
def decode_tied_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   num_state_heads: int, state_dim: int, nope_dim: int, rope_dim: int, v_dim: int,
                   softmax_scale: float, num_splits: int, fmt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvslim.kernels.tied.decode_tied_triton`` (``num_splits`` 0 = heuristic)."""
    from kvslim.kernels.tied import decode_tied_triton

    return decode_tied_triton(q, cache, block_table, seq_lens, num_state_heads=num_state_heads, state_dim=state_dim,
                              nope_dim=nope_dim, rope_dim=rope_dim, v_dim=v_dim, softmax_scale=softmax_scale,
                              num_splits=num_splits or None, kv_format=_fmt(fmt))


@decode_tied_op.register_fake
def _(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim, softmax_scale,
      num_splits, fmt):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v_dim), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("kvslim::prefill_separate", mutates_args=())
def prefill_separate_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        num_kv_heads: int, head_dim: int, softmax_scale: float,
                        fmt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvslim.kernels.prefill.prefill_separate_triton``."""
    from kvslim.kernels.prefill import prefill_separate_triton

    return prefill_separate_triton(q, cache, block_table, seq_lens, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   softmax_scale=softmax_scale, kv_format=_fmt(fmt))


@prefill_separate_op.register_fake
def _(q, cache, block_table, seq_lens, num_kv_heads, head_dim, softmax_scale, fmt):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, head_dim), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("kvslim::prefill_tied", mutates_args=())
def prefill_tied_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    num_state_heads: int, state_dim: int, nope_dim: int, rope_dim: int, v_dim: int,
                    softmax_scale: float, fmt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``kvslim.kernels.prefill.prefill_tied_triton``."""
    from kvslim.kernels.prefill import prefill_tied_triton

    return prefill_tied_triton(q, cache, block_table, seq_lens, num_state_heads=num_state_heads,
                               state_dim=state_dim, nope_dim=nope_dim, rope_dim=rope_dim, v_dim=v_dim,
                               softmax_scale=softmax_scale, kv_format=_fmt(fmt))


@prefill_tied_op.register_fake
def _(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim, softmax_scale, fmt):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v_dim), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("kvslim::write_rows", mutates_args=("pool",))
def write_rows_op(pool: torch.Tensor, rows: torch.Tensor, block_table: torch.Tensor, start: torch.Tensor,
                  fmt: list[int]) -> None:
    """``kvslim.kernels.write.write_rows``: store (fp8: quantize) rows into the paged pool."""
    from kvslim.kernels.write import write_rows

    write_rows(pool, rows, block_table, start, _fmt(fmt))


@write_rows_op.register_fake
def _(pool, rows, block_table, start, fmt):
    return None


@torch.library.custom_op("kvslim::sdpa_lower_right", mutates_args=())
def sdpa_lower_right_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of ``q [B, T, H, d]`` over ``k``/``v [B, L, H, d]`` -> contiguous ``[B, T, H, dv]``, with the causal
    mask aligned to the lower right (query ``t`` sees keys ``<= L - T + t``: a chunk over its history). Opaque to
    Dynamo, which cannot trace ``torch.nn.attention.bias.CausalBias`` with symbolic sizes (it would break the
    graph and, inside the layer loop, drop the whole forward to eager); run eagerly, the bias dispatches to the
    flash / efficient kernels. The output is made contiguous in the token-major layout the fake promises: the
    backends disagree on SDPA's output strides (flash keeps the query's, math returns head-major), and Inductor
    asserts the fake's strides at run time (flash needs no copy here)."""
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[1], k.shape[1])
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         attn_mask=mask, scale=scale)
    return o.transpose(1, 2).contiguous()


@sdpa_lower_right_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
