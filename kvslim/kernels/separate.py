"""Triton decode kernel for separate K/V caches: MHA, MQA, GQA (seed 000 §3, DESIGN.md §6).

Cache row of one token: ``[K (h_kv * d_h) | V (h_kv * d_h)]``. One program owns one
sequence, one KV head and one KV split; the query heads of that KV head times the
``q_len`` new tokens form the M side of both ``tl.dot``s, so each K/V tile is read from
memory once for the whole group. Splits are merged by :mod:`kvslim.kernels.combine`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvslim.kernels.blocks import (
    e4m3_to_f16_in_registers,
    load_elements,
    load_fp8,
    load_fp8_raw,
    load_row_scale,
    round_p,
    softmax_update,
    split_range,
    store_output,
    tile_rows_paged,
)
from kvslim.kernels.heuristics import cdiv, next_pow2, separate_config
from kvslim.kernels.launch import launch_decode
from kvslim.rows import RowFormat

CONFIG_KEYS = {"BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "maxnreg", "FP8_PATH", "GATHER"}


@triton.jit
def _separate_kernel(
    Q,  # [B, q_len, h_q, d_h]
    Cache,  # [num_pages, PAGE, ROW]
    BlockTable,  # [B, max_pages] int32
    SeqLens,  # [B] int32
    O,  # [B, q_len, h_q, d_h]            (NUM_SPLITS == 1)
    Lse,  # [B, q_len, h_q] fp32
    OPart,  # [B, q_len, h_q, NUM_SPLITS, d_h] fp32 (NUM_SPLITS > 1)
    LsePart,  # [B, q_len, h_q, NUM_SPLITS] fp32
    stride_qb,
    stride_qt,
    stride_qh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_bt,
    max_pages,
    sm_scale_log2,
    H_Q: tl.constexpr,
    H_KV: tl.constexpr,
    G: tl.constexpr,
    Q_LEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    ROW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HB_PER_KV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    STAGES: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: its bf16/fp16 tl.dot is wrong, so dot in fp32
    FP8: tl.constexpr,  # packed e4m3 rows (kvslim.rows): ROW is in bytes
    SCALES: tl.constexpr,  # fp8: byte offset of the fp32 scales in a row
    TILE: tl.constexpr,  # fp8: channels per scale
    F16: tl.constexpr,  # fp8 fast path: dot in fp16 (16-bit queries); else in fp32
    FP8_PATH: tl.constexpr,  # fp8: 0 dequantize elements, 1 fold scales, 2 fold + convert once where loaded
    GATHER: tl.constexpr,  # tiles spanning pages: 0 one page id per row, 1 one per page ([pages, PAGE])
):
    # Head blocks of one sequence are neighbours in launch order, so the programs sharing
    # a sequence's tiles (rope key, latent of several head blocks) hit them in L2.
    pid_h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    kvh = pid_h // HB_PER_KV
    hb = pid_h % HB_PER_KV

    # Row m of the tile is (new token t, head j of the group): heads vary fastest.
    offs_m = tl.arange(0, BLOCK_M)
    t_q = offs_m // BLOCK_H  # [BLOCK_M]
    j = hb * BLOCK_H + offs_m % BLOCK_H
    row_ok = (t_q < Q_LEN) & (j < G)
    head = kvh * G + j
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + t_q[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    pos, start, end = split_range(SeqLens, b, split, max_pages, t_q, PAGE, Q_LEN, NUM_SPLITS, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_col = kvh * HEAD_DIM + offs_d  # [BLOCK_D]
    v_col = (H_KV + kvh) * HEAD_DIM + offs_d
    # fp8: the NTB scale tiles that cover a head's BLOCK_D columns
    NTB: tl.constexpr = BLOCK_D // TILE if (TILE & (TILE - 1)) == 0 else 1
    k_t0 = kvh * (HEAD_DIM // TILE)
    v_t0 = (H_KV + kvh) * (HEAD_DIM // TILE)
    t_ok = tl.arange(0, NTB) * TILE < HEAD_DIM
    dt = Q.dtype.element_ty
    # the fp8 fast path converts e4m3 to fp16 (one instruction per two values) and dots in fp16
    if F16:
        ddt = tl.float16
    else:
        ddt = tl.float32
    q16 = q if UPCAST else q.to(ddt)
    FOLD: tl.constexpr = FP8 and NTB == 1 and (TILE & (TILE - 1)) == 0 and FP8_PATH >= 1
    bt_row = BlockTable + b * stride_bt
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):  # cp.async pipeline
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        n_ok = offs_n < end
        tile, rows = tile_rows_paged(Cache, bt_row, n0, offs_n, n_ok, end, PAGE, ROW, BLOCK_N, GATHER)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if FOLD:
            # one scale per token per head: fold it into the scores (K) and probabilities (V), so
            # the tile itself is only converted, not multiplied element by element
            if FP8_PATH == 2 and F16 and not UPCAST:  # converted once, where loaded (see tied.py)
                k = e4m3_to_f16_in_registers(load_fp8_raw(tile, rows, k_col, kv_mask))  # [BLOCK_N, BLOCK_D]
                v = e4m3_to_f16_in_registers(load_fp8_raw(tile, rows, v_col, kv_mask))
            else:
                k = load_fp8(tile, rows, k_col, kv_mask, ddt, UPCAST)  # [BLOCK_N, BLOCK_D]
                v = load_fp8(tile, rows, v_col, kv_mask, ddt, UPCAST)
            ks = load_row_scale(tile, rows, n_ok, k_t0, SCALES)  # [BLOCK_N]
            vs = load_row_scale(tile, rows, n_ok, v_t0, SCALES)
            s = tl.dot(q16, tl.trans(k), input_precision=DOT_PREC) * (ks * sm_scale_log2)[None, :]
        else:
            k = load_elements(tile, rows, k_col, kv_mask, n_ok, k_t0, t_ok, dt, FP8, SCALES, TILE, NTB, UPCAST)
            v = load_elements(tile, rows, v_col, kv_mask, n_ok, v_t0, t_ok, dt, FP8, SCALES, TILE, NTB, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        keep = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)  # p [BLOCK_M, BLOCK_N]
        if FOLD:
            pv = tl.dot(round_p(p * vs[None, :], ddt, UPCAST), v, input_precision=DOT_PREC)
        else:
            pv = tl.dot(round_p(p, dt, UPCAST), v, input_precision=DOT_PREC)
        acc = acc * alpha[:, None] + pv

    store_output(acc, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, offs_d[None, :],
                 row_ok[:, None] & d_ok[None, :], row_ok, stride_ob, stride_ot, stride_oh, H_Q, Q_LEN, HEAD_DIM,
                 NUM_SPLITS)


def decode_separate_triton(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    softmax_scale: float,
    num_splits: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the separate-KV decode kernel (inputs already validated by ``kvslim.kernels``).

    Args:
        q: ``[B, q_len, h_q, d_h]``; cache ``[num_pages, page_size, 2*h_kv*d_h]`` contiguous;
            block_table ``[B, max_pages]`` int32; seq_lens ``[B]`` int32.
        num_splits: KV splits; None picks one from shapes (host-side, graph-safe).
        out: optional preallocated ``(o [B, q_len, h_q, d_h] q.dtype, lse [B, q_len, h_q] fp32)``;
            lse must be contiguous.
        config: overrides of the heuristic blocks (BLOCK_H, BLOCK_N, num_warps, num_stages, maxnreg) and
            code paths ``FP8_PATH`` (0, 1, 2) and ``GATHER`` (0, 1), as in
            :func:`kvslim.kernels.tied.decode_tied_triton`.
        kv_format: the packed fp8 row of a uint8 ``cache`` (``kvslim.rows.RowFormat``); None for a
            cache of q's dtype.

    Returns:
        ``(o, lse)``.
    """
    B, q_len, h_q, d = q.shape
    fmt = kv_format
    fp8 = fmt is not None and fmt.is_fp8
    g = h_q // num_kv_heads
    cfg = separate_config(group=g, q_len=q_len, head_dim=head_dim, dtype=q.dtype, fp8=fp8)
    if config:
        bad = set(config) - CONFIG_KEYS
        if bad:
            raise ValueError(f"config: unknown keys {sorted(bad)}, expected some of {sorted(CONFIG_KEYS)}")
        cfg.update(config)
        cfg["BLOCK_M"] = max(16, next_pow2(cfg["BLOCK_H"] * q_len))
    if cfg["FP8_PATH"] not in (0, 1, 2) or cfg["GATHER"] not in (0, 1):
        raise ValueError(f"config: FP8_PATH must be 0, 1 or 2 and GATHER 0 or 1, got {cfg['FP8_PATH']}, "
                         f"{cfg['GATHER']}")
    hb_per_kv = cdiv(g, cfg["BLOCK_H"])
    meta = dict(
        H_Q=h_q,
        H_KV=num_kv_heads,
        G=g,
        Q_LEN=q_len,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_pow2(head_dim)),
        PAGE=cache.shape[1],
        ROW=cache.shape[2],
        FP8=fp8,
        SCALES=fmt.scale_offset if fp8 else 0,
        TILE=fmt.tile if fp8 else 1,
        F16=q.dtype != torch.float32,
        FP8_PATH=cfg["FP8_PATH"],
        GATHER=cfg["GATHER"],
        BLOCK_H=cfg["BLOCK_H"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        HB_PER_KV=hb_per_kv,
    )
    return launch_decode(
        _separate_kernel,
        q,
        cache,
        block_table,
        seq_lens,
        d_v=head_dim,
        softmax_scale=softmax_scale,
        meta=meta,
        cfg=cfg,
        head_blocks=num_kv_heads * hb_per_kv,
        num_splits=num_splits,
        out=out,
    )
