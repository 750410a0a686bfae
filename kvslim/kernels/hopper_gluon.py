"""The Gluon (Triton >= 3.6) body of the Hopper tied-state decode kernel (issue 14).

Imported only by :mod:`kvslim.kernels.hopper_tied` when a launch needs it, never at package
import: Gluon's API moves between Triton releases and CPU CI runs a different one. Written
against Triton 3.6.0 (the device's); see hopper_tied.py for the design and the launcher.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M = gl.constexpr(64)  # rows (new tokens x query heads) of one program: one wgmma M


@gluon.jit
def _issue_tile(Cache, bt_row, kv_buf, kr_buf, n0, end, col_s, col_r, offs_n_s, offs_n_r,
                PAGE: gl.constexpr, ROW: gl.constexpr, ROPE_COL: gl.constexpr):
    """Start the cp.async copies of tokens ``n0 … n0+BLOCK_N-1`` (state and rope key) into one ring slot.

    Rows past ``end`` (split end / seq_len) are zero-filled, so poisoned slots never reach a dot.
    Each row gathers its own page id: any page size works.
    """
    n_s = n0 + offs_n_s
    ok_s = n_s < end
    pg_s = gl.load(bt_row + n_s // PAGE, mask=ok_s, other=0).to(gl.int64)
    row_s = (pg_s * PAGE + n_s % PAGE) * ROW
    async_copy.async_copy_global_to_shared(kv_buf, Cache + row_s[:, None] + col_s[None, :], mask=ok_s[:, None])
    n_r = n0 + offs_n_r
    ok_r = n_r < end
    pg_r = gl.load(bt_row + n_r // PAGE, mask=ok_r, other=0).to(gl.int64)
    row_r = (pg_r * PAGE + n_r % PAGE) * ROW + ROPE_COL
    async_copy.async_copy_global_to_shared(kr_buf, Cache + row_r[:, None] + col_r[None, :], mask=ok_r[:, None])
    async_copy.commit_group()


@gluon.jit
def _softmax_step(s, m_i, l_i, n_abs, pos, end, sm_scale_log2):
    """Mask (causal + split end), scale to log2 units, online-softmax update: ``(p, alpha, m, l)``."""
    keep = (n_abs[None, :] <= pos[:, None]) & (n_abs < end)[None, :]
    s = gl.where(keep, s * sm_scale_log2, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def hopper_tied_kernel(
    Q,  # [B, q_len, h_q, D + R]
    Cache,  # [num_pages, PAGE, ROW], ROW = S * D + R
    BlockTable,  # [B, max_pages] int32
    SeqLens,  # [B] int32
    O,  # [B, q_len, h_q, D]              (NUM_SPLITS == 1)
    Lse,  # [B, q_len, h_q] fp32
    OPart,  # [B, q_len, h_q, NUM_SPLITS, D] fp32 (NUM_SPLITS > 1)
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
    H_Q: gl.constexpr,
    S: gl.constexpr,
    G: gl.constexpr,
    Q_LEN: gl.constexpr,
    D: gl.constexpr,  # state_dim = nope_dim = v_dim
    R: gl.constexpr,  # rope_dim
    PAGE: gl.constexpr,
    ROW: gl.constexpr,
    BLOCK_H: gl.constexpr,  # query heads per program (BLOCK_M // Q_LEN)
    BLOCK_N: gl.constexpr,
    HB_PER_S: gl.constexpr,
    NUM_SPLITS: gl.constexpr,
    STAGES: gl.constexpr,
    PIPE: gl.constexpr,  # async wgmma: PV of tile i-1 overlaps the softmax of tile i (STAGES >= 3)
):
    pid_h = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    split = gl.program_id(2)
    sh = pid_h // HB_PER_S
    hb = pid_h % HB_PER_S
    dt: gl.constexpr = Q.dtype.element_ty
    NW: gl.constexpr = gl.num_warps()  # 8: two warpgroups

    # Register layouts. Both wgmma accumulators split their N across the two warpgroups:
    # S = QK^T [64, BLOCK_N] (each warpgroup BLOCK_N/2 keys, the full 576-deep K: no
    # redundant work) and O [64, D] (each warpgroup D/2 value columns: 64x256 fp32 = 128
    # registers/thread for MLA). P goes through shared memory so both read all of it.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, BLOCK_N // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, D // 2, 16])
    ld_d: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
    ld_r: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // R, R // 8], [NW, 1], [1, 0])
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dt)
    qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, R], dt)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dt)
    kr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], dt)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dt)

    # Query rows m = (new token t, head j of the block): loaded once into shared memory.
    m_d = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_d))
    m_r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_r))
    col_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_d))
    col_r = gl.arange(0, R, layout=gl.SliceLayout(0, ld_r))
    q_base = Q + b * stride_qb
    t_d = m_d // BLOCK_H
    j_d = hb * BLOCK_H + m_d % BLOCK_H
    ok_d = (t_d < Q_LEN) & (j_d < G)
    qp = q_base + t_d * stride_qt + (sh * G + j_d) * stride_qh
    q_n = gl.load(qp[:, None] + col_d[None, :], mask=ok_d[:, None], other=0.0)
    t_r = m_r // BLOCK_H
    j_r = hb * BLOCK_H + m_r % BLOCK_H
    ok_r = (t_r < Q_LEN) & (j_r < G)
    qrp = q_base + t_r * stride_qt + (sh * G + j_r) * stride_qh + D
    q_r = gl.load(qrp[:, None] + col_r[None, :], mask=ok_r[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dt, [BLOCK_M, D], q_sl, q_n)
    qr_smem = gl.allocate_shared_memory(dt, [BLOCK_M, R], qr_sl, q_r)

    kv_ring = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, D], kv_sl)
    kr_ring = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N, R], kr_sl)
    p_bufs = gl.allocate_shared_memory(dt, [1, BLOCK_M, BLOCK_N], p_sl)

    # This split's token range (as kvslim.kernels.blocks.split_range).
    seq_len = gl.minimum(gl.load(SeqLens + b), max_pages * PAGE)
    chunk = gl.cdiv(gl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = gl.minimum(start + chunk, seq_len)
    n_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)

    bt_row = BlockTable + b * stride_bt
    offs_n_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_d))
    offs_n_r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_r))
    c_s = sh * D + col_d
    ROPE_COL: gl.constexpr = S * D
    for i in gl.static_range(STAGES - 1):  # prologue: fill all but one ring slot
        _issue_tile(Cache, bt_row, kv_ring.index(i), kr_ring.index(i), start + i * BLOCK_N, end, c_s, col_r,
                    offs_n_s, offs_n_r, PAGE, ROW, ROPE_COL)

    m_s = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    pos = seq_len - Q_LEN + m_s // BLOCK_H  # [BLOCK_M] absolute position of each row's token
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if PIPE:
        # FlashAttention-3's intra-warpgroup overlap: iteration `it` issues S of tile it, then
        # PV of tile it-1 (P from the previous softmax), and runs the softmax of tile it while
        # that PV is on the tensor cores. Both wgmma groups retire by the iteration's end
        # (ptxas serializes wgmma whose accumulators are touched across an open stage).
        # Slots live: it-1 (PV), it (S) and the prefetch, so STAGES >= 3.
        p_smem = p_bufs.index(0)
        p_smem.store(gl.zeros([BLOCK_M, BLOCK_N], dt, s_layout))  # tile "-1": P = 0
        alpha = gl.full([BLOCK_M], 1.0, gl.float32, gl.SliceLayout(1, s_layout))
        for it in range(n_tiles):
            async_copy.wait_group(STAGES - 2)  # tile it landed
            fence_async_shared()
            gl.thread_barrier()
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]  # before any wgmma:
            kv = kv_ring.index(it % STAGES)  # ptxas would otherwise inject a wait for S here
            s_tok = warpgroup_mma(q_smem, kv.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(qr_smem, kr_ring.index(it % STAGES).permute((1, 0)), s_tok, is_async=True)
            v_prev = kv_ring.index(gl.maximum(it - 1, 0) % STAGES)  # it = 0: P = 0 over landed tile 0
            acc_tok = warpgroup_mma(p_smem, v_prev, acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_tok])
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, start + it * BLOCK_N + offs_n, pos, end, sm_scale_log2)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            gl.thread_barrier()  # every warp is done with P of tile it-1 and the slot of tile it-1
            p_smem.store(p.to(dt))
            fence_async_shared()
            nxt = it + STAGES - 1
            _issue_tile(Cache, bt_row, kv_ring.index(nxt % STAGES), kr_ring.index(nxt % STAGES),
                        start + nxt * BLOCK_N, end, c_s, col_r, offs_n_s, offs_n_r, PAGE, ROW, ROPE_COL)
        # PV of the last tile (no tile: P = 0 over the zero-filled tile 0)
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_smem, kv_ring.index(gl.maximum(n_tiles - 1, 0) % STAGES), acc)
    else:
        p_smem = p_bufs.index(0)
        for it in range(n_tiles):
            slot = it % STAGES
            # Tile `it` landed (its group is the oldest outstanding one); publish it to the
            # async proxy (wgmma) and to every warp. The barrier also means every warp is done
            # with iteration it-1, so its ring slot and P are free.
            async_copy.wait_group(STAGES - 2)
            fence_async_shared()
            gl.thread_barrier()
            nxt = it + STAGES - 1
            _issue_tile(Cache, bt_row, kv_ring.index(nxt % STAGES), kr_ring.index(nxt % STAGES),
                        start + nxt * BLOCK_N, end, c_s, col_r, offs_n_s, offs_n_r, PAGE, ROW, ROPE_COL)
            kv = kv_ring.index(slot)
            s = warpgroup_mma(q_smem, kv.permute((1, 0)), s_zero, use_acc=False)
            s = warpgroup_mma(qr_smem, kr_ring.index(slot).permute((1, 0)), s)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, start + it * BLOCK_N + offs_n, pos, end, sm_scale_log2)
            p_smem.store(p.to(dt))
            fence_async_shared()
            gl.thread_barrier()
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            acc = warpgroup_mma(p_smem, kv, acc)
    async_copy.wait_group(0)

    # Epilogue: normalise, write (o, lse) or this split's fp32 partials.
    has = l_i > 0
    l_safe = gl.where(has, l_i, 1.0)
    lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    out = acc * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
    m_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    col_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    t_o = m_o // BLOCK_H
    j_o = hb * BLOCK_H + m_o % BLOCK_H
    ok_o = (t_o < Q_LEN) & (j_o < G)
    head_o = sh * G + j_o
    t_s = m_s // BLOCK_H
    j_s = hb * BLOCK_H + m_s % BLOCK_H
    ok_s = (t_s < Q_LEN) & (j_s < G)
    flat_s = (b * Q_LEN + t_s) * H_Q + sh * G + j_s
    if NUM_SPLITS == 1:
        o_row = O + b * stride_ob + t_o * stride_ot + head_o * stride_oh
        gl.store(o_row[:, None] + col_o[None, :], out.to(dt), mask=ok_o[:, None])
        gl.store(Lse + flat_s, lse, mask=ok_s)
    else:
        flat_o = (b * Q_LEN + t_o) * H_Q + head_o
        p_row = OPart + (flat_o * NUM_SPLITS + split) * D
        gl.store(p_row[:, None] + col_o[None, :], out, mask=ok_o[:, None])
        gl.store(LsePart + flat_s * NUM_SPLITS + split, lse, mask=ok_s)
