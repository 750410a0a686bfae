"""What every attention variant shares: the forward over prefill, cached chunks and decode.

A variant only says how to

* ``project(x, cos, sin)`` -> the naive per-head query ``[B, T, H, d_qk]`` and the packed
  cache rows ``[B, T, row]`` of the new tokens (RoPE already applied);
* ``expand(rows)`` -> naive keys/values ``[B, L, H_kv, d_qk]``, ``[B, L, H_kv, d_v]`` from
  rows (up-projected for MLA/GLA), used for prefill and the naive decode path;
* ``decode(q, cache, seq_lens)`` -> ``[B, T, H, d_v]`` through one of the two kernels (their decode
  entry point for ``T <= MAX_Q_LEN``, their prefill one beyond: :meth:`AttentionBase.kernel_for`).

A cached chunk longer than ``MAX_Q_LEN`` runs on the prefill kernel on CUDA (or with
``impl='triton'``), with no host sync; on CPU it stays on SDPA over the fresh rows or the
gathered cache.

Tensor parallelism (seed 000 §3.3): a module built with ``tp_rank/tp_size`` holds the
heads of one rank; ``o_proj`` is row-parallel, so the per-rank outputs sum to the full
output (``all_reduce`` when a process group is set, or summed by the caller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvslim.cache import LayerCache
from kvslim.kernels import MAX_Q_LEN
from kvslim.kernels.ops import sdpa_lower_right_op
from kvslim.rope import Rotary
from kvslim.rows import roundtrip_rows
from kvslim.spec import AttentionSpec


class AttentionBase(nn.Module):
    def __init__(self, spec: AttentionSpec, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
        self.spec = spec
        self.local = spec.shard(tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.rotary = Rotary(spec.rope_dim, spec.rope_theta, spec.rope_scaling, spec.rope_repeat) if spec.rope_dim \
            else None
        self.impl = "auto"  # kernel choice for decode: auto | triton | torch
        self.process_group = None  # set to all-reduce the row-parallel output
        self.kv_roundtrip = None  # a RowFormat: attend to rows as that cache would give them back

    def project(self, x, cos, sin):  # pragma: no cover - abstract
        raise NotImplementedError

    def expand(self, rows):  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, q, cache: LayerCache, seq_lens):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x ``[B, T, D]``, positions ``[B, T]`` (long) -> ``[B, T, D]`` (this rank's partial sum under TP).

        With a cache, the new rows are written at ``cache.start`` and attention reads the
        whole cached sequence; without one, this is a causal prefill of ``x`` alone.
        """
        B, T, _ = x.shape
        cos, sin = self.rotary(positions) if self.rotary is not None else (None, None)
        q, rows = self.project(x, cos, sin)
        if cache is None:
            o = self._attend_fresh(q, rows if self.kv_roundtrip is None else roundtrip_rows(rows, self.kv_roundtrip))
        else:
            cache.write(rows)
            seq_lens = cache.start + T
            # fresh_prefill_sdpa first: attention without the SDPA paths never reads (so never guards on,
            # under torch.compile) the host-known history
            if self.fresh_prefill_sdpa and T > MAX_Q_LEN and cache.fresh:
                o = self._attend_fresh(q, cache.roundtrip(rows))  # expanded K/V + SDPA: no history, no sync
            elif self.fresh_prefill_sdpa and T > MAX_Q_LEN and self._expanded_fits(q, cache.history):
                o = self._attend_history(q, cache, cache.history + T)  # gathered history, expanded, no sync
            elif self.use_kernel_path() and (T <= MAX_Q_LEN or self.prefill_on_kernel(q)):
                o = self.decode(q, cache, seq_lens)  # T > MAX_Q_LEN: the prefill kernel, no host sync
            elif int(cache.start.max()) == 0:
                o = self._attend_fresh(q, cache.roundtrip(rows))  # what the decode steps will read back
            else:
                o = self._attend_gathered(q, cache, seq_lens)
        out = self.o_proj(o.reshape(B, T, -1))
        if self.process_group is not None:
            torch.distributed.all_reduce(out, group=self.process_group)
        return out

    #: whether a chunk longer than MAX_Q_LEN whose history length is known on the host (``cache.history``)
    #: runs SDPA on expanded K/V instead of the prefill kernel: a first chunk over its own rows, a later one
    #: over the gathered history (latent attention: its kernel runs the absorbed form, 3.4x the FLOPs; on the
    #: H200 it took 9.6x cuDNN SDPA's time on a first chunk, 2026-12-03, results/prefill_*.md, and on the
    #: H100 a 4 x 2048 chunk over 2048 cached tokens spent 105 ms in it, results/prefill_step_*.md)
    fresh_prefill_sdpa = False
    #: most bytes of expanded K/V the history path may materialise per layer (beyond: the prefill kernel)
    expanded_bytes_limit = 1 << 30

    def use_kernel_path(self) -> bool:
        """Whether ``decode`` (the kernels) serves cached forwards; latent attention says no when not absorbing."""
        return True

    def prefill_on_kernel(self, q: torch.Tensor) -> bool:
        """Whether a chunk longer than MAX_Q_LEN runs on the Triton prefill kernel (CUDA, or impl='triton'
        under the interpreter) rather than SDPA over fresh / gathered rows (the CPU path)."""
        return self.impl == "triton" or (self.impl == "auto" and q.is_cuda)

    @staticmethod
    def kernel_for(q: torch.Tensor, decode_fn, prefill_fn):
        """The decode entry point for ``q_len <= MAX_Q_LEN``, the prefill one (same arguments) beyond."""
        return decode_fn if q.shape[1] <= MAX_Q_LEN else prefill_fn

    @staticmethod
    def kernel_inputs(q: torch.Tensor, cache: LayerCache) -> tuple[torch.Tensor, dict]:
        """q in the dtype the kernel computes in (the pool's, or q's own for a packed fp8 pool) and
        the ``kv_format`` argument of the kernels."""
        if cache.is_fp8:
            return q, {"kv_format": cache.fmt}
        return q.to(cache.pool.dtype), {}

    def _sdpa(self, q, k, v, mask=None, causal=False):
        """q ``[B, T, H, dqk]``, k/v ``[B, L, Hk, d]`` -> ``[B, T, H, dv]`` (Hk divides H).

        ``causal`` aligns the mask to the lower right (query ``t`` sees keys ``<= L - T + t``), so a chunk
        attends to the history before it. On CUDA, values narrower than the keys (MLA: 128 vs 192) are
        zero-padded to the key width so the flash kernel takes them (it needs one head dim).
        """
        H, Hk = q.shape[2], k.shape[2]
        T, L, dv = q.shape[1], k.shape[1], v.shape[-1]
        if Hk != H:
            k = k.repeat_interleave(H // Hk, dim=2)
            v = v.repeat_interleave(H // Hk, dim=2)
        if q.is_cuda and mask is None and dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        if causal and T != L:  # one op, eager or compiled: torch.compile cannot trace CausalBias itself
            return sdpa_lower_right_op(q, k, v, self.spec.softmax_scale)[..., :dv]
        # a plain bool: under torch.compile `T > 1` is a SymBool that SDPA refuses (and bool() keeps symbolic)
        causal = True if causal else False  # noqa: SIM210
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.spec.softmax_scale)
        return o.transpose(1, 2)[..., :dv]

    def _expanded_fits(self, q, history) -> bool:
        """Whether the history path may run: history known on the host, expanded K/V within the limit."""
        if history is None:
            return False
        B, T, H, d = q.shape
        return B * (history + T) * H * (d + self.spec.out_head_dim) * q.element_size() <= self.expanded_bytes_limit

    def _attend_history(self, q, cache: LayerCache, length: int):
        """A chunk over its sequence's first ``length`` cached rows (history + itself), expanded, causal."""
        k, v = self.expand(cache.prefix_rows(length).to(q.dtype))
        return self._sdpa(q, k, v, causal=True)

    def _attend_fresh(self, q, rows):
        k, v = self.expand(rows)
        return self._sdpa(q, k, v, causal=q.shape[1] > 1)

    def _attend_gathered(self, q, cache: LayerCache, seq_lens):
        """Naive path over the cached sequence (any q length, ragged lengths)."""
        rows = cache.gather(seq_lens)
        k, v = self.expand(rows.to(q.dtype))
        T, L = q.shape[1], rows.shape[1]
        qpos = cache.start.long()[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
        kpos = torch.arange(L, device=q.device)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, T, L]
        return self._sdpa(q, k, v, mask=mask[:, None])


def shard_rows(w: torch.Tensor, blocks: int, rank: int, size: int) -> torch.Tensor:
    """Rows of rank ``rank`` when ``w``'s first dim is ``blocks`` equal blocks split ``size`` ways.

    With fewer blocks than ranks (duplication), rank r gets block ``r * blocks // size``.
    """
    per = w.shape[0] // blocks
    if blocks >= size:
        n = blocks // size
        return w[rank * n * per : (rank + 1) * n * per]
    j = rank * blocks // size
    return w[j * per : (j + 1) * per]


def shard_state(sd: dict, rank: int, size: int, *, rows: dict[str, int], cols: dict[str, int]) -> dict:
    """Slice a full state dict to one rank: ``rows`` maps a module name to the number of
    head blocks of its output (column-parallel), ``cols`` to those of its input
    (row-parallel, e.g. ``o_proj``); every other tensor is replicated."""
    out = {}
    for name, w in sd.items():
        module = name.rsplit(".", 1)[0]
        if module in rows:
            out[name] = shard_rows(w, rows[module], rank, size)
        elif module in cols and name.endswith(".weight"):
            out[name] = shard_rows(w.t(), cols[module], rank, size).t().contiguous()
        else:
            out[name] = w
    return out
