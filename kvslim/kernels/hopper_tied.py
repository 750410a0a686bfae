"""Hopper (sm_90a) tied-state decode in Gluon, for the compute-bound latents (issue 14).

Absorbed MLA (one 512-wide latent + 64 RoPE dims) and GLA (2-8 latents of 256) at many query
heads per latent are compute-bound: the Triton ``tl`` kernel (:mod:`kvslim.kernels.tied`)
spills its 64x512 fp32 accumulator and reaches ~250 TFLOP/s on an H200. This kernel
(:mod:`kvslim.kernels.hopper_gluon`, Triton >= 3.6 Gluon) follows FlashMLA's split:

* one program = one sequence, 64 rows (``q_len`` x ``64 // q_len`` query heads of one latent)
  and one KV split; 8 warps = two warpgroups;
* Q (nope and rope) is loaded once into shared memory; each ``[BLOCK_N, latent]`` tile and
  its RoPE key are copied ONCE with cp.async into a ring of shared-memory slots (any page
  size: each row gathers its page id; rows past the end are zero-filled);
* ``S = Q_nope K^T + Q_rope K_rope^T`` with wgmma, both operands in shared memory; each
  warpgroup computes half of the keys over the full depth (no duplicated work);
* online softmax in fp32 (row max/sum across both warpgroups), P in the cache dtype to
  shared memory, ``O += P V`` with wgmma where V is the same latent tile: each warpgroup owns
  half of the value columns (MLA: a 64x256 fp32 accumulator, 128 registers/thread);
* split-KV partials in :func:`kvslim.kernels.launch.alloc_outputs`'s layout, merged by
  :func:`kvslim.kernels.combine.combine_splits`; the split count comes from shapes only, so
  the launch is CUDA-graph capturable.

Gluon is imported only on launch: this module imports on any machine (CPU CI runs a Triton
without a GPU); :func:`unsupported_reason` says why a call cannot run here.
"""

from __future__ import annotations

import functools

import torch

from kvslim.kernels.combine import combine_splits
from kvslim.kernels.heuristics import cdiv, num_sms, pick_num_splits
from kvslim.kernels.launch import LOG2E, alloc_outputs

BLOCK_M = 64
STATE_DIMS = (256, 512)
ROPE_DIMS = (32, 64, 128)
SMEM_LIMIT = 227 * 1024  # sm_90 dynamic shared memory per block
SMEM_SLACK = 2048  # barriers and the softmax's cross-warp reduction scratch


def smem_bytes(state_dim: int, rope_dim: int, block_n: int, stages: int) -> int:
    """Shared memory of one program: Q, the ring of KV tiles and P (16-bit elements)."""
    return 2 * (BLOCK_M * (state_dim + rope_dim) + stages * block_n * (state_dim + rope_dim) + BLOCK_M * block_n)


def hopper_config(state_dim: int, rope_dim: int) -> dict:
    """``BLOCK_N``, ring depth and ``PIPE``: 64-token tiles with the deepest ring that fits (MLA: 2
    slots), synchronous wgmma. ``PIPE`` (FA3-style overlap of the softmax with PV, needs 3+ slots:
    MLA only at ``BLOCK_N=32``) is opt-in through ``config`` until measured."""
    for block_n, stages in ((64, 3), (64, 2), (32, 3), (32, 2)):
        if smem_bytes(state_dim, rope_dim, block_n, stages) + SMEM_SLACK <= SMEM_LIMIT:
            return dict(BLOCK_N=block_n, STAGES=stages, PIPE=False)
    raise ValueError(f"no Hopper tile fits shared memory for state_dim={state_dim}, rope_dim={rope_dim}")


@functools.cache
def gluon_available() -> bool:
    """Whether this Triton has the Gluon Hopper API the kernel is written for (3.6)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import async_copy, warpgroup_mma  # noqa: F401
    except Exception:
        return False
    return True


def shape_problem(q, cache, *, num_state_heads, state_dim, nope_dim, rope_dim, v_dim, kv_format=None) -> str | None:
    """Why the kernel does not take this problem (None: it does); device-independent."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q dtype must be bfloat16 or float16, got {q.dtype}"
    if cache.dtype != q.dtype or (kv_format is not None and kv_format.is_fp8):
        return "fp8 / packed rows are not supported (the cache must have q's 16-bit dtype)"
    if state_dim not in STATE_DIMS:
        return f"state_dim must be one of {STATE_DIMS}, got {state_dim}"
    if nope_dim != state_dim or v_dim != state_dim:
        return f"needs nope_dim == v_dim == state_dim (absorbed MLA/GLA), got {nope_dim}/{v_dim}/{state_dim}"
    if rope_dim not in ROPE_DIMS:
        return f"rope_dim must be one of {ROPE_DIMS}, got {rope_dim}"
    if q.shape[1] > BLOCK_M:
        return f"q_len must be <= {BLOCK_M}"
    return None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(q, cache, **shape) -> str | None:
    """Why ``impl='hopper'`` cannot run this call here (None: it can): device, Gluon, then shapes."""
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device}"
    cap = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if cap != (9, 0):
        return f"needs an sm_90 GPU, got sm_{cap[0]}{cap[1]}"
    if not gluon_available():
        import triton

        return f"needs Triton's Gluon Hopper API (written for 3.6), this Triton is {triton.__version__}"
    return shape_problem(q, cache, **shape)


def decode_tied_hopper(
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
    kv_format=None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tied-state decode on Hopper; same contract as :func:`kvslim.kernels.decode_tied`.

    Inputs are validated by ``kvslim.kernels`` (shapes, dtypes, devices); this raises
    ``ValueError`` for problems the kernel does not take (:func:`unsupported_reason`).
    ``config`` overrides :func:`hopper_config` (``BLOCK_N`` 32/64, ``STAGES`` >= 2, ``PIPE`` with
    ``STAGES`` >= 3), for tuning.

    Returns:
        ``o [B, q_len, h_q, v_dim]`` in q's dtype and ``lse [B, q_len, h_q]`` fp32.
    """
    why = unsupported_reason(q, cache, num_state_heads=num_state_heads, state_dim=state_dim, nope_dim=nope_dim,
                             rope_dim=rope_dim, v_dim=v_dim, kv_format=kv_format)
    if why:
        raise ValueError(f"impl='hopper': {why}")
    from kvslim.kernels.hopper_gluon import hopper_tied_kernel

    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    B, q_len, h_q, _ = q.shape
    g = h_q // num_state_heads
    block_h = BLOCK_M // q_len
    hb_per_s = cdiv(g, block_h)
    page_size, max_pages = cache.shape[1], block_table.shape[1]
    cfg = {**hopper_config(state_dim, rope_dim), **(config or {})}
    if cfg["BLOCK_N"] not in (32, 64) or cfg["STAGES"] < (3 if cfg["PIPE"] else 2):
        raise ValueError(f"impl='hopper': config needs BLOCK_N in (32, 64) and STAGES >= 2 (3 with PIPE), got {cfg}")
    if smem_bytes(state_dim, rope_dim, cfg["BLOCK_N"], cfg["STAGES"]) + SMEM_SLACK > SMEM_LIMIT:
        raise ValueError(f"impl='hopper': config {cfg} needs more than {SMEM_LIMIT} B of shared memory")
    if num_splits is None:
        # smem holds one program per SM; shapes only (graph-safe)
        num_splits = pick_num_splits(B * num_state_heads * hb_per_s, max_pages * page_size, num_sms(q.device), 8, 1)
    o, lse, o_part, lse_part = alloc_outputs(q, v_dim, num_splits, out)
    grid = (num_state_heads * hb_per_s, B, num_splits)
    hopper_tied_kernel[grid](
        q, cache, block_table, seq_lens, o, lse, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
        block_table.stride(0), max_pages, softmax_scale * LOG2E,
        H_Q=h_q, S=num_state_heads, G=g, Q_LEN=q_len, D=state_dim, R=rope_dim, PAGE=page_size,
        ROW=cache.shape[2], BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], HB_PER_S=hb_per_s,
        NUM_SPLITS=num_splits, STAGES=cfg["STAGES"], PIPE=bool(cfg["PIPE"]), num_warps=8,
    )
    if num_splits > 1:
        combine_splits(o_part, lse_part, o, lse)
    return o, lse
