"""Torch oracles for the two decode kernels and the two prefill kernels (DESIGN.md "Kernel contract").

Plain, loop-over-sequences code in fp32 (``acc_dtype``: fp64 for the tests' oracle); they take any
``q_len``, so the decode oracles are the prefill ones too (``prefill_*_ref``): the Triton kernels are tested against these
and never import them. They are also the CPU path of the attention modules.

Layout shared by both kernels: a paged cache ``[num_pages, page_size, row]`` where a
token's row is its packed per-layer state; ``block_table[b, i]`` is the page holding
tokens ``i*page_size ... (i+1)*page_size-1`` of sequence ``b``; ``seq_lens[b]`` counts the
tokens of sequence ``b`` in the cache *including* the ``q_len`` new ones, so query ``i`` of
sequence ``b`` sits at position ``seq_lens[b] - q_len + i`` and attends causally.
"""

from __future__ import annotations

import torch

from kvslim.rows import RowFormat, dequantize_rows


def gather_rows(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, b: int,
                kv_format: RowFormat | None = None) -> torch.Tensor:
    """Rows ``[seq_len, row]`` of sequence ``b`` read through the block table (fp8: dequantized, fp32)."""
    page_size = cache.shape[1]
    n_pages = (seq_len + page_size - 1) // page_size
    pages = block_table[b, :n_pages].long()
    rows = cache[pages].reshape(-1, cache.shape[-1])[:seq_len]
    if kv_format is not None and kv_format.is_fp8:
        return dequantize_rows(rows, kv_format, torch.float32)
    return rows


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seq_len: int):
    """q [q_len, H, dqk], k [L, H, dqk], v [L, H, dv] (fp32) -> o [q_len, H, dv], lse [q_len, H]."""
    q_len = q.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] > pos_q[:, None]
    s = s.masked_fill(mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, q_len]
    p = torch.exp(s - lse[..., None])
    o = torch.einsum("hqk,khd->qhd", p, v)
    return o, lse.transpose(0, 1)


def decode_separate_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_kv_heads: int,
    head_dim: int,
    softmax_scale: float,
    kv_format: RowFormat | None = None,
    acc_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MHA/MQA/GQA decode (any q_len: also the prefill oracle). Row = ``[K (h_kv*d_h) | V (h_kv*d_h)]`` (fp8: packed, dequantized on read).

    q ``[B, q_len, h_q, d_h]`` -> o ``[B, q_len, h_q, d_h]`` (q.dtype), lse ``[B, q_len, h_q]`` (fp32, or
    ``acc_dtype`` when wider).
    """
    B, q_len, h_q, _ = q.shape
    g = h_q // num_kv_heads
    o = torch.empty(B, q_len, h_q, head_dim, dtype=acc_dtype, device=q.device)
    lse = torch.empty(B, q_len, h_q, dtype=acc_dtype, device=q.device)
    kd = num_kv_heads * head_dim
    for b in range(B):
        L = int(seq_lens[b])
        rows = gather_rows(cache, block_table, L, b, kv_format).to(acc_dtype)
        k = rows[:, :kd].reshape(L, num_kv_heads, head_dim).repeat_interleave(g, dim=1)
        v = rows[:, kd : 2 * kd].reshape(L, num_kv_heads, head_dim).repeat_interleave(g, dim=1)
        o[b], lse[b] = _attend(q[b].to(acc_dtype), k, v, softmax_scale, L)
    return o.to(q.dtype), lse


def decode_tied_ref(
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
    kv_format: RowFormat | None = None,
    acc_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GTA / absorbed MLA / absorbed GLA decode (any q_len: also the prefill oracle). Row = ``[state (S*state_dim) | rope (d_R)]`` (fp8: packed).

    Query head ``h`` reads state head ``h // (h_q / S)``; its key is
    ``concat(state[:nope_dim], rope)`` and its value ``state[:v_dim]``.
    q ``[B, q_len, h_q, nope_dim + rope_dim]`` -> o ``[B, q_len, h_q, v_dim]``, lse ``[B, q_len, h_q]``.
    """
    B, q_len, h_q, _ = q.shape
    S = num_state_heads
    g = h_q // S
    o = torch.empty(B, q_len, h_q, v_dim, dtype=acc_dtype, device=q.device)
    lse = torch.empty(B, q_len, h_q, dtype=acc_dtype, device=q.device)
    sd = S * state_dim
    for b in range(B):
        L = int(seq_lens[b])
        rows = gather_rows(cache, block_table, L, b, kv_format).to(acc_dtype)
        state = rows[:, :sd].reshape(L, S, state_dim)
        rope = rows[:, sd : sd + rope_dim]
        k = torch.cat([state[..., :nope_dim], rope[:, None, :].expand(L, S, rope_dim)], dim=-1)
        v = state[..., :v_dim]
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        o[b], lse[b] = _attend(q[b].to(acc_dtype), k, v, softmax_scale, L)
    return o.to(q.dtype), lse


prefill_separate_ref = decode_separate_ref
prefill_tied_ref = decode_tied_ref


def combine_splits_ref(o_part: torch.Tensor, lse_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV merge: ``o_part [..., S, d_v]``, ``lse_part [..., S]`` -> ``o [..., d_v]``, ``lse [...]`` (fp32).

    ``lse = logsumexp_s(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``; a row whose splits are all
    empty (``-inf``) gets ``o = 0`` and ``lse = -inf``.
    """
    lse_part = lse_part.float()
    lse = torch.logsumexp(lse_part, dim=-1)
    w = torch.exp(lse_part - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    w = torch.where(torch.isfinite(lse)[..., None], w, torch.zeros_like(w))
    o = (w[..., None] * o_part.float()).sum(-2)
    return o, lse
