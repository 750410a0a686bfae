"""Decode attention over a paged cache: validation and dispatch.

Two entry points cover all six variants (DESIGN.md §1):

* :func:`decode_separate` — MHA / MQA / GQA, row ``[K heads | V heads]``;
* :func:`decode_tied` — GTA / absorbed MLA / absorbed GLA, row ``[state heads | rope key]``;
* :func:`prefill_separate` / :func:`prefill_tied` — the same rows and contract for a chunk of any
  length (prefill / "extend" over a cached history, ``kvslim.kernels.prefill``).

``impl="auto"`` runs the Triton kernel on CUDA tensors and the torch reference
elsewhere; an explicit ``impl`` never falls back silently. ``impl="hopper"`` (tied only) is the
Gluon sm_90a kernel of :mod:`kvslim.kernels.hopper_tied`; ``auto`` picks it on sm_90 for 512-wide
latents with >= 64 query rows per state head (where it measured faster; ``_auto_hopper``). Both take the packed fp8 row of
:mod:`kvslim.rows` (a uint8 cache plus its ``kv_format``): values are dequantized on load
and everything after is the same fp32-accumulated attention.
"""

from __future__ import annotations

import os

import torch

from kvslim.kernels.reference import (
    decode_separate_ref,
    decode_tied_ref,
    prefill_separate_ref,
    prefill_tied_ref,
)
from kvslim.rows import RowFormat

IMPLS = ("auto", "triton", "torch", "hopper")
MAX_Q_LEN = 8


def _check_common(q, cache, block_table, seq_lens, row_dim, q_dim, impl, kv_format=None, max_q_len=MAX_Q_LEN):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, q_len, h_q, d], got shape {getattr(q, 'shape', None)}")
    B, q_len, _, d = q.shape
    if d != q_dim:
        raise ValueError(f"q.shape[-1] must be {q_dim}, got {d}")
    if max_q_len is not None and not 1 <= q_len <= max_q_len:
        raise ValueError(f"q_len must be in [1, {max_q_len}] (longer chunks: kvslim.kernels.prefill_*), got {q_len}")
    if q_len < 1:
        raise ValueError(f"q_len (q.shape[1]) must be >= 1, got {q_len}")
    if cache.dim() != 3:
        raise ValueError(f"cache must be [num_pages, page_size, row], got shape {tuple(cache.shape)}")
    fp8 = kv_format is not None and kv_format.is_fp8
    if kv_format is not None and not isinstance(kv_format, RowFormat):
        raise TypeError(f"kv_format must be a kvslim.rows.RowFormat, got {type(kv_format).__name__}")
    if fp8:
        if cache.dtype != torch.uint8:
            raise TypeError(f"an fp8 cache holds packed uint8 rows, got dtype {cache.dtype}")
        if kv_format.row_dim != row_dim:
            raise ValueError(f"kv_format holds rows of {kv_format.row_dim} elements, the attention needs {row_dim}")
        if cache.shape[-1] != kv_format.row_bytes:
            raise ValueError(f"fp8 cache rows must be {kv_format.row_bytes} bytes, got {cache.shape[-1]}")
    elif cache.dtype == torch.uint8:
        raise TypeError("a uint8 cache is a packed fp8 cache: pass its kv_format (kvslim.rows.RowFormat)")
    elif cache.shape[-1] != row_dim:
        raise ValueError(f"cache row width must be {row_dim}, got {cache.shape[-1]}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous")
    if not fp8 and cache.dtype != q.dtype:
        raise TypeError(f"cache dtype {cache.dtype} must match q dtype {q.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(
            f"block_table must be int32 [B={B}, max_pages], got {block_table.dtype} {tuple(block_table.shape)}"
        )
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,):
        raise ValueError(f"seq_lens must be int32 [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("cache", cache), ("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if impl == "hopper":
        return "hopper"  # device, Gluon and shape checks: kvslim.kernels.hopper_tied
    if impl == "triton" and q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    which = "triton" if impl == "triton" or (impl == "auto" and q.device.type == "cuda") else "torch"
    if which == "torch" or (q.device.type != "cuda" and not torch.compiler.is_compiling()):
        # Value checks need the lengths on the host: free for CPU tensors and on the
        # reference path (it syncs anyway). The CUDA kernels skip them to stay sync-free
        # and CUDA-graph capturable; they clamp seq_len to the block table instead (also when traced
        # by torch.compile under the interpreter: a host read would break the graph).
        page_size = cache.shape[1]
        max_len = block_table.shape[1] * page_size
        if int(seq_lens.max()) > max_len:
            raise ValueError(f"seq_lens max {int(seq_lens.max())} exceeds block_table capacity {max_len}")
        if int(seq_lens.min()) < q_len:
            raise ValueError(f"every seq_len must be >= q_len={q_len}, got min {int(seq_lens.min())}")
    return which


def _check_separate(q, cache, block_table, seq_lens, num_kv_heads, head_dim, impl, kv_format, max_q_len):
    """Validation of the separate-KV kernels' arguments; returns the backend (``triton`` / ``torch``)."""
    if q.dim() == 4 and q.shape[2] % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide h_q={q.shape[2]}")
    which = _check_common(q, cache, block_table, seq_lens, 2 * num_kv_heads * head_dim, head_dim, impl,
                          kv_format, max_q_len)
    if kv_format is not None and kv_format.is_fp8 and (kv_format.plain or head_dim % kv_format.tile):
        raise ValueError(f"kv_format {kv_format.describe()} does not fit K/V heads of {head_dim}")
    return which


def _check_tied(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim, impl,
                kv_format, max_q_len):
    """Validation of the tied-state kernels' arguments; returns the backend (``triton`` / ``torch``)."""
    if q.dim() == 4 and q.shape[2] % num_state_heads:
        raise ValueError(f"num_state_heads={num_state_heads} must divide h_q={q.shape[2]}")
    if nope_dim > state_dim or v_dim > state_dim:
        raise ValueError(f"nope_dim={nope_dim} and v_dim={v_dim} must be <= state_dim={state_dim}")
    row = num_state_heads * state_dim + rope_dim
    which = _check_common(q, cache, block_table, seq_lens, row, nope_dim + rope_dim, impl, kv_format, max_q_len)
    if kv_format is not None and kv_format.is_fp8 and (kv_format.plain != rope_dim or state_dim % kv_format.tile):
        raise ValueError(f"kv_format {kv_format.describe()} does not fit {num_state_heads} state heads of "
                         f"{state_dim} + a RoPE key of {rope_dim}")
    return which


def decode_separate(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    impl: str = "auto",
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for MHA/MQA/GQA over a paged cache.

    Args:
        q: ``[B, q_len, h_q, d_h]`` fp16/bf16/fp32, ``1 <= q_len <= 8``.
        cache: ``[num_pages, page_size, 2*h_kv*d_h]``, row = ``[K | V]``, same dtype as q.
        block_table: ``[B, max_pages]`` int32.
        seq_lens: ``[B]`` int32, tokens in the cache including the q_len new ones.
        num_kv_heads: ``h_kv`` (must divide h_q).
        head_dim: ``d_h``.
        softmax_scale: default ``1/sqrt(d_h)``.
        num_splits: split-KV partitions (None = heuristic).
        impl: ``auto``, ``triton`` or ``torch``.
        kv_format: for a packed fp8 cache (uint8 ``[num_pages, page_size, row_bytes]``), its
            ``RowFormat``; None for a cache of q's dtype.

    Returns:
        ``o [B, q_len, h_q, d_h]`` in q's dtype and ``lse [B, q_len, h_q]`` fp32.
    """
    if impl == "hopper":
        raise ValueError("impl='hopper' is a tied-state kernel (decode_tied); decode_separate takes auto/triton/torch")
    which = _check_separate(q, cache, block_table, seq_lens, num_kv_heads, head_dim, impl, kv_format, MAX_Q_LEN)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if which == "torch":
        return decode_separate_ref(
            q, cache, block_table, seq_lens, num_kv_heads=num_kv_heads, head_dim=head_dim, softmax_scale=scale,
            kv_format=kv_format,
        )
    if torch.compiler.is_compiling():  # an opaque op inside the traced graph (kvslim.kernels.ops)
        from kvslim.kernels.ops import decode_separate_op, fmt_args

        return decode_separate_op(q, cache, block_table, seq_lens, num_kv_heads, head_dim, scale, num_splits or 0,
                                  fmt_args(kv_format))
    from kvslim.kernels.separate import decode_separate_triton

    return decode_separate_triton(
        q,
        cache,
        block_table,
        seq_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        softmax_scale=scale,
        num_splits=num_splits,
        kv_format=kv_format,
    )


def _auto_hopper(q: torch.Tensor, state_dim: int, num_state_heads: int) -> bool:
    """Whether ``impl="auto"`` tries the Gluon Hopper kernel: where it measured faster than the ``tl`` one
    (H200 2026-12-03, ``benchmarks/results/2026-12-03_hopper_NVIDIA_H200.md``: MLA h_q=128 B=64 L=8K
    380 vs 599 us at q_len 1, 749 vs 1157 at 2; GLA-2's 256-wide latents: no faster), i.e. one 512-wide
    latent per state head with a full 64-row tile (query heads per state head x q_len >= 64).
    ``KVSLIM_HOPPER=0`` turns it off, ``=1`` allows it for every shape it takes."""
    flag = os.environ.get("KVSLIM_HOPPER")
    if flag == "0" or q.device.type != "cuda":
        return False
    return flag == "1" or (state_dim == 512 and q.shape[2] // num_state_heads * q.shape[1] >= 64)


def decode_tied(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_state_heads: int,
    state_dim: int,
    nope_dim: int,
    rope_dim: int,
    v_dim: int,
    softmax_scale: float,
    num_splits: int | None = None,
    impl: str = "auto",
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for GTA and absorbed MLA/GLA over a paged tied-state cache.

    Args:
        q: ``[B, q_len, h_q, nope_dim + rope_dim]``; head ``h`` reads state head ``h // (h_q/S)``.
        cache: ``[num_pages, page_size, S*state_dim + rope_dim]``.
        block_table, seq_lens: as in :func:`decode_separate`.
        num_state_heads: ``S`` (GTA: h_kv, MLA: 1, GLA: h_c).
        state_dim: width of one state head (GTA: d_h, MLA/GLA: d_c).
        nope_dim: key dims read from the state (GTA: d_h/2, MLA/GLA: d_c).
        rope_dim: shared RoPE key width ``d_R``.
        v_dim: value dims read from the state (GTA: d_h, MLA/GLA: d_c).
        softmax_scale: scale of the original q.k (e.g. ``1/sqrt(d_nope + d_R)`` for MLA).
        kv_format: for a packed fp8 cache, its ``RowFormat`` (states e4m3, RoPE key bf16).
        impl: ``auto``, ``triton``, ``torch`` or ``hopper`` (the Gluon sm_90a kernel; a clear
            ``ValueError`` where it cannot run; ``auto`` uses it where it measured faster, see ``_auto_hopper``).

    Returns:
        ``o [B, q_len, h_q, v_dim]`` in q's dtype and ``lse [B, q_len, h_q]`` fp32.
    """
    which = _check_tied(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim,
                        impl, kv_format, MAX_Q_LEN)
    kw = dict(
        num_state_heads=num_state_heads,
        state_dim=state_dim,
        nope_dim=nope_dim,
        rope_dim=rope_dim,
        v_dim=v_dim,
        softmax_scale=softmax_scale,
        kv_format=kv_format,
    )
    if which == "torch":
        return decode_tied_ref(q, cache, block_table, seq_lens, **kw)
    if which == "hopper" or (impl == "auto" and not torch.compiler.is_compiling() and _auto_hopper(q, state_dim,
                                                                                                   num_state_heads)):
        from kvslim.kernels import hopper_tied

        shape = {k: v for k, v in kw.items() if k != "softmax_scale"}
        if which == "hopper" or hopper_tied.unsupported_reason(q, cache, **shape) is None:
            if torch.compiler.is_compiling():
                raise ValueError("impl='hopper' is not yet wrapped as a torch.compile op; use impl='auto'")
            return hopper_tied.decode_tied_hopper(q, cache, block_table, seq_lens, num_splits=num_splits, **kw)
    if torch.compiler.is_compiling():
        from kvslim.kernels.ops import decode_tied_op, fmt_args

        return decode_tied_op(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim,
                              softmax_scale, num_splits or 0, fmt_args(kv_format))
    from kvslim.kernels.tied import decode_tied_triton

    return decode_tied_triton(q, cache, block_table, seq_lens, num_splits=num_splits, **kw)


def prefill_separate(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    softmax_scale: float | None = None,
    impl: str = "auto",
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ("extend") attention for MHA/MQA/GQA over a paged cache: a chunk of any length.

    Sequence ``b``'s ``T`` new tokens sit at positions ``seq_lens[b]-T … seq_lens[b]-1`` (their rows
    already in the cache) and attend causally to every cached token up to their own position.

    Args:
        q: ``[B, T, h_q, d_h]`` fp16/bf16/fp32, any ``T >= 1`` (the kernel is compiled once for all T).
        cache, block_table, seq_lens, num_kv_heads, head_dim, softmax_scale, impl, kv_format:
            as in :func:`decode_separate` (``seq_lens >= T``).

    Returns:
        ``o [B, T, h_q, d_h]`` in q's dtype and ``lse [B, T, h_q]`` fp32.
    """
    if impl == "hopper":
        raise ValueError("impl='hopper' is a decode kernel (decode_tied); prefill_separate takes auto/triton/torch")
    which = _check_separate(q, cache, block_table, seq_lens, num_kv_heads, head_dim, impl, kv_format, None)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if which == "torch":
        return prefill_separate_ref(q, cache, block_table, seq_lens, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                    softmax_scale=scale, kv_format=kv_format)
    if torch.compiler.is_compiling():
        from kvslim.kernels.ops import fmt_args, prefill_separate_op

        return prefill_separate_op(q, cache, block_table, seq_lens, num_kv_heads, head_dim, scale,
                                   fmt_args(kv_format))
    from kvslim.kernels.prefill import prefill_separate_triton

    return prefill_separate_triton(q, cache, block_table, seq_lens, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   softmax_scale=scale, kv_format=kv_format)


def prefill_tied(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_state_heads: int,
    state_dim: int,
    nope_dim: int,
    rope_dim: int,
    v_dim: int,
    softmax_scale: float,
    impl: str = "auto",
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ("extend") attention for GTA and absorbed MLA/GLA over a paged tied-state cache.

    Positions and causality as in :func:`prefill_separate`. For MLA/GLA this is the absorbed form
    over the latent: per query token, head and visible key ``2 * (d_c + d_R + d_c)`` FLOPs (MLA,
    d_c = 512, d_R = 64: 2176) instead of the expanded form's ``2 * (d_nope + d_R + d_v)`` (DeepSeek
    128 + 64 + 128: 640): exact, 3.4x the attention FLOPs, but no up-projection of the cached
    latents to per-head K/V and no expanded K/V in memory.

    Args:
        q: ``[B, T, h_q, nope_dim + rope_dim]``, any ``T >= 1``.
        cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim,
        softmax_scale, impl, kv_format: as in :func:`decode_tied` (``seq_lens >= T``).

    Returns:
        ``o [B, T, h_q, v_dim]`` in q's dtype and ``lse [B, T, h_q]`` fp32.
    """
    if impl == "hopper":
        raise ValueError("impl='hopper' is a decode kernel (decode_tied); prefill_tied takes auto/triton/torch")
    which = _check_tied(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim, v_dim,
                        impl, kv_format, None)
    kw = dict(num_state_heads=num_state_heads, state_dim=state_dim, nope_dim=nope_dim, rope_dim=rope_dim,
              v_dim=v_dim, softmax_scale=softmax_scale, kv_format=kv_format)
    if which == "torch":
        return prefill_tied_ref(q, cache, block_table, seq_lens, **kw)
    if torch.compiler.is_compiling():
        from kvslim.kernels.ops import fmt_args, prefill_tied_op

        return prefill_tied_op(q, cache, block_table, seq_lens, num_state_heads, state_dim, nope_dim, rope_dim,
                               v_dim, softmax_scale, fmt_args(kv_format))
    from kvslim.kernels.prefill import prefill_tied_triton

    return prefill_tied_triton(q, cache, block_table, seq_lens, **kw)


__all__ = ["IMPLS", "MAX_Q_LEN", "decode_separate", "decode_tied", "prefill_separate", "prefill_tied"]
