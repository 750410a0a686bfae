"""The launcher both decode kernels share: outputs, a graph-safe split count, the launch, the merge.

Output buffers come from :func:`empty`, a module-level hook: the test suite's NaN-poisoning
fixture (tests/conftest.py) replaces it so that any element a kernel should write but does
not, including the fp32 split partials, shows up as NaN.
"""

from __future__ import annotations

import os

import torch

from kvslim.kernels.combine import combine_splits
from kvslim.kernels.heuristics import num_sms, pick_num_splits, programs_per_sm

LOG2E = 1.4426950408889634

# Triton's CPU interpreter computes bf16/fp16 tl.dot wrongly (triton 3.9), so under
# TRITON_INTERPRET=1 the kernels upcast dot operands to fp32 (after rounding p to the
# cache dtype, so the numerics match the GPU path).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel output (a hook: tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


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
        o = empty(B, q_len, h_q, d_v, dtype=q.dtype, device=q.device)
        lse = empty(B, q_len, h_q, dtype=torch.float32, device=q.device)
    else:
        o, lse = out
    if num_splits == 1:
        return o, lse, o, lse
    o_part = empty(B, q_len, h_q, num_splits, d_v, dtype=torch.float32, device=q.device)
    lse_part = empty(B, q_len, h_q, num_splits, dtype=torch.float32, device=q.device)
    return o, lse, o_part, lse_part


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
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
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
