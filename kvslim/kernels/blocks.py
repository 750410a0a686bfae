"""``@triton.jit`` building blocks both decode kernels share (inlined by the compiler).

Paged tile addressing, the loads of cache elements (with the fp8 row's dequantization,
``kvslim.rows``), the online-softmax update, the rounding of P for the PV product, and the
epilogue that writes ``(o, lse)`` or, with split-KV, the fp32 partials.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_p(p, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Probabilities in the cache dtype for the PV dot (held in fp32 under UPCAST)."""
    p = p.to(dtype)
    if UPCAST:
        p = p.to(tl.float32)
    return p


@triton.jit
def tile_rows(Cache, bt_row, n0, offs_n, n_ok, PAGE: tl.constexpr, ROW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base pointer and per-row element offsets ``[BLOCK_N]`` of the cache rows of tokens offs_n.

    Tiles start at multiples of BLOCK_N, so when BLOCK_N divides the page size a tile lies in
    one page: one scalar page id, a 64-bit base and small affine offsets (cheap addresses,
    few registers). Otherwise each row gathers its own page id (int64 offsets).
    """
    if PAGE % BLOCK_N == 0:
        page = tl.load(bt_row + n0 // PAGE).to(tl.int64)
        tile = Cache + (page * PAGE + n0 % PAGE) * ROW
        rows = tl.arange(0, BLOCK_N) * ROW
    else:
        page = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0)
        tile = Cache
        rows = (page.to(tl.int64) * PAGE + offs_n % PAGE) * ROW
    return tile, rows


@triton.jit
def tile_rows_paged(Cache, bt_row, n0, offs_n, n_ok, end, PAGE: tl.constexpr, ROW: tl.constexpr,
                    BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """:func:`tile_rows` with a choice for tiles that span pages (``PAGE < BLOCK_N``, ``GATHER == 1``,
    ``BLOCK_N % PAGE == 0``): the tile's ``BLOCK_N / PAGE`` page ids are loaded once each and the row
    offsets built as a ``[pages, PAGE]`` block (one 64-bit product per page, not per row) instead of
    one page-id gather and 64-bit product per row (``GATHER == 0``, :func:`tile_rows`)."""
    if GATHER == 1 and PAGE < BLOCK_N and BLOCK_N % PAGE == 0:
        NP: tl.constexpr = BLOCK_N // PAGE
        first = n0 + tl.arange(0, NP) * PAGE  # [NP] first token of each page of the tile
        page = tl.load(bt_row + first // PAGE, mask=first < end, other=0).to(tl.int64)
        rows = (page[:, None] * PAGE + tl.arange(0, PAGE)[None, :]) * ROW  # [NP, PAGE]
        return Cache, tl.reshape(rows, (BLOCK_N,))
    return tile_rows(Cache, bt_row, n0, offs_n, n_ok, PAGE, ROW, BLOCK_N)


@triton.jit
def load_elements(tile, rows, col, mask, n_ok, t0, t_ok, dtype: tl.constexpr, FP8: tl.constexpr,
                  SCALES: tl.constexpr, TILE: tl.constexpr, NTB: tl.constexpr, UPCAST: tl.constexpr):
    """Elements ``[BLOCK_N, C]`` at columns ``col [C]`` of the rows, in the dot dtype.

    A plain cache holds them in its own dtype (= the query's). An fp8 row holds e4m3 values at
    byte ``col`` and one fp32 scale per ``TILE`` columns after them (byte ``SCALES``): the ``NTB``
    scales of tiles ``t0 … t0+NTB-1`` (``t_ok``: which exist) are loaded once per row, broadcast
    over their tile (``C = NTB * TILE``, a power-of-two ``TILE``; otherwise one scale load per
    element), multiplied in fp32 and rounded to ``dtype``. Pointers are cast once, at the tile's
    base, so the loads stay contiguous and vectorised. Under the interpreter (``UPCAST``) values
    stay fp32.
    """
    if FP8:
        x = tl.load(tile.to(tl.pointer_type(tl.float8e4nv)) + rows[:, None] + col[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if (TILE & (TILE - 1)) == 0:
            sp = (tile + SCALES).to(tl.pointer_type(tl.float32)) + rows[:, None] // 4 + (t0 + tl.arange(0, NTB))[None, :]
            sc = tl.load(sp, mask=n_ok[:, None] & t_ok[None, :], other=0.0)  # [BLOCK_N, NTB]
            if NTB == 1:
                x = x * sc
            else:
                x = tl.reshape(tl.reshape(x, (x.shape[0], NTB, TILE)) * sc[:, :, None], (x.shape[0], NTB * TILE))
        else:
            sp = (tile + SCALES).to(tl.pointer_type(tl.float32)) + rows[:, None] // 4 + (col // TILE)[None, :]
            x = x * tl.load(sp, mask=mask, other=0.0)
        if not UPCAST:
            x = x.to(dtype)
    else:
        x = tl.load(tile + rows[:, None] + col[None, :], mask=mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
    return x


@triton.jit
def load_fp8(tile, rows, col, mask, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Raw e4m3 values ``[BLOCK_N, C]`` of an fp8 row (bytes ``col``), converted to the dot dtype, unscaled:
    the fast paths apply the per-token tile scales to scores and probabilities instead."""
    x = tl.load(tile.to(tl.pointer_type(tl.float8e4nv)) + rows[:, None] + col[None, :], mask=mask, other=0.0)
    if UPCAST:
        return x.to(tl.float32)
    return x.to(dtype)


@triton.jit
def e4m3_to_f16_in_registers(x):
    """e4m3 -> fp16 (exact, ``cvt.rn.f16x2.e4m3x2``) where the tile was loaded, written as a non-pure inline
    asm so that Triton cannot move it: its layout pass otherwise rematerializes the conversion in each
    dot's operand layout, i.e. after a shared-memory stage of the 8-bit tile, where every warp converts
    (and an operand contracted over tokens gathers) the whole tile byte by byte. Converted once, the
    16-bit tile is staged for both dots like a bf16 cache's. GPU only (no interpreter)."""
    return tl.inline_asm_elementwise(  # 4 bytes in, 2 x f16x2 out: no byte shuffles to build 16-bit pairs
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def load_row_scale(tile, rows, n_ok, t, SCALES: tl.constexpr):
    """The fp32 scale of tile ``t`` of every row: ``[BLOCK_N]`` (0 for rows past the end)."""
    return tl.load((tile + SCALES).to(tl.pointer_type(tl.float32)) + rows // 4 + t, mask=n_ok, other=0.0)


@triton.jit
def fp8_state_tile(tile, rows, n_ok, c0, t: tl.constexpr, s_t0, TILE: tl.constexpr, USED: tl.constexpr,
                   SCALES: tl.constexpr, ddt: tl.constexpr, UPCAST: tl.constexpr):
    """Scale tile ``t`` of a program's state columns (starting at byte ``c0``): raw values
    ``[BLOCK_N, TILE]`` in ``ddt`` and their per-token scale ``[BLOCK_N]``."""
    offs = t * TILE + tl.arange(0, TILE)
    st = load_fp8(tile, rows, c0 + offs, n_ok[:, None] & (offs < USED)[None, :], ddt, UPCAST)
    return st, load_row_scale(tile, rows, n_ok, s_t0 + t, SCALES)


@triton.jit
def load_fp8_raw(tile, rows, col, mask):
    """Raw e4m3 values ``[BLOCK_N, C]`` of an fp8 row (bytes ``col``), unconverted."""
    return tl.load(tile.to(tl.pointer_type(tl.float8e4nv)) + rows[:, None] + col[None, :], mask=mask, other=0.0)


@triton.jit
def fp8_state_tile_raw(tile, rows, n_ok, c0, t: tl.constexpr, s_t0, TILE: tl.constexpr, USED: tl.constexpr,
                       SCALES: tl.constexpr):
    """:func:`fp8_state_tile` unconverted: the e4m3 values ``[BLOCK_N, TILE]`` and the scales ``[BLOCK_N]``."""
    offs = t * TILE + tl.arange(0, TILE)
    x = load_fp8_raw(tile, rows, c0 + offs, n_ok[:, None] & (offs < USED)[None, :])
    return x, load_row_scale(tile, rows, n_ok, s_t0 + t, SCALES)


@triton.jit
def fp8_state_tile_f16(tile, rows, n_ok, c0, t: tl.constexpr, s_t0, TILE: tl.constexpr, USED: tl.constexpr,
                       SCALES: tl.constexpr, UPCAST: tl.constexpr):
    """:func:`fp8_state_tile` with the values converted to fp16 once, where loaded
    (:func:`e4m3_to_f16_in_registers`; fp32 under the interpreter)."""
    x, sc = fp8_state_tile_raw(tile, rows, n_ok, c0, t, s_t0, TILE, USED, SCALES)
    if UPCAST:
        return x.to(tl.float32), sc
    return e4m3_to_f16_in_registers(x), sc


@triton.jit
def load_plain(tile, rows, col, mask, dtype: tl.constexpr, FP8: tl.constexpr, PLAIN: tl.constexpr,
               UPCAST: tl.constexpr):
    """The unquantized elements (the shared RoPE key) ``[BLOCK_N, C]``: of the cache's dtype at element
    ``col``, or bf16 from byte ``PLAIN`` of an fp8 row; in the dot dtype."""
    if FP8:
        x = tl.load((tile + PLAIN).to(tl.pointer_type(tl.bfloat16)) + rows[:, None] // 2 + col[None, :],
                    mask=mask, other=0.0)
    else:
        x = tl.load(tile + rows[:, None] + col[None, :], mask=mask, other=0.0)
    if UPCAST:
        return x.to(tl.float32)
    return x.to(dtype)


@triton.jit
def split_range(SeqLens, b, split, max_pages, t_q, PAGE: tl.constexpr, Q_LEN: tl.constexpr,
                NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(pos, start, end)``: each row's absolute query position and this split's token range.

    ``seq_len`` is clamped to the block table's capacity, so a bad length can never read past
    it (there is no host-side check on the CUDA path). Splits are whole ``BLOCK_N`` tiles.
    """
    seq_len = tl.minimum(tl.load(SeqLens + b), max_pages * PAGE)
    pos = seq_len - Q_LEN + t_q  # [BLOCK_M] absolute position of each new token
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    return pos, start, tl.minimum(start + chunk, seq_len)


@triton.jit
def softmax_update(s, m_i, l_i):
    """One online-softmax step over scores ``s [BLOCK_M, BLOCK_N]`` (log2 domain, masked with -inf).

    Returns ``(p, alpha, m_new, l_new)``: the tile's probabilities, the rescale of the running
    accumulator, the new row maxima and the new row sums.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def store_output(acc, m_i, l_i, O, Lse, OPart, LsePart, b, t_q, head, split, col, out_mask, row_ok,
                 stride_ob, stride_ot, stride_oh, H_Q: tl.constexpr, Q_LEN: tl.constexpr, DV: tl.constexpr,
                 NUM_SPLITS: tl.constexpr):
    """Normalise ``acc`` and write ``o`` / ``lse`` (one split) or the fp32 partials of split ``split``.

    ``col`` is the output column of each accumulator element (broadcast against the rows);
    rows without any key (an empty split) get o = 0 and lse = -inf.
    """
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    flat = (b * Q_LEN + t_q) * H_Q + head  # [BLOCK_M] index into [B, q_len, h_q]
    if NUM_SPLITS == 1:
        o_ptrs = O + b * stride_ob + t_q[:, None] * stride_ot + head[:, None] * stride_oh + col
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=out_mask)
        tl.store(Lse + flat, lse, mask=row_ok)
    else:
        prow = flat * NUM_SPLITS + split
        tl.store(OPart + prow[:, None] * DV + col, out, mask=out_mask)
        tl.store(LsePart + prow, lse, mask=row_ok)
