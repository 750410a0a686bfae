"""Triton decode kernel for tied-state caches: GTA, absorbed MLA, absorbed GLA (seed 000 §3-4).

Cache row of one token: ``[state (S * state_dim) | rope key (d_R)]``. Query head ``h``
reads state head ``h // (h_q / S)``; its key is ``concat(state[:d_nope], rope)`` and its
value ``state[:d_v]``. One program owns one sequence, one block of query heads of a state
head and one KV split: each ``[BLOCK_N, state]`` tile is loaded once and feeds both
``QKᵀ`` (against the zero-padded no-RoPE query) and ``PV`` — the arithmetic-intensity gain
that makes GTA/GLA/MLA decode fast. Heads x new tokens form the M side of ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvslim.kernels.blocks import (
    fp8_state_tile,
    fp8_state_tile_f16,
    load_elements,
    load_plain,
    round_p,
    softmax_update,
    split_range,
    store_output,
    tile_rows_paged,
)
from kvslim.kernels.heuristics import cdiv, next_pow2, tied_config
from kvslim.kernels.launch import launch_decode
from kvslim.rows import RowFormat

CONFIG_KEYS = {"BLOCK_H", "BLOCK_N", "SPG", "num_warps", "num_stages", "maxnreg", "FP8_PATH", "GATHER"}


@triton.jit
def _tied_kernel(
    Q,  # [B, q_len, h_q, NOPE + ROPE]
    Cache,  # [num_pages, PAGE, ROW], ROW = S * STATE_DIM + ROPE
    BlockTable,  # [B, max_pages] int32
    SeqLens,  # [B] int32
    O,  # [B, q_len, h_q, DV]                (NUM_SPLITS == 1)
    Lse,  # [B, q_len, h_q] fp32
    OPart,  # [B, q_len, h_q, NUM_SPLITS, DV] fp32 (NUM_SPLITS > 1)
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
    S: tl.constexpr,
    G: tl.constexpr,
    Q_LEN: tl.constexpr,
    STATE_DIM: tl.constexpr,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DS: tl.constexpr,  # pow2 >= (SPG-1)*STATE_DIM + max(NOPE, DV): state columns per tile
    BLOCK_R: tl.constexpr,  # pow2 >= ROPE
    PAGE: tl.constexpr,
    ROW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HB_PER_S: tl.constexpr,
    SPG: tl.constexpr,  # state heads per program (block-diagonal trick, see below)
    NUM_SPLITS: tl.constexpr,
    STAGES: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: its bf16/fp16 tl.dot is wrong, so dot in fp32
    FP8: tl.constexpr,  # packed e4m3 rows (kvslim.rows): ROW is in bytes
    SCALES: tl.constexpr,  # fp8: byte offset of the fp32 scales in a row
    PLAIN: tl.constexpr,  # fp8: byte offset of the bf16 RoPE key in a row
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
    sh0 = (pid_h // HB_PER_S) * SPG  # first state head of this program
    hb = pid_h % HB_PER_S

    # Row m = (new token t, state head sh0 + u, head j of its group). With SPG > 1 a
    # program covers SPG adjacent state heads (narrow GTA states): the tile holds all their
    # columns, each row's query sits at its own head's offset (zeros elsewhere), so one
    # dot computes every row's score, the rope tile is loaded once for SPG heads, and each
    # row keeps only its own head's value columns. Costs SPG x the FLOPs, which GTA's
    # low arithmetic intensity leaves idle anyway.
    offs_m = tl.arange(0, BLOCK_M)
    t_q = offs_m // (SPG * BLOCK_H)  # [BLOCK_M] new token
    u = (offs_m // BLOCK_H) % SPG  # [BLOCK_M] state head within the program
    j = hb * BLOCK_H + offs_m % BLOCK_H  # head within the state head's group
    row_ok = (t_q < Q_LEN) & (j < G)
    head = (sh0 + u) * G + j
    offs_s = tl.arange(0, BLOCK_DS)
    offs_r = tl.arange(0, BLOCK_R)
    USED: tl.constexpr = (SPG - 1) * STATE_DIM + (NOPE if NOPE > DV else DV)
    s_ok = offs_s < USED
    col = offs_s[None, :] - u[:, None] * STATE_DIM  # [BLOCK_M, BLOCK_DS] column within the row's head

    # The no-RoPE query is zero outside its head's first NOPE columns, so one dot over the
    # state tile gives q_nope.k_nope.
    q_base = Q + b * stride_qb + t_q[:, None] * stride_qt + head[:, None] * stride_qh
    q_n = tl.load(q_base + col, mask=row_ok[:, None] & (col >= 0) & (col < NOPE), other=0.0)
    q_r = tl.load(q_base + NOPE + offs_r[None, :], mask=row_ok[:, None] & (offs_r < ROPE)[None, :], other=0.0)
    # q_n [BLOCK_M, BLOCK_DS], q_r [BLOCK_M, BLOCK_R]
    if UPCAST:
        q_n = q_n.to(tl.float32)
        q_r = q_r.to(tl.float32)

    pos, start, end = split_range(SeqLens, b, split, max_pages, t_q, PAGE, Q_LEN, NUM_SPLITS, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DS], dtype=tl.float32)
    s_col = sh0 * STATE_DIM + offs_s  # [BLOCK_DS]
    if FP8:
        r_col = offs_r  # [BLOCK_R] bf16 elements after the scales
    else:
        r_col = S * STATE_DIM + offs_r  # [BLOCK_R]
    dt = Q.dtype.element_ty
    # fp8: the NTB scale tiles that cover the state columns of this program
    NTB: tl.constexpr = BLOCK_DS // TILE if (TILE & (TILE - 1)) == 0 else 1
    s_t0 = sh0 * (STATE_DIM // TILE)
    t_ok = tl.arange(0, NTB) * TILE < USED
    bt_row = BlockTable + b * stride_bt
    # fp8 fast path (power-of-two tiles, at most 4 per program): each e4m3 scale tile is only
    # converted (to fp16, one instruction per two values); its per-token scale multiplies that
    # tile's scores and probabilities instead of every element. One accumulator per tile (MLA's
    # 512 = 4 x 128, GLA's 256 = 2 x 128, GTA's SPG heads), the query split alike.
    FAST: tl.constexpr = FP8 and (TILE & (TILE - 1)) == 0 and NTB <= 4 and FP8_PATH >= 1
    if F16:
        ddt = tl.float16
    else:
        ddt = tl.float32
    c0 = sh0 * STATE_DIM
    if FAST:
        q0 = load_q_tile(q_base, u, row_ok, 0, TILE, STATE_DIM, NOPE, ddt, UPCAST)
        acc0 = tl.zeros([BLOCK_M, TILE], dtype=tl.float32)
        if NTB > 1:
            q1 = load_q_tile(q_base, u, row_ok, 1, TILE, STATE_DIM, NOPE, ddt, UPCAST)
            acc1 = tl.zeros([BLOCK_M, TILE], dtype=tl.float32)
        if NTB > 2:
            q2 = load_q_tile(q_base, u, row_ok, 2, TILE, STATE_DIM, NOPE, ddt, UPCAST)
            q3 = load_q_tile(q_base, u, row_ok, 3, TILE, STATE_DIM, NOPE, ddt, UPCAST)
            acc2 = tl.zeros([BLOCK_M, TILE], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_M, TILE], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):  # cp.async pipeline
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        tile, rows = tile_rows_paged(Cache, bt_row, n0, offs_n, n_ok, end, PAGE, ROW, BLOCK_N, GATHER)
        kr = load_plain(tile, rows, r_col, n_ok[:, None] & (offs_r < ROPE)[None, :], dt, FP8, PLAIN, UPCAST)
        if FAST:
            st0, sc0 = _state_tile(tile, rows, n_ok, c0, 0, s_t0, TILE, USED, SCALES, ddt, UPCAST, FP8_PATH)
            s = tl.dot(q0, tl.trans(st0), input_precision=DOT_PREC) * sc0[None, :]
            if NTB > 1:
                st1, sc1 = _state_tile(tile, rows, n_ok, c0, 1, s_t0, TILE, USED, SCALES, ddt, UPCAST, FP8_PATH)
                s += tl.dot(q1, tl.trans(st1), input_precision=DOT_PREC) * sc1[None, :]
            if NTB > 2:
                st2, sc2 = _state_tile(tile, rows, n_ok, c0, 2, s_t0, TILE, USED, SCALES, ddt, UPCAST, FP8_PATH)
                st3, sc3 = _state_tile(tile, rows, n_ok, c0, 3, s_t0, TILE, USED, SCALES, ddt, UPCAST, FP8_PATH)
                s += tl.dot(q2, tl.trans(st2), input_precision=DOT_PREC) * sc2[None, :]
                s += tl.dot(q3, tl.trans(st3), input_precision=DOT_PREC) * sc3[None, :]
        else:
            st = load_elements(tile, rows, s_col, n_ok[:, None] & s_ok[None, :], n_ok, s_t0, t_ok, dt, FP8, SCALES,
                               TILE, NTB, UPCAST)
            # st [BLOCK_N, BLOCK_DS] is both key (first NOPE cols) and value (first DV cols)
            s = tl.dot(q_n, tl.trans(st), input_precision=DOT_PREC)
        s = tl.dot(q_r, tl.trans(kr), s, input_precision=DOT_PREC)
        s = s * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        keep = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i)  # p [BLOCK_M, BLOCK_N]
        if FAST:
            acc0 = acc0 * alpha[:, None] + tl.dot(round_p(p * sc0[None, :], ddt, UPCAST), st0,
                                                  input_precision=DOT_PREC)
            if NTB > 1:
                acc1 = acc1 * alpha[:, None] + tl.dot(round_p(p * sc1[None, :], ddt, UPCAST), st1,
                                                      input_precision=DOT_PREC)
            if NTB > 2:
                acc2 = acc2 * alpha[:, None] + tl.dot(round_p(p * sc2[None, :], ddt, UPCAST), st2,
                                                      input_precision=DOT_PREC)
                acc3 = acc3 * alpha[:, None] + tl.dot(round_p(p * sc3[None, :], ddt, UPCAST), st3,
                                                      input_precision=DOT_PREC)
        else:
            pv = tl.dot(round_p(p, dt, UPCAST), st, input_precision=DOT_PREC)
            acc = acc * alpha[:, None] + pv

    if FAST:
        _store_tile(acc0, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, u, row_ok, 0, stride_ob, stride_ot,
                    stride_oh, H_Q, Q_LEN, DV, NUM_SPLITS, TILE, STATE_DIM)
        if NTB > 1:
            _store_tile(acc1, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, u, row_ok, 1, stride_ob,
                        stride_ot, stride_oh, H_Q, Q_LEN, DV, NUM_SPLITS, TILE, STATE_DIM)
        if NTB > 2:
            _store_tile(acc2, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, u, row_ok, 2, stride_ob,
                        stride_ot, stride_oh, H_Q, Q_LEN, DV, NUM_SPLITS, TILE, STATE_DIM)
            _store_tile(acc3, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, u, row_ok, 3, stride_ob,
                        stride_ot, stride_oh, H_Q, Q_LEN, DV, NUM_SPLITS, TILE, STATE_DIM)
    else:
        store_output(acc, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, col,
                     row_ok[:, None] & (col >= 0) & (col < DV), row_ok, stride_ob, stride_ot, stride_oh, H_Q, Q_LEN,
                     DV, NUM_SPLITS)


@triton.jit
def _state_tile(tile, rows, n_ok, c0, t: tl.constexpr, s_t0, TILE: tl.constexpr, USED: tl.constexpr,
                SCALES: tl.constexpr, ddt: tl.constexpr, UPCAST: tl.constexpr, FP8_PATH: tl.constexpr):
    """Tile ``t`` of the state and its token scales for the S = Q K^T fold: converted where the dots need it
    (FP8_PATH 1, as Triton places it) or once, where loaded (2, with fp16 dots)."""
    if FP8_PATH == 2 and ddt == tl.float16:
        return fp8_state_tile_f16(tile, rows, n_ok, c0, t, s_t0, TILE, USED, SCALES, UPCAST)
    return fp8_state_tile(tile, rows, n_ok, c0, t, s_t0, TILE, USED, SCALES, ddt, UPCAST)


@triton.jit
def load_q_tile(q_base, u, row_ok, t: tl.constexpr, TILE: tl.constexpr, STATE_DIM: tl.constexpr,
                NOPE: tl.constexpr, ddt: tl.constexpr, UPCAST: tl.constexpr):
    """Columns ``t*TILE … (t+1)*TILE-1`` of the program's state space of the no-RoPE query
    ``[BLOCK_M, TILE]`` (zero outside each row's own head), in the fp8 path's dot dtype."""
    c = (t * TILE + tl.arange(0, TILE))[None, :] - u[:, None] * STATE_DIM
    q = tl.load(q_base + c, mask=row_ok[:, None] & (c >= 0) & (c < NOPE), other=0.0)
    if UPCAST:
        return q.to(tl.float32)
    return q.to(ddt)


@triton.jit
def _store_tile(acc, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, u, row_ok, t: tl.constexpr, stride_ob,
                stride_ot, stride_oh, H_Q: tl.constexpr, Q_LEN: tl.constexpr, DV: tl.constexpr,
                NUM_SPLITS: tl.constexpr, TILE: tl.constexpr, STATE_DIM: tl.constexpr):
    """The epilogue of one tile's accumulator (its output columns within each row's head)."""
    c = (t * TILE + tl.arange(0, TILE))[None, :] - u[:, None] * STATE_DIM
    store_output(acc, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, c,
                 row_ok[:, None] & (c >= 0) & (c < DV), row_ok, stride_ob, stride_ot, stride_oh, H_Q, Q_LEN, DV,
                 NUM_SPLITS)


def decode_tied_triton(
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
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
    kv_format: RowFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the tied-state decode kernel (inputs already validated by ``kvslim.kernels``).

    Args:
        q: ``[B, q_len, h_q, nope_dim + rope_dim]``; cache
            ``[num_pages, page_size, S*state_dim + rope_dim]`` contiguous; block_table
            ``[B, max_pages]`` int32; seq_lens ``[B]`` int32.
        num_splits: KV splits; None picks one from shapes (host-side, graph-safe).
        out: optional preallocated ``(o [B, q_len, h_q, v_dim], lse [B, q_len, h_q] fp32)``.
        config: overrides of the heuristic blocks (BLOCK_H, BLOCK_N, SPG, num_warps, num_stages, maxnreg)
            and code paths: ``FP8_PATH`` (fp8 rows: 0 dequantizes every element in fp32; 1 folds each
            128-channel tile's per-token scale into the scores and probabilities, converting e4m3 where the
            dots read it; 2, the default, folds likewise but converts each tile once, where loaded, and
            stages the fp16 tile for both dots: under 1 Triton converts in each dot's operand layout, so
            every warp converts the whole tile, and the tile's loads are not pipelined),
            ``GATHER`` (tiles spanning pages: 0 one page id per row, 1 one per page).
        kv_format: the packed fp8 row of a uint8 ``cache`` (``kvslim.rows.RowFormat``); None for a
            cache of q's dtype.

    Returns:
        ``(o, lse)``.
    """
    B, q_len, h_q, _ = q.shape
    fmt = kv_format
    fp8 = fmt is not None and fmt.is_fp8
    g = h_q // num_state_heads
    used = max(nope_dim, v_dim)
    cfg = tied_config(
        group=g,
        q_len=q_len,
        state_block=max(16, next_pow2(used)),
        num_state_heads=num_state_heads,
        page_size=cache.shape[1],
        dtype=q.dtype,
        fp8=fp8,
    )
    if config:
        bad = set(config) - CONFIG_KEYS
        if bad:
            raise ValueError(f"config: unknown keys {sorted(bad)}, expected some of {sorted(CONFIG_KEYS)}")
        cfg = {"SPG": 1, **cfg, **config}
        cfg["BLOCK_M"] = max(16, next_pow2(cfg["SPG"] * cfg["BLOCK_H"] * q_len))
    if cfg["FP8_PATH"] not in (0, 1, 2) or cfg["GATHER"] not in (0, 1):
        raise ValueError(f"config: FP8_PATH must be 0, 1 or 2 and GATHER 0 or 1, got {cfg['FP8_PATH']}, "
                         f"{cfg['GATHER']}")
    spg = cfg["SPG"]
    if num_state_heads % spg or (spg > 1 and cfg["BLOCK_H"] < g):
        raise ValueError(f"SPG={spg} must divide num_state_heads={num_state_heads} and cover whole groups")
    block_ds = max(16, next_pow2((spg - 1) * state_dim + used))
    hb_per_s = cdiv(g, cfg["BLOCK_H"])
    meta = dict(
        H_Q=h_q,
        S=num_state_heads,
        G=g,
        Q_LEN=q_len,
        STATE_DIM=state_dim,
        NOPE=nope_dim,
        ROPE=rope_dim,
        DV=v_dim,
        BLOCK_DS=block_ds,
        BLOCK_R=max(16, next_pow2(max(rope_dim, 1))),
        PAGE=cache.shape[1],
        ROW=cache.shape[2],
        FP8=fp8,
        SCALES=fmt.scale_offset if fp8 else 0,
        PLAIN=fmt.plain_offset if fp8 else 0,
        TILE=fmt.tile if fp8 else 1,
        F16=q.dtype != torch.float32,
        FP8_PATH=cfg["FP8_PATH"],
        GATHER=cfg["GATHER"],
        BLOCK_H=cfg["BLOCK_H"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        HB_PER_S=hb_per_s,
        SPG=spg,
    )
    return launch_decode(
        _tied_kernel,
        q,
        cache,
        block_table,
        seq_lens,
        d_v=v_dim,
        softmax_scale=softmax_scale,
        meta=meta,
        cfg=cfg,
        head_blocks=num_state_heads // spg * hb_per_s,
        num_splits=num_splits,
        out=out,
    )
