"""Cache-row write in one launch: scatter the new rows through the block table, quantizing fp8 rows.

``write_rows(pool, rows, block_table, start, fmt)`` stores ``rows [B, T, row_dim]`` at positions
``start[b] + t`` of each sequence. For the packed fp8 row (``kvslim.rows``) the same program
takes each tile's amax, writes the e4m3 values, the fp32 scale and the bf16 RoPE key — the
"quantize on write" of DESIGN.md §4 with no host synchronisation (CUDA-graph capturable). The
torch oracle is ``LayerCache.write``'s own path (``kvslim.rows.quantize_rows`` + ``index_copy_``)
and the two agree bit for bit: rounding to e4m3 and to bf16 is done here with exact fp32
arithmetic (round half to even, as torch's casts), so neither the GPU's conversion instructions
nor the CPU interpreter's (which truncates) decide the bits, and divisions are IEEE (``div_rn``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvslim.kernels.heuristics import next_pow2
from kvslim.rows import E4M3_MAX, RowFormat


@triton.jit
def _rne(y):
    """Round half to even, in fp32."""
    r = tl.floor(y)
    frac = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return r + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _e4m3_grid(q):
    """``q`` (fp32, |q| <= 448) rounded to the nearest e4m3 value (ties to even), sign of zero kept."""
    bits = q.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3: 3 mantissa bits, subnormals below 2^-6
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)  # 1 / step, exactly (a power of two)
    v = _rne(tl.abs(q) * inv) * step  # exact products: no division, whose GPU default is approximate
    return tl.where(bits < 0, -v, v)


@triton.jit
def _to_bf16(x):
    """fp32 -> bf16, round half to even (finite values)."""
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (r & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _write_rows_kernel(
    Rows,  # [B, T, ROW_DIM]
    Pool,  # [num_pages, PAGE, WIDTH] (uint8 bytes for FP8)
    BlockTable,  # [B, max_pages] int32
    Start,  # [B] int32
    stride_rb,
    stride_rt,
    stride_bt,
    T,
    PAGE: tl.constexpr,
    WIDTH: tl.constexpr,
    ROW_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
    QUANT: tl.constexpr,
    TILE: tl.constexpr,
    NT: tl.constexpr,
    BLOCK_NT: tl.constexpr,
    BLOCK_TILE: tl.constexpr,
    PLAIN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    QMAX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)  # flat (b, t)
    b = tok // T
    t = tok % T
    pos = tl.load(Start + b).to(tl.int64) + t
    page = tl.load(BlockTable + b * stride_bt + pos // PAGE).to(tl.int64)
    dst = Pool + (page * PAGE + pos % PAGE) * WIDTH
    src = Rows + b * stride_rb + t * stride_rt
    if FP8:
        tiles = tl.arange(0, BLOCK_NT)[:, None]
        chans = tl.arange(0, BLOCK_TILE)[None, :]
        col = tiles * TILE + chans  # [BLOCK_NT, BLOCK_TILE]
        ok = (tiles < NT) & (chans < TILE)
        x = tl.load(src + col, mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 1)  # [BLOCK_NT]
        scale = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -QMAX), QMAX)
        tl.store((dst + col).to(tl.pointer_type(tl.float8e4nv)), _e4m3_grid(q).to(tl.float8e4nv), mask=ok)
        offs_t = tl.arange(0, BLOCK_NT)
        tl.store((dst + QUANT + 4 * offs_t).to(tl.pointer_type(tl.float32)), scale, mask=offs_t < NT)
        if PLAIN > 0:
            offs_p = tl.arange(0, BLOCK_P)
            r = tl.load(src + QUANT + offs_p, mask=offs_p < PLAIN, other=0.0).to(tl.float32)
            tl.store((dst + QUANT + 4 * NT + 2 * offs_p).to(tl.pointer_type(tl.bfloat16)), _to_bf16(r),
                     mask=offs_p < PLAIN)
    else:
        offs = tl.arange(0, BLOCK_R)
        r = tl.load(src + offs, mask=offs < ROW_DIM, other=0.0)
        if Pool.dtype.element_ty == tl.bfloat16 and Rows.dtype.element_ty == tl.float32:
            tl.store(dst + offs, _to_bf16(r), mask=offs < ROW_DIM)
        else:
            tl.store(dst + offs, r.to(Pool.dtype.element_ty), mask=offs < ROW_DIM)


def write_rows(pool: torch.Tensor, rows: torch.Tensor, block_table: torch.Tensor, start: torch.Tensor,
               fmt: RowFormat | None = None) -> None:
    """Store ``rows [B, T, row_dim]`` at ``start[b] + t`` through ``block_table`` (fp8: packed).

    Args:
        pool: ``[num_pages, page_size, width]`` contiguous (uint8 ``row_bytes`` wide for fp8).
        rows: new rows in any float dtype (last dim contiguous).
        block_table: ``[B, max_pages]`` int32; every written position must have its page.
        start: ``[B]`` int32, tokens cached before these rows.
        fmt: the fp8 ``RowFormat`` of a uint8 pool; None for a pool of the rows' kind.
    """
    B, T, R = rows.shape
    fp8 = fmt is not None and fmt.is_fp8
    if fp8 and (pool.dtype != torch.uint8 or pool.shape[-1] != fmt.row_bytes or fmt.row_dim != R):
        raise ValueError(f"fp8 write: pool {pool.dtype} {tuple(pool.shape)} / rows {R} do not match "
                         f"{fmt.describe()}")
    if not fp8 and pool.shape[-1] != R:
        raise ValueError(f"row width {R} does not match the cache's {pool.shape[-1]}")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if B * T == 0:
        return
    nt = fmt.num_scales if fp8 else 1
    _write_rows_kernel[(B * T,)](
        rows, pool, block_table, start, rows.stride(0), rows.stride(1), block_table.stride(0), T,
        PAGE=pool.shape[1], WIDTH=pool.shape[2], ROW_DIM=R, BLOCK_R=next_pow2(R), FP8=fp8,
        QUANT=fmt.quant if fp8 else 0, TILE=fmt.tile if fp8 else 1, NT=nt, BLOCK_NT=next_pow2(nt),
        BLOCK_TILE=next_pow2(fmt.tile) if fp8 else 1, PLAIN=fmt.plain if fp8 else 0,
        BLOCK_P=next_pow2(max(1, fmt.plain)) if fp8 else 1, QMAX=E4M3_MAX, num_warps=4 if R >= 512 else 2,
    )
