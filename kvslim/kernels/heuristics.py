"""Launch configurations for the decode kernels, chosen on the host from shapes only.

Nothing here reads device memory, so a launch stays CUDA-graph capturable (DESIGN.md §6):
the number of KV splits depends on the batch, the head blocks and the block table's
*capacity* (``max_pages * page_size``), never on the actual ``seq_lens``.

Configs were picked on an H100 SXM (132 SMs) with ``benchmarks/bench_decode.py``; see
``benchmarks/NOTES.md`` for the measurements behind each number.
"""

from __future__ import annotations

import functools
import math

import torch

DEFAULT_SMS = 132  # H100 SXM; used when no CUDA device is present (interpreter)
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 256
SPG_MAX = 2  # state heads per tied-kernel program (GTA); see tied_config


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    # plain ints: triton.cdiv / next_power_of_2 are ConstexprFunction wrappers in Triton 3.9
    # that cost ~10 us per host call, several per launch
    return -(-a // b)


def pick_num_splits(
    programs: int, max_seq_len: int, sms: int, num_warps: int = 4, per_sm: int | None = None
) -> int:
    """Flash-decoding splits, from shapes only: fill the resident programs, avoid a partial last wave.

    * ``programs`` exceed one wave of the compiled kernel (``per_sm`` known, see
      :func:`programs_per_sm`; ``R = sms * per_sm``): the last wave would run part-full, so
      pick the split count ``s <= 4`` with the fewest waves per unit of work
      ``ceil(programs*s/R)/s`` (+3 % per extra split for the combine pass). H100, GLA-8
      h_q=128 B=64 L=8K (512 programs, 3 per SM by registers = 1.29 waves): 940 us unsplit,
      801 with 2, 782 with 3.
    * otherwise, with a program of 8 warps taken to hold a whole SM, 4 warps half and 2 warps
      a quarter (``R = sms * 8 // num_warps``): one split when ``2*programs > R`` (a split
      costs a combine pass and a partial-output round trip; GQA-4 B=64, 256 programs:
      370 us unsplit, 371 with 2), else ``R / programs`` rounded down to a power of 2 (equal
      chunks when L is one). H100, B=64, L=8K: MLA h_q=16 (64 programs of 4 warps) best at 4
      (230 us; 2: 347, 8: 238), GTA-4 (128 of 2 warps) at 4 (225 vs 263 with 2), MLA
      h_q=128 (128 of 8 warps) at 1-2 (603 / 590 us; 5: 640).

    Every split keeps >= ``MIN_TOKENS_PER_SPLIT`` tokens of the block table's capacity.

    Args:
        programs: programs per split (batch x head blocks).
        max_seq_len: upper bound of any seq_len (block-table capacity), host-side.
        sms: streaming multiprocessors on the device.
        num_warps: warps per program of the kernel's config.
        per_sm: resident programs per SM of the compiled kernel (None: unknown).
    """
    cap = max(1, min(max_seq_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))
    if per_sm and programs > sms * per_sm:
        waves = sms * per_sm

        def cost(s: int) -> float:
            return math.ceil(programs * s / waves) / s * (1 + 0.03 * (s - 1))

        return min(range(1, min(cap, 4) + 1), key=lambda s: (cost(s), s))
    resident = sms * max(1, 8 // num_warps)
    if programs * 2 > resident:
        return 1
    want = resident // programs
    want = 1 << (want.bit_length() - 1)
    return max(1, min(want, cap))


_PER_SM: dict = {}


def programs_per_sm(kernel, args: list, meta: dict, device: torch.device) -> int | None:
    """Programs of ``kernel[meta]`` resident per SM, from its compiled registers and shared memory.

    Compiles (once per config; Triton caches it) the ``NUM_SPLITS=1`` variant with
    ``kernel.warmup`` and applies the occupancy arithmetic of Triton's fused-softmax tutorial:
    registers are allocated per warp in units of 256, each program also takes 1 KB of
    driver-reserved shared memory. Returns None where this cannot be read (interpreter, CPU).
    """
    if device.type != "cuda" or not hasattr(kernel, "warmup"):
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (
        kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel),
        idx,
        tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args),
        tuple(sorted(meta.items())),
    )
    if key not in _PER_SM:
        import triton

        compiled = kernel.warmup(*args, grid=(1,), NUM_SPLITS=1, **meta)
        compiled._init_handles()
        props = triton.runtime.driver.active.utils.get_device_properties(idx)
        warps = meta["num_warps"]
        regs_per_warp = math.ceil(compiled.n_regs * 32 / 256) * 256
        by_regs = props["max_num_regs"] // max(1, regs_per_warp * warps)
        by_smem = props["max_shared_mem"] // (compiled.metadata.shared + 1024)
        _PER_SM[key] = max(1, min(by_regs, by_smem, 64 // warps, 32))
    return _PER_SM[key]


def separate_config(*, group: int, q_len: int, head_dim: int, dtype: torch.dtype, fp8: bool = False) -> dict:
    """Blocks for the separate-KV kernel.

    All ``g_q`` query heads of a KV head (x q_len) form the M side of ``tl.dot`` so each
    K/V tile is loaded once; M is capped at 64 rows (acc ``[64, d_h]`` fp32 in registers).
    """
    block_h = max(1, min(group, 64 // q_len))
    block_m = max(16, next_pow2(block_h * q_len))
    block_d = max(16, next_pow2(head_dim))
    # H100, GQA-8 h_q=32 B=64 L=8K: 64/4 warps/3 stages and 32/4/4 both reach 3.0 TB/s.
    block_n = 64 if block_d <= 128 else 32
    if dtype == torch.float32:
        block_n = min(block_n, 32)
    # FP8_PATH 2 / GATHER 1: see tied_config. fp8 rows with FP8_PATH 2 (tiles converted where loaded and
    # staged through shared memory): 4 warps (offline sm_90a compile, GQA-8: 133 registers, 26 warp
    # instructions per token in the loop vs 37 at 8 warps; bf16: 24); FP8_PATH 1 was measured with 8 warps
    # GATHER 0: the per-page gather (GATHER 1) measured 1.9x slower at page 16 (H200 2026-12-03, GQA-8 bf16
    # 961 vs 494 us, benchmarks/results/fp8_decode.md); FP8_PATH 2: fp8 GQA-8 557 vs 586 us (path 1)
    return dict(BLOCK_H=block_h, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3, FP8_PATH=2,
                GATHER=0)


def tied_config(
    *, group: int, q_len: int, state_block: int, num_state_heads: int, page_size: int = 64, dtype: torch.dtype,
    fp8: bool = False,
) -> dict:
    """Blocks for the tied-state kernel (GTA / MLA / GLA).

    ``state_block`` is the padded state width of one head (``next_pow2(max(d_nope, d_v))``).
    Wide states (MLA/GLA latents, 256-512) keep M <= 64 so the ``[M, d_v]`` fp32
    accumulator fits in registers with 8 warps; narrow ones (GTA, 128) allow M up to 128
    and may put ``SPG`` state heads in one program (block-diagonal trick in tied.py).
    """
    max_m = 64 if state_block >= 256 else 128
    block_h = max(1, min(group, max_m // q_len))
    spg = 1
    if state_block <= 128 and block_h == group:
        while (
            spg * 2 <= SPG_MAX
            and num_state_heads % (spg * 2) == 0
            and spg * 2 * group * q_len <= 32
            and spg * 2 * state_block <= 256
        ):
            spg *= 2
    block_m = max(16, next_pow2(spg * block_h * q_len))
    # H100 sweep (benchmarks/NOTES.md): 64-token tiles win; 8 warps and 3 stages once M = 64
    # rows of a wide state (the [64, 512] fp32 accumulator), 2 stages for M = 32, 3 for
    # M = 16 (MLA h_q=16 230 us vs 294 us with 2; GLA-8 h_q=128 795 us vs 1085 us).
    if state_block >= 256:
        if block_m >= 64 and state_block == 256:
            # GLA's 256-wide latent heads: 4 warps over 32-token tiles keep the [64, 256]
            # accumulator at 128 registers and two programs per SM (H100, h_q=128 B=64 L=8K:
            # GLA-2 q_len 1 375 -> 265 us, q_len 2 712 -> 423 us, GLA-4 q_len 2 741 -> 492 us).
            block_n, warps, stages = 32, 4, 3
        elif block_m >= 64:
            block_n, warps, stages = 64, 8, 3
        elif block_m >= 32:
            block_n, warps, stages = 64, 4, 2
        else:
            # One row per page ran faster 2 deep: MLA h_q=16 page 1, 231 vs 265 us; from page 16
            # on 3 deep wins (MLA h_q=16 page 16: 231 vs 285 us, GLA-8 h_q=128: 814 vs 927 us).
            block_n, warps, stages = 64, 4, (3 if page_size >= 16 else 2)
    else:
        block_n, stages = 64, 2
        warps = 2 if block_m <= 16 else (4 if block_m <= 64 else 8)
    if dtype == torch.float32:
        block_n, stages = 16, 2
    if fp8 and state_block >= 256 and block_m < 64:
        # fp8 latents: one accumulator per 128-channel tile, 64-token tiles over 8 warps (offline sm_90a
        # compile, MLA h_q=16, FP8_PATH 2: 175 registers, no spills, 67 warp instructions per token in the
        # loop vs 112 with 32-token tiles, 52 + spills with 4 warps; bf16: 57. FP8_PATH 1 was measured
        # with 32 x 8: 185 registers, 195 per token)
        block_n, warps = 64, 8
    elif fp8 and state_block < 256:
        # fp8 GTA states: 4 warps (offline sm_90a, GTA-8 FP8_PATH 2: 168 registers, no spills; 2 warps: 255
        # registers + 16 B of spills, FP8_PATH 1 at 2 warps 624 B)
        warps = max(warps, 4)
    # FP8_PATH 2 (fp8 tiles converted once where loaded, tied.py): H200 2026-12-03, B=64 L=8K page 64,
    # MLA h_q=16 287 vs 564 us (path 1), GLA-8 h_q=128 1339 vs 2589 us; still slower than bf16 (162 / 582 us).
    # GATHER 0: the per-page gather (GATHER 1) measured slower at page 16 (bf16 MLA h_q=16 409 vs 173 us,
    # GLA-8 1235 vs 731 us; benchmarks/results/fp8_decode.md)
    return dict(
        BLOCK_H=block_h, BLOCK_M=block_m, BLOCK_N=block_n, SPG=spg, num_warps=warps, num_stages=stages,
        FP8_PATH=2, GATHER=0,
    )


def prefill_config(*, group: int, state_block: int, dtype: torch.dtype, fp8: bool = False) -> dict:
    """Blocks for the prefill kernels (``kvslim.kernels.prefill``), from shapes only.

    M = (new tokens x query heads of one KV / state head): ``BLOCK_H`` heads of the group (all of
    them up to the M budget) times ``BLOCK_M / BLOCK_H`` tokens. Narrow heads (d <= 128) take
    M = 128 rows over 8 warps (the FlashAttention-2 forward shape on Hopper); wide latent
    states (256-512) M = 64 and 32-token tiles for the ``[M, d_v]`` fp32 accumulator (offline
    sm_90a compile: GLA's 256 fits, MLA's 512 spills; ``DV_SPLIT=2`` in the tied launcher's
    ``config`` removes the spill). ``fp8`` is accepted for symmetry with the decode configs (same
    blocks). Not yet tuned on a GPU (``benchmarks/bench_prefill.py``).
    """
    block_m = 64 if state_block >= 256 else 128
    block_h = min(next_pow2(group), block_m)
    if state_block >= 256:
        block_n, warps, stages = 32, 8, 2
    else:
        block_n, warps, stages = 64, 8, 3
    if dtype == torch.float32:
        block_n, stages = min(block_n, 32), 2
    return dict(BLOCK_H=block_h, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
