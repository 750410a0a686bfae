"""Split-KV (flash-decoding) merge shared by both decode kernels (DESIGN.md §6).

Each split ``s`` of a sequence leaves a normalised partial output ``o_s`` and its
log-sum-exp ``lse_s``; the exact result is ``o = sum_s exp(lse_s - lse) o_s`` with
``lse = logsumexp_s(lse_s)``. Empty splits carry ``lse_s = -inf`` and weigh nothing.
The torch oracle is ``kernels.reference.combine_splits_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvslim.kernels.heuristics import next_pow2


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
