"""Triton prefill ("extend") attention over a paged cache, any chunk length (issue 13, DESIGN.md §6).

Same row layouts, arguments and ``(o, lse)`` contract as the decode kernels (separate.py:
``[K heads | V heads]``; tied.py: ``[state heads | rope key]``), but ``q [B, T, h_q, d]`` for
any ``T >= 1``: sequence ``b``'s ``T`` new tokens sit at positions ``seq_lens[b]-T …
seq_lens[b]-1`` (their rows already written to the cache) and attend causally to every cached
token up to their own position.

One program owns one sequence, one KV (state) head, one block of its query heads and a block
of ``BLOCK_M / BLOCK_H`` consecutive new tokens: (tokens x heads of one KV head) form the M side
of both ``tl.dot``s, so each K/V (state) tile is loaded once for all of them. A program walks
the KV tiles only up to its last token's position (causal skip: no work past the diagonal),
first the tiles every one of its rows sees in full (no masks), then the few that cross the
diagonal (masked). Online softmax in fp32, no split-KV (prefill has enough programs), no host
sync: ``seq_len`` is clamped to the block table's capacity in the kernel. ``T`` is a runtime
argument, so one compiled kernel serves every chunk length. Heavier token blocks (later
tokens see more keys) are launched first.

Packed fp8 rows (``kvslim.rows``) are dequantized on load by ``blocks.load_elements`` (the
decode kernels' scale-folding fast path is not used here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvslim.kernels.blocks import load_elements, load_plain, round_p, softmax_update, tile_rows
from kvslim.kernels.heuristics import cdiv, next_pow2, prefill_config
from kvslim.kernels.launch import INTERPRET, LOG2E, alloc_outputs
from kvslim.rows import RowFormat


@triton.jit
def _rows_of_program(SeqLens, b, tb, hb, q_len, max_pages, G: tl.constexpr, PAGE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(t, j, row_ok, pos, full_end, end)`` of a program: each row's new token ``t`` and head ``j``
    within its group, the rows that exist, their absolute positions, the end of the tiles every row
    sees in full and the end of the keys any row sees (its last token's position + 1)."""
    TOK: tl.constexpr = BLOCK_M // BLOCK_H
    offs_m = tl.arange(0, BLOCK_M)
    t = tb * TOK + offs_m // BLOCK_H  # [BLOCK_M], heads vary fastest
    j = hb * BLOCK_H + offs_m % BLOCK_H
    row_ok = (t < q_len) & (j < G)
    seq_len = tl.minimum(tl.load(SeqLens + b), max_pages * PAGE)
    pos = seq_len - q_len + t  # [BLOCK_M]
    first = seq_len - q_len + tb * TOK
    last = seq_len - q_len + tl.minimum(tb * TOK + TOK, q_len) - 1
    full_end = tl.maximum(first + 1, 0) // BLOCK_N * BLOCK_N
    end = tl.maximum(last + 1, 0)
    return t, j, row_ok, pos, full_end, end


@triton.jit
def _store(acc, m_i, l_i, O, Lse, b, t, head, col, out_mask, row_ok, q_len, stride_ob, stride_ot, stride_oh,
           H_Q: tl.constexpr):
    """Normalise ``acc`` and write ``o [B, T, h_q, d_v]`` and ``lse [B, T, h_q]`` (natural log; a row
    without any key, possible only for a bad seq_len < T, gets o = 0 and lse = -inf)."""
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + b * stride_ob + t[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + col
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=out_mask)
    tl.store(Lse + (b * q_len + t) * H_Q + head, lse, mask=row_ok)


@triton.jit
def _separate_step(acc, m_i, l_i, q, Cache, bt_row, n0, end, pos, k_col, v_col, d_ok, k_t0, v_t0, t_ok,
                   sm_scale_log2, dt: tl.constexpr, PAGE: tl.constexpr, ROW: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP8: tl.constexpr, SCALES: tl.constexpr, TILE: tl.constexpr, NTB: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, MASK: tl.constexpr):
    """One K/V tile of the separate kernel: scores, online softmax, PV (causal mask if ``MASK``)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < end
    tile, rows = tile_rows(Cache, bt_row, n0, offs_n, n_ok, PAGE, ROW, BLOCK_N)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = load_elements(tile, rows, k_col, kv_mask, n_ok, k_t0, t_ok, dt, FP8, SCALES, TILE, NTB, UPCAST)
    v = load_elements(tile, rows, v_col, kv_mask, n_ok, v_t0, t_ok, dt, FP8, SCALES, TILE, NTB, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
    if MASK:
        s = tl.where((offs_n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
    p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(round_p(p, dt, UPCAST), v, input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _prefill_separate_kernel(
    Q,  # [B, T, h_q, d_h]
    Cache,  # [num_pages, PAGE, ROW]
    BlockTable,  # [B, max_pages] int32
    SeqLens,  # [B] int32
    O,  # [B, T, h_q, d_h]
    Lse,  # [B, T, h_q] fp32, contiguous
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_bt,
    max_pages,
    q_len,  # T: runtime, one compiled kernel for every chunk length
    num_tb,  # token blocks (grid axis 1)
    sm_scale_log2,
    H_Q: tl.constexpr, H_KV: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, ROW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HB_PER_KV: tl.constexpr, STAGES: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: its bf16/fp16 tl.dot is wrong, so dot in fp32
    FP8: tl.constexpr, SCALES: tl.constexpr, TILE: tl.constexpr,
):
    pid_h = tl.program_id(0)
    tb = num_tb - 1 - tl.program_id(1)  # heaviest (latest) token blocks first
    b = tl.program_id(2).to(tl.int64)
    kvh = pid_h // HB_PER_KV
    hb = pid_h % HB_PER_KV
    t, j, row_ok, pos, full_end, end = _rows_of_program(SeqLens, b, tb, hb, q_len, max_pages, G, PAGE, BLOCK_H,
                                                        BLOCK_M, BLOCK_N)
    head = kvh * G + j
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + t[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_col = kvh * HEAD_DIM + offs_d
    v_col = (H_KV + kvh) * HEAD_DIM + offs_d
    NTB: tl.constexpr = BLOCK_D // TILE if (TILE & (TILE - 1)) == 0 else 1
    k_t0 = kvh * (HEAD_DIM // TILE)
    v_t0 = (H_KV + kvh) * (HEAD_DIM // TILE)
    t_ok = tl.arange(0, NTB) * TILE < HEAD_DIM
    dt = Q.dtype.element_ty
    bt_row = BlockTable + b * stride_bt
    for n0 in tl.range(0, full_end, BLOCK_N, num_stages=STAGES):  # every row sees the whole tile
        acc, m_i, l_i = _separate_step(acc, m_i, l_i, q, Cache, bt_row, n0, end, pos, k_col, v_col, d_ok, k_t0,
                                       v_t0, t_ok, sm_scale_log2, dt, PAGE, ROW, BLOCK_N, FP8, SCALES, TILE, NTB,
                                       UPCAST, DOT_PREC, False)
    for n0 in tl.range(full_end, end, BLOCK_N):  # tiles crossing the diagonal
        acc, m_i, l_i = _separate_step(acc, m_i, l_i, q, Cache, bt_row, n0, end, pos, k_col, v_col, d_ok, k_t0,
                                       v_t0, t_ok, sm_scale_log2, dt, PAGE, ROW, BLOCK_N, FP8, SCALES, TILE, NTB,
                                       UPCAST, DOT_PREC, True)
    _store(acc, m_i, l_i, O, Lse, b, t, head, offs_d[None, :], row_ok[:, None] & d_ok[None, :], row_ok, q_len,
           stride_ob, stride_ot, stride_oh, H_Q)


@triton.jit
def _tied_step(acc, m_i, l_i, q_n, q_r, Cache, bt_row, n0, end, pos, s_col, s_ok, k_col, k_ok, r_col, r_ok, s_t0,
               t_ok, k_t0, k_tok, sm_scale_log2, dt: tl.constexpr, PAGE: tl.constexpr, ROW: tl.constexpr,
               BLOCK_N: tl.constexpr, FP8: tl.constexpr, SCALES: tl.constexpr, PLAIN: tl.constexpr,
               TILE: tl.constexpr, NTB: tl.constexpr, NTB_K: tl.constexpr, SPLIT_K: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, MASK: tl.constexpr):
    """One state tile of the tied kernel: it is both key (with the rope tile) and value.

    ``SPLIT_K`` (GTA: the key takes half the state; or a program owning only part of the value
    columns, ``DV_SPLIT``): the key's ``[BLOCK_N, BLOCK_K]`` columns are loaded as their own tile
    (the same rows: an L1/L2 hit), so ``QKᵀ`` does not multiply zeros."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < end
    tile, rows = tile_rows(Cache, bt_row, n0, offs_n, n_ok, PAGE, ROW, BLOCK_N)
    kr = load_plain(tile, rows, r_col, n_ok[:, None] & r_ok[None, :], dt, FP8, PLAIN, UPCAST)  # [BLOCK_N, BLOCK_R]
    st = load_elements(tile, rows, s_col, n_ok[:, None] & s_ok[None, :], n_ok, s_t0, t_ok, dt, FP8, SCALES, TILE,
                       NTB, UPCAST)  # [BLOCK_N, BLOCK_DV]: the program's value columns
    if SPLIT_K:
        kn = load_elements(tile, rows, k_col, n_ok[:, None] & k_ok[None, :], n_ok, k_t0, k_tok, dt, FP8, SCALES,
                           TILE, NTB_K, UPCAST)  # [BLOCK_N, BLOCK_K]
        s = tl.dot(q_n, tl.trans(kn), input_precision=DOT_PREC)
    else:
        s = tl.dot(q_n, tl.trans(st), input_precision=DOT_PREC)
    s = tl.dot(q_r, tl.trans(kr), s, input_precision=DOT_PREC) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
    if MASK:
        s = tl.where((offs_n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
    p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(round_p(p, dt, UPCAST), st, input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _prefill_tied_kernel(
    Q,  # [B, T, h_q, NOPE + ROPE]
    Cache,  # [num_pages, PAGE, ROW], ROW = S * STATE_DIM + ROPE
    BlockTable,  # [B, max_pages] int32
    SeqLens,  # [B] int32
    O,  # [B, T, h_q, DV]
    Lse,  # [B, T, h_q] fp32, contiguous
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, stride_bt,
    max_pages,
    q_len,
    num_tb,
    sm_scale_log2,
    H_Q: tl.constexpr, S: tl.constexpr, G: tl.constexpr, STATE_DIM: tl.constexpr, NOPE: tl.constexpr,
    ROPE: tl.constexpr, DV: tl.constexpr,
    BLOCK_DS: tl.constexpr,  # pow2 >= max(NOPE, DV)
    DV_SPLIT: tl.constexpr,  # programs sharing one (state head, head block, token block), each BLOCK_DS/DV_SPLIT value cols
    BLOCK_K: tl.constexpr,  # pow2 >= NOPE: the key's state columns (< BLOCK_DS: SPLIT_K)
    BLOCK_R: tl.constexpr,  # pow2 >= ROPE
    PAGE: tl.constexpr, ROW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HB_PER_S: tl.constexpr, STAGES: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    FP8: tl.constexpr, SCALES: tl.constexpr, PLAIN: tl.constexpr, TILE: tl.constexpr,
):
    pid_h = tl.program_id(0)
    tb = num_tb - 1 - tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    sh = pid_h // (HB_PER_S * DV_SPLIT)
    hb = pid_h // DV_SPLIT % HB_PER_S
    dvs = pid_h % DV_SPLIT  # value-column split of neighbouring programs (the same tiles, via L2)
    t, j, row_ok, pos, full_end, end = _rows_of_program(SeqLens, b, tb, hb, q_len, max_pages, G, PAGE, BLOCK_H,
                                                        BLOCK_M, BLOCK_N)
    head = sh * G + j
    BLOCK_DV: tl.constexpr = BLOCK_DS // DV_SPLIT
    offs_s = dvs * BLOCK_DV + tl.arange(0, BLOCK_DV)  # the program's state (value) columns
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < ROPE
    USED: tl.constexpr = NOPE if NOPE > DV else DV
    q_base = Q + b * stride_qb + t[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
    # the no-RoPE query is zero past its NOPE columns, so one dot over the state (or key) tile gives q_nope.k_nope
    SPLIT_K: tl.constexpr = BLOCK_K < BLOCK_DS or DV_SPLIT > 1
    s_ok = offs_s < (DV if SPLIT_K else USED)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < NOPE
    q_n = tl.load(q_base + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    q_r = tl.load(q_base + NOPE + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    if UPCAST:
        q_n = q_n.to(tl.float32)
        q_r = q_r.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    s_col = sh * STATE_DIM + offs_s
    if FP8:
        r_col = offs_r  # bf16 elements after the scales
    else:
        r_col = S * STATE_DIM + offs_r
    POW2: tl.constexpr = (TILE & (TILE - 1)) == 0
    NTB: tl.constexpr = BLOCK_DV // TILE if POW2 else 1
    NTB_K: tl.constexpr = BLOCK_K // TILE if POW2 else 1  # the launcher keeps BLOCK_K >= TILE for fp8
    k_t0 = sh * (STATE_DIM // TILE)
    s_t0 = k_t0 + dvs * BLOCK_DV // TILE  # (power-of-two tiles; others index their scales per column)
    t_ok = dvs * BLOCK_DV + tl.arange(0, NTB) * TILE < USED
    k_tok = tl.arange(0, NTB_K) * TILE < NOPE
    k_col = sh * STATE_DIM + offs_k
    dt = Q.dtype.element_ty
    bt_row = BlockTable + b * stride_bt
    for n0 in tl.range(0, full_end, BLOCK_N, num_stages=STAGES):
        acc, m_i, l_i = _tied_step(acc, m_i, l_i, q_n, q_r, Cache, bt_row, n0, end, pos, s_col, s_ok, k_col, k_ok,
                                   r_col, r_ok, s_t0, t_ok, k_t0, k_tok, sm_scale_log2, dt, PAGE, ROW, BLOCK_N, FP8, SCALES,
                                   PLAIN, TILE, NTB, NTB_K, SPLIT_K, UPCAST, DOT_PREC, False)
    for n0 in tl.range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _tied_step(acc, m_i, l_i, q_n, q_r, Cache, bt_row, n0, end, pos, s_col, s_ok, k_col, k_ok,
                                   r_col, r_ok, s_t0, t_ok, k_t0, k_tok, sm_scale_log2, dt, PAGE, ROW, BLOCK_N, FP8, SCALES,
                                   PLAIN, TILE, NTB, NTB_K, SPLIT_K, UPCAST, DOT_PREC, True)
    _store(acc, m_i, l_i, O, Lse, b, t, head, offs_s[None, :], row_ok[:, None] & (offs_s < DV)[None, :], row_ok,
           q_len, stride_ob, stride_ot, stride_oh, H_Q)


def _launch(kernel, q, cache, block_table, seq_lens, *, d_v, group, num_kv, softmax_scale, meta, cfg, out):
    """Outputs, grid ``(kv heads x head blocks, token blocks, B)`` and the launch shared by both kernels."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    B, T = q.shape[0], q.shape[1]
    o, lse, _, _ = alloc_outputs(q, d_v, 1, out)
    if not lse.is_contiguous():
        raise ValueError("out: lse must be contiguous")
    block_h, block_m = cfg["BLOCK_H"], cfg["BLOCK_M"]
    if block_h < 1 or block_h & (block_h - 1) or block_m % block_h:
        raise ValueError(f"config: BLOCK_H={block_h} must be a power of two dividing BLOCK_M={block_m}")
    hb = cdiv(group, block_h)
    num_tb = cdiv(T, block_m // block_h)
    meta = dict(
        meta,
        PAGE=cache.shape[1],
        ROW=cache.shape[2],
        BLOCK_H=block_h,
        BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"],
        STAGES=cfg["num_stages"],
        DOT_PREC="ieee" if q.dtype == torch.float32 or INTERPRET else "tf32",
        UPCAST=INTERPRET and q.dtype != torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    kernel[(num_kv * hb, num_tb, B)](
        q, cache, block_table, seq_lens, o, lse,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), block_table.stride(0),
        block_table.shape[1], T, num_tb, softmax_scale * LOG2E, **meta,
    )
    return o, lse


def _config(cfg: dict, overrides: dict | None) -> dict:
    """The heuristic blocks with ``overrides``; a smaller BLOCK_M alone also caps BLOCK_H."""
    out = {**cfg, **(overrides or {})}
    if overrides and "BLOCK_H" not in overrides:
        out["BLOCK_H"] = min(out["BLOCK_H"], out["BLOCK_M"])
    return out


def _fmt_meta(kv_format: RowFormat | None) -> dict:
    fp8 = kv_format is not None and kv_format.is_fp8
    return dict(FP8=fp8, SCALES=kv_format.scale_offset if fp8 else 0, TILE=kv_format.tile if fp8 else 1)


def prefill_separate_triton(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    softmax_scale: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the separate-KV prefill kernel (inputs already validated by ``kvslim.kernels``).

    Args:
        q: ``[B, T, h_q, d_h]``, any T >= 1; cache ``[num_pages, page_size, 2*h_kv*d_h]`` contiguous
            (or packed fp8 uint8 rows with ``kv_format``); block_table ``[B, max_pages]`` int32;
            seq_lens ``[B]`` int32 (including the T new tokens).
        out: optional preallocated ``(o [B, T, h_q, d_h] q.dtype, lse [B, T, h_q] fp32 contiguous)``.
        config: overrides of the heuristic blocks (BLOCK_H, BLOCK_M, BLOCK_N, num_warps, num_stages).

    Returns:
        ``(o, lse)``.
    """
    h_q = q.shape[2]
    g = h_q // num_kv_heads
    fp8 = kv_format is not None and kv_format.is_fp8
    cfg = _config(prefill_config(group=g, state_block=max(16, next_pow2(head_dim)), dtype=q.dtype, fp8=fp8), config)
    meta = dict(H_Q=h_q, H_KV=num_kv_heads, G=g, HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
                HB_PER_KV=cdiv(g, cfg["BLOCK_H"]), **_fmt_meta(kv_format))
    return _launch(_prefill_separate_kernel, q, cache, block_table, seq_lens, d_v=head_dim, group=g,
                   num_kv=num_kv_heads, softmax_scale=softmax_scale, meta=meta, cfg=cfg, out=out)


def prefill_tied_triton(
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
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the tied-state prefill kernel (inputs already validated by ``kvslim.kernels``).

    Args:
        q: ``[B, T, h_q, nope_dim + rope_dim]``, any T >= 1; cache
            ``[num_pages, page_size, S*state_dim + rope_dim]`` contiguous (or packed fp8 rows with
            ``kv_format``); block_table, seq_lens as in :func:`prefill_separate_triton`.
        out: optional preallocated ``(o [B, T, h_q, v_dim], lse [B, T, h_q] fp32 contiguous)``.
        config: overrides of the heuristic blocks (BLOCK_H, BLOCK_M, BLOCK_N, num_warps, num_stages, and
            DV_SPLIT: programs splitting the value columns of one head block, each recomputing QKᵀ).

    Returns:
        ``(o, lse)``.
    """
    h_q = q.shape[2]
    g = h_q // num_state_heads
    fp8 = kv_format is not None and kv_format.is_fp8
    block_ds = max(16, next_pow2(max(nope_dim, v_dim)))
    block_k = max(16, next_pow2(nope_dim))
    if fp8 and not kv_format.tile & (kv_format.tile - 1) and block_k < kv_format.tile:
        block_k = block_ds  # a key narrower than one scale tile: no separate key tile
    cfg = _config(prefill_config(group=g, state_block=block_ds, dtype=q.dtype, fp8=fp8), config)
    dvs = cfg.get("DV_SPLIT", 1)
    min_dv = kv_format.tile if fp8 and not kv_format.tile & (kv_format.tile - 1) else 16
    if dvs < 1 or dvs & (dvs - 1) or block_ds // dvs < min_dv:
        raise ValueError(f"config: DV_SPLIT={dvs} must be a power of two leaving >= {min_dv} of the "
                         f"{block_ds} state columns per program")
    fm = _fmt_meta(kv_format)
    meta = dict(H_Q=h_q, S=num_state_heads, G=g, STATE_DIM=state_dim, NOPE=nope_dim, ROPE=rope_dim, DV=v_dim,
                BLOCK_DS=block_ds, DV_SPLIT=dvs, BLOCK_K=block_k, BLOCK_R=max(16, next_pow2(max(rope_dim, 1))),
                HB_PER_S=cdiv(g, cfg["BLOCK_H"]), PLAIN=kv_format.plain_offset if fm["FP8"] else 0, **fm)
    return _launch(_prefill_tied_kernel, q, cache, block_table, seq_lens, d_v=v_dim, group=g,
                   num_kv=num_state_heads * dvs, softmax_scale=softmax_scale, meta=meta, cfg=cfg, out=out)
