"""Split-KV (flash-decoding) merge shared by both decode kernels (DESIGN.md §6).

Each split ``s`` of a sequence leaves a normalised partial output ``o_s`` and its
log-sum-exp ``lse_s``; the exact result is ``o = sum_s exp(lse_s - lse) o_s`` with
``lse = logsumexp_s(lse_s)``. Empty splits carry ``lse_s = -inf`` and weigh nothing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvslim.kernels.heuristics import next_pow2, num_sms, pick_num_splits, programs_per_sm

LOG2E = 1.4426950408889634

# Triton's CPU interpreter computes bf16/fp16 tl.dot wrongly (triton 3.9), so under
# TRITON_INTERPRET=1 the kernels upcast dot operands to fp32 (after rounding p to the
# cache dtype, so the numerics match the GPU path).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
def _combine_kernel(
    OPart,  # [B, q_len, h_q, NUM_SPLITS, DV] fp32
    LsePart,  # [B, q_len, h_q, NUM_SPLITS] fp32
    O,  # [B, q_len, h_q, DV] (q dtype), strided
    Lse,  # [B, q_len, h_q] fp32, contiguous
    stride_ob,
    stride_ot,
    stride_oh,
    H_Q: tl.constexpr,
    Q_LEN: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # flat (b, t, h)
    h = row % H_Q
    t = (row // H_Q) % Q_LEN
    b = row // (H_Q * Q_LEN)
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(LsePart + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # [BLOCK_S]
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        w_s = tl.exp(tl.load(LsePart + row * NUM_SPLITS + s) - m_safe)
        o_s = tl.load(OPart + (row * NUM_SPLITS + s) * DV + offs_d, mask=offs_d < DV, other=0.0)
        acc += w_s * o_s
    inv = tl.where(total > 0, 1.0 / total, 0.0)
    out_ptr = O + b * stride_ob + t * stride_ot + h * stride_oh + offs_d
    tl.store(out_ptr, (acc * inv).to(O.dtype.element_ty), mask=offs_d < DV)
    tl.store(Lse + row, tl.where(total > 0, m_safe + tl.log(total), float("-inf")))


def alloc_outputs(q: torch.Tensor, d_v: int, num_splits: int, out=None):
    """``(o, lse, o_part, lse_part)`` for a decode launch over ``num_splits`` KV splits.

    ``o [B, q_len, h_q, d_v]`` (q.dtype) and ``lse [B, q_len, h_q]`` (fp32) come from ``out``
    when given; with one split the kernel writes them directly (the partials alias them),
    otherwise it writes fp32 partials ``[B, q_len, h_q, num_splits, (d_v)]`` for
    :func:`combine_splits`.
    """
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    B, q_len, h_q, _ = q.shape
    if out is None:
        o = torch.empty(B, q_len, h_q, d_v, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, q_len, h_q, dtype=torch.float32, device=q.device)
    else:
        o, lse = out
    if num_splits == 1:
        return o, lse, o, lse
    o_part = torch.empty(B, q_len, h_q, num_splits, d_v, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, q_len, h_q, num_splits, dtype=torch.float32, device=q.device)
    return o, lse, o_part, lse_part


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge ``o_part [B, q_len, h_q, S, DV]`` / ``lse_part [B, q_len, h_q, S]`` into o, lse (in place)."""
    B, q_len, h_q, splits, dv = o_part.shape
    grid = (B * q_len * h_q,)
    _combine_kernel[grid](
        o_part,
        lse_part,
        o,
        lse,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        H_Q=h_q,
        Q_LEN=q_len,
        DV=dv,
        BLOCK_DV=next_pow2(dv),
        NUM_SPLITS=splits,
        BLOCK_S=max(2, next_pow2(splits)),
        num_warps=4 if dv >= 256 else 2,
    )


def launch_decode(
    kernel,
    q,
    cache,
    block_table,
    seq_lens,
    *,
    d_v: int,
    softmax_scale: float,
    meta: dict,
    cfg: dict,
    head_blocks: int,
    num_splits: int | None,
    out=None,
):
    """The launch both decode kernels share: outputs, a graph-safe split count, the launch, the merge.

    Both kernels take ``(Q, Cache, BlockTable, SeqLens, O, Lse, OPart, LsePart, q strides x3,
    o strides x3, block-table stride, max_pages, sm_scale_log2)`` then their constexprs
    (``meta``) and ``NUM_SPLITS``. ``cfg`` holds ``num_warps``, ``num_stages`` and optionally
    ``maxnreg``; ``head_blocks`` is the grid's first axis (programs per sequence and split).
    """
    B = q.shape[0]
    page_size, max_pages = cache.shape[1], block_table.shape[1]
    o, lse, _, _ = alloc_outputs(q, d_v, 1, out)
    args = [
        q,
        cache,
        block_table,
        seq_lens,
        o,
        lse,
        o,
        lse,  # o_part / lse_part once the split count is known
        q.stride(0),
        q.stride(1),
        q.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        block_table.stride(0),
        max_pages,
        softmax_scale * LOG2E,
    ]
    meta = dict(
        meta,
        STAGES=cfg["num_stages"],
        DOT_PREC="ieee" if q.dtype == torch.float32 or INTERPRET else "tf32",
        UPCAST=INTERPRET and q.dtype != torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if cfg.get("maxnreg"):
        meta["maxnreg"] = cfg["maxnreg"]
    if num_splits is None:
        per_sm = None if INTERPRET else programs_per_sm(kernel, args, meta, q.device)
        num_splits = pick_num_splits(
            B * head_blocks, max_pages * page_size, num_sms(q.device), cfg["num_warps"], per_sm
        )
    o, lse, o_part, lse_part = alloc_outputs(q, d_v, num_splits, (o, lse))
    args[6], args[7] = o_part, lse_part
    kernel[(head_blocks, B, num_splits)](*args, NUM_SPLITS=num_splits, **meta)
    if num_splits > 1:
        combine_splits(o_part, lse_part, o, lse)
    return o, lse
