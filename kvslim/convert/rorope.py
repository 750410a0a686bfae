"""RoRoPE and FreqFold (TransMLA §4.2): concentrate the RoPE part of h_kv key heads in one key.

Keys of the ``h_kv`` KV heads are merged into one vector of ``h_kv·d_h`` dims. With the
``rotate_half`` pairing (rope.py), dims ``i`` and ``i + r/2`` of a head form the complex
number of RoPE frequency ``i`` (``r`` = rotary dims per head). For one frequency the heads
give a vector ``z_i`` in C^{h_kv}; a real orthogonal ``U_i`` applied identically to its real
and imaginary parts commutes with the rotation ``e^{iθ_i·pos}``, and applying the same
``U_i`` to the zero-padded, group-expanded queries leaves every score ``Re(q̄·z)`` unchanged
(tested in tests/test_convert.py). ``U_i`` are the eigenvectors of the keys' second moment
(real and imaginary parts pooled), sorted by eigenvalue: the first component carries most of
the frequency's energy and keeps RoPE; the others become NoPE (the approximation).

FreqFold (``freqfold = f``): ``f`` adjacent frequencies share one PCA over the ``h_kv·f``
components (heads x frequencies) and keep their top components in that group's RoPE slots,
as TransMLA's code does; for f > 1 a kept component mixes neighbouring frequencies and is
rotated with its slot's frequency, so only f = 1 is exact before RoPE is dropped.

The target RoPE key has ``d_R/2`` slots whose frequencies follow the standard schedule
``θ^(-2m/d_R)`` (what DeepSeek checkpoints and kvslim's RoPE use). That is frequency
``m·c`` of the source with ``c = (r/2)/(d_R/2)``, so ``d_R`` must divide ``r`` into a whole
``c`` (TransMLA's "collapse"; GTA from a full-RoPE model has c = 2). A FreqFold group of
``f`` frequencies (``f`` a multiple of ``c``) owns ``f/c`` slots.

Several components per frequency (``repeat`` > 1, ``AttentionSpec.rope_repeat``): the target key's
``d_R/2`` slots take the frequencies of a ``d_R/repeat`` key, each rotating ``repeat`` adjacent slots
(rope.py ``Rotary``). Then ``c = (r/2)/(d_R/(2·repeat))`` and a group keeps its top ``(f/c)·repeat``
components, so e.g. ``d_R = 2r`` with ``repeat = 2`` keeps two of ``h_kv`` heads' worth of every frequency
(exact at full rank when ``h_kv <= repeat``).

The result is one orthogonal matrix ``R`` on the merged key: its first ``d_R`` rows are the
RoPE key in rotate_half layout (slot m real part at row m, imaginary part at row m + d_R/2),
the other rows are NoPE components.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Rotation", "check_freqfold", "check_repeat", "collapse_factor", "effective_keys", "norm_selection", "rorope_rotation"]


@dataclass
class Rotation:
    """Orthogonal map of the merged key ``[h_kv·d_h]`` onto ``[rope key (d_R) | NoPE rest]``.

    Attributes:
        R: ``[h_kv·d_h, h_kv·d_h]`` float64, orthogonal.
        rope_dim: ``d_R``, rows ``R[:d_R]`` are the RoPE key.
        pairs: ``(row_re, row_im, source_freq)`` for every rotary component (RoPE rows and
            NoPE rows that came from rotary dims), used to check exactness.
        kept_energy: fraction of the rotary keys' calibrated energy that stays in RoPE rows.
    """

    R: torch.Tensor
    rope_dim: int
    pairs: list[tuple[int, int, int]]
    kept_energy: float


def collapse_factor(rope_dim: int, target_rope_dim: int, repeat: int = 1) -> int:
    """c = (r/2)/(d_R/(2·repeat)): the target's distinct frequency m is the source's frequency m·c."""
    if target_rope_dim <= 0 or target_rope_dim % 2:
        raise ValueError(f"rope_dim (d_R) must be a positive even int, got {target_rope_dim}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"rope_repeat must be a positive int, got {repeat!r}")
    if target_rope_dim % (2 * repeat):
        raise ValueError(f"rope_dim (d_R) = {target_rope_dim} must be a multiple of 2 * rope_repeat = {2 * repeat}")
    if rope_dim <= 0:
        raise ValueError("the source model has no rotary dims (rope_dim = 0): nothing to convert to d_R")
    distinct = target_rope_dim // repeat
    if distinct > rope_dim or rope_dim % distinct:
        what = f"d_R / rope_repeat = {target_rope_dim}/{repeat}" if repeat > 1 else f"rope_dim (d_R) = {target_rope_dim}"
        raise ValueError(
            f"{what} must divide the source's rotary dims per head ({rope_dim}): the target RoPE frequencies "
            f"theta^(-2m/(d_R/rope_repeat)) must be a subset of the source's"
        )
    return rope_dim // distinct


def check_freqfold(rope_dim: int, target_rope_dim: int, freqfold, repeat: int = 1) -> None:
    """Raise ValueError unless ``freqfold`` is a multiple of ``c`` (:func:`collapse_factor`) dividing the ``r/2``
    frequencies."""
    _check(0, 0, rope_dim, target_rope_dim, freqfold, repeat)


def check_repeat(num_kv_heads: int, rope_dim: int, target_rope_dim: int, repeat: int) -> None:
    """Raise ValueError unless the source has ``repeat`` rotary components per target slot frequency."""
    c = collapse_factor(rope_dim, target_rope_dim, repeat)
    if repeat > num_kv_heads * c:
        raise ValueError(f"rope_repeat = {repeat} keeps more components per frequency than the source has "
                         f"({num_kv_heads} KV heads x {c} collapsed frequencies)")


def _check(num_kv_heads, head_dim, rope_dim, target_rope_dim, freqfold, repeat=1) -> tuple[int, int, int]:
    c = collapse_factor(rope_dim, target_rope_dim, repeat)
    P = rope_dim // 2
    if isinstance(freqfold, bool) or not isinstance(freqfold, int) or freqfold < 1 or freqfold % c or P % freqfold:
        raise ValueError(
            f"freqfold must be a multiple of {c} (source rotary dims {rope_dim} / (d_R {target_rope_dim} / "
            f"rope_repeat {repeat})) that divides the {P} frequencies, got {freqfold!r}"
        )
    return c, P, target_rope_dim // 2


def _indices(num_kv_heads: int, head_dim: int, P: int, freqs) -> tuple[list[int], list[int]]:
    re = [j * head_dim + i for j in range(num_kv_heads) for i in freqs]
    im = [j * head_dim + i + P for j in range(num_kv_heads) for i in freqs]
    return re, im


def _assemble(n, num_kv_heads, head_dim, rope_dim, M, slots, nope_pairs, energy) -> Rotation:
    """slots: M (u_re_row, freq); nope_pairs: list of (row_re, row_im, freq)."""
    rows, pairs = [None] * (2 * M), []
    for m, (re_row, im_row, f) in enumerate(slots):
        rows[m], rows[m + M] = re_row, im_row
        pairs.append((m, m + M, f))
    rest = []
    for re_row, im_row, f in nope_pairs:
        pairs.append((2 * M + len(rest), 2 * M + len(rest) + 1, f))
        rest += [re_row, im_row]
    for j in range(num_kv_heads):  # dims beyond the rotary ones are NoPE already
        for d in range(rope_dim, head_dim):
            e = torch.zeros(n, dtype=torch.float64)
            e[j * head_dim + d] = 1
            rest.append(e)
    R = torch.stack(rows + rest)
    kept, total = energy
    return Rotation(R=R, rope_dim=2 * M, pairs=pairs, kept_energy=kept / max(total, 1e-300))


def rorope_rotation(sigma_k: torch.Tensor, *, num_kv_heads: int, head_dim: int, rope_dim: int,
                    target_rope_dim: int, freqfold: int = 1, repeat: int = 1) -> Rotation:
    """RoRoPE (+ FreqFold) rotation from the second moment of the merged pre-RoPE keys.

    Args:
        sigma_k: ``[h_kv·d_h, h_kv·d_h]`` E[k kᵀ] of the merged keys (before RoPE), float.
        num_kv_heads, head_dim: source ``h_kv``, ``d_h``.
        rope_dim: source rotary dims per head ``r`` (RoPE on dims ``[0, r)`` of each head).
        target_rope_dim: ``d_R`` of the shared RoPE key.
        freqfold: adjacent frequencies per PCA group (multiple of ``c``, :func:`collapse_factor`).
        repeat: components kept per target frequency (``AttentionSpec.rope_repeat``).
    """
    n = num_kv_heads * head_dim
    if tuple(sigma_k.shape) != (n, n):
        raise ValueError(f"sigma_k must be [{n}, {n}], got {tuple(sigma_k.shape)}")
    c, P, M = _check(num_kv_heads, head_dim, rope_dim, target_rope_dim, freqfold, repeat)
    check_repeat(num_kv_heads, rope_dim, target_rope_dim, repeat)
    f, k = freqfold, (freqfold // c) * repeat
    S = sigma_k.double()
    slots, nope, kept, total = [], [], 0.0, 0.0
    for g in range(P // f):
        freqs = list(range(g * f, (g + 1) * f))
        re, im = _indices(num_kv_heads, head_dim, P, freqs)
        C = S[re][:, re] + S[im][:, im]
        evals, evecs = torch.linalg.eigh(C)
        order = torch.argsort(evals, descending=True)
        evals, U = evals[order].clamp_min(0), evecs[:, order]
        kept += float(evals[:k].sum())
        total += float(evals.sum())
        for t in range(len(re)):
            r_re = torch.zeros(n, dtype=torch.float64)
            r_im = torch.zeros(n, dtype=torch.float64)
            r_re[re], r_im[im] = U[:, t], U[:, t]
            # the frequency this component rotates with: its slot's (kept; slot s of the key has distinct
            # frequency s // repeat) or, for NoPE rows, the group's first (exact only when f = 1)
            if t < k:
                slots.append((r_re, r_im, freqs[(t // repeat) * c]))
            else:
                nope.append((r_re, r_im, freqs[0]))
    return _assemble(n, num_kv_heads, head_dim, rope_dim, M, slots, nope, (kept, total))


def norm_selection(sigma_k: torch.Tensor, sigma_q: torch.Tensor, *, num_kv_heads: int, head_dim: int,
                   rope_dim: int, target_rope_dim: int, num_heads: int) -> Rotation:
    """MHA2MLA-style partial RoPE: per target slot keep the highest-norm (head, frequency) pair.

    For slot m (source frequencies ``m·c … m·c + c-1``) the candidate (KV head j, frequency i)
    with the largest ``‖k_{j,i}‖ · Σ_{h in group j} ‖q_{h,i}‖`` (calibrated RMS norms, MHA2MLA's
    2-norm criterion) keeps RoPE; every other rotary pair becomes NoPE. No rotation: ``R`` is a
    permutation.

    Args:
        sigma_k: ``[h_kv·d_h]²`` second moment of merged keys; sigma_q: ``[h_q·d_h]²`` of queries.
    """
    n = num_kv_heads * head_dim
    c, P, M = _check(num_kv_heads, head_dim, rope_dim, target_rope_dim,
                     collapse_factor(rope_dim, target_rope_dim))
    g_q = num_heads // num_kv_heads
    dk, dq = sigma_k.double().diagonal(), sigma_q.double().diagonal()

    def pair_norm(diag, head, i):
        return float((diag[head * head_dim + i] + diag[head * head_dim + i + P]).clamp_min(0).sqrt())

    chosen = set()
    slots, kept, total = [], 0.0, 0.0
    for m in range(M):
        best, best_score = None, -1.0
        for i in range(m * c, (m + 1) * c):
            for j in range(num_kv_heads):
                qn = sum(pair_norm(dq, h, i) for h in range(j * g_q, (j + 1) * g_q))
                score = pair_norm(dk, j, i) * qn
                if score > best_score:
                    best, best_score = (j, i), score
        chosen.add(best)
        j, i = best
        kept += pair_norm(dk, j, i) ** 2
        slots.append((_unit(n, j * head_dim + i), _unit(n, j * head_dim + i + P), i))
    nope = []
    for i in range(P):
        for j in range(num_kv_heads):
            total += pair_norm(dk, j, i) ** 2
            if (j, i) not in chosen:
                nope.append((_unit(n, j * head_dim + i), _unit(n, j * head_dim + i + P), i))
    return _assemble(n, num_kv_heads, head_dim, rope_dim, M, slots, nope, (kept, total))


def _unit(n: int, i: int) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[i] = 1
    return e


def effective_keys(R: torch.Tensor, Wk: torch.Tensor, rope_dim: int, num_kv_heads: int, head_dim: int):
    """``E_j = R_{nope,j}ᵀ R_nope W_k`` for every group j: ``[h_kv, d_h, D+1]``."""
    Rn = R[rope_dim:]
    K_nope = Rn @ Wk
    return torch.stack([Rn[:, j * head_dim : (j + 1) * head_dim].T @ K_nope for j in range(num_kv_heads)])


def rope_pairs_apply(x: torch.Tensor, rot: Rotation, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate every rotary component of rotated vectors ``x [..., n]`` by its source frequency.

    ``inv_freq`` are the source frequencies ``[r/2]``; ``pos`` broadcasts against ``x[..., 0]``.
    With f = 1 this is RoPE expressed in the rotated basis (used by the exactness test).
    """
    out = x.clone()
    for a, b, f in rot.pairs:
        ang = pos.double() * float(inv_freq[f])
        cos, sin = ang.cos(), ang.sin()
        out[..., a] = x[..., a] * cos - x[..., b] * sin
        out[..., b] = x[..., b] * cos + x[..., a] * sin
    return out
