"""Calibration for the converters: token windows of real text and the attention-input moments.

**Windows.** Converters that fit projections to activations (TransMLA §4: RoRoPE and BKV-PCA
run PCA over calibration keys/values) need a few hundred windows of real text.
:func:`calibration_batches` samples them with a seeded ``torch.Generator``, so the same
(tokens, num_samples, seq_len, seed) always gives the same batch, independent of global RNG
state; :func:`calibration_tokens` takes them from a corpus' calibration split (never its
evaluation split, see ``kvslim.eval.data``) or a text file.

**Mixtures.** ``calibration_tokens`` reads a ``--calib`` spec (``CALIB_GRAMMAR``): one
source or a weighted mixture of genres (``sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25``),
so a conversion can be fit to the distribution it will serve rather than to one genre.

**Moments.** Every quantity the PCA-based converters need (keys per RoPE frequency for RoRoPE,
balanced ``[K_nope; V]`` for BKV-PCA, per-group states for GLA/GTA, query norms for the MHA2MLA
baseline) is a *linear* function of the attention input ``x`` (+ a constant 1 for biases). So
one pass collects, per layer, ``Σ = E[x̃ x̃ᵀ]`` with ``x̃ = [x; 1]`` (``[D+1, D+1]``, float64),
and the second moment of any projection ``W̃ x̃`` is ``W̃ Σ W̃ᵀ``. One calibration pass then
serves every target (MLA at any rank, GLA, GTA, the baseline).

The one place this departs from TransMLA's recipe: BKV's balancing factor is the ratio of the
RMS norms of ``K_nope`` and ``V`` (computable from Σ), not of their mean L2 norms.

**QK-norm sources** (Qwen3): the keys ``k_norm(W_k x)`` are not linear in ``x``, so for such a layer
the moments are taken of what *is* linear: ``E[ũũᵀ]`` with ``ũ = [k̂; v; 1]`` (the normalised keys of
all KV heads and the values) and the per-head query moments ``E[q̂_h q̂_hᵀ]`` (:class:`QKNormMoment`,
accumulated in float64: ``ũ`` is narrow).

**Shrinkage** (``calib_shrinkage``, :func:`shrink_moment`): the moments are means over a few thousand
tokens of a few genres, and every fit keeps the directions *they* rank highest. Ledoit-Wolf-style
shrinkage of the covariance toward a scaled identity, ``C' = (1-λ)C + λ·tr(C)/D·I`` (``C = Σ - μμᵀ``, the
mean ``μ`` and the constant coordinate kept), moves each fit from the calibration data toward a data-free
one (λ = 1: the weights' own PCA under isotropic inputs). ``calib_shrink_to="diagonal"`` shrinks toward
``diag(C)`` instead (``C' = (1-λ)C + λ·diag(C)``): each channel keeps its variance, only the correlations
shrink, the usual target when channel scales differ by orders of magnitude (RMSNorm outlier channels). λ = 0 is
the unshrunk moment, bit for bit; any λ < 1 keeps a full-rank fit exact (the latent still spans the keys and
values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvslim.eval.mixture import (  # noqa: F401 - re-exported: the --calib grammar lives in eval
    CALIB_GRAMMAR,
    CALIB_PRESETS,
    DEFAULT_CALIB,
    CalibSource,
    parse_calib_spec,
    window_counts,
)
from kvslim.eval.perplexity import _as_token_ids
from kvslim.eval.tokenizer import tokenize

__all__ = ["CALIB_GRAMMAR", "CalibSource", "MomentSum", "QKNormMoment", "add_moment", "attention_input_moments",
           "calibration_batches", "calibration_tokens", "check_calibration_batches", "check_shrinkage",
           "parse_calib_spec", "SHRINK_TARGETS", "shrink_moment", "window_counts"]

SHRINK_TARGETS = ("identity", "diagonal")


def calibration_batches(
    source: str | torch.Tensor | Sequence[int],
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    tokenizer=None,
) -> torch.Tensor:
    """Sample `num_samples` windows of `seq_len` consecutive tokens.

    Args:
        source: calibration text (str, needs `tokenizer`) or 1-D int token ids [N].
        num_samples: number of windows (>= 1).
        seq_len: tokens per window (>= 1, <= N).
        seed: RNG seed; window starts are uniform over [0, N - seq_len]. When the stream has
            at least `num_samples` distinct starts they are drawn without replacement.
        tokenizer: for str sources: a tokenizer directory or object accepted by `tokenize`.
    Returns:
        LongTensor [num_samples, seq_len], rows in sampling order.
    """
    if isinstance(source, str):
        if tokenizer is None:
            raise ValueError("source is text, so tokenizer must be given (e.g. smollm2_dir())")
        ids = tokenize(source, tokenizer)
    else:
        ids = _as_token_ids(source, "source")
    for field, v in (("num_samples", num_samples), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{field} must be an int >= 1, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    n_starts = ids.numel() - seq_len + 1
    if n_starts < 1:
        raise ValueError(f"seq_len={seq_len} exceeds the {ids.numel()} calibration tokens available")
    g = torch.Generator().manual_seed(seed)
    if n_starts >= num_samples:
        starts = torch.randperm(n_starts, generator=g)[:num_samples]
    else:
        starts = torch.randint(n_starts, (num_samples,), generator=g)
    return ids[starts[:, None] + torch.arange(seq_len)]


@torch.no_grad()
def attention_input_moments(model, batches: torch.Tensor, *, batch_size: int = 4,
                            progress: bool = True) -> list[torch.Tensor]:
    """Per layer ``E[x̃ x̃ᵀ]`` of the attention input (after ``input_layernorm``), ``x̃ = [x; 1]``.

    Args:
        model: a kvslim ``Transformer``.
        batches: ``[N, T]`` int64 token windows.
        batch_size: windows per forward pass.
        progress: show a tqdm bar.
    Returns:
        ``num_layers`` float64 tensors ``[D+1, D+1]`` (means over all N·T tokens); for a QK-norm
        source, ``num_layers`` :class:`QKNormMoment` instead.
    """
    check_calibration_batches(batches, model.config.vocab_size)
    sums = [MomentSum(layer.self_attn) for layer in model.model.layers]

    def hook(i):
        def fn(module, args):
            sums[i].add(args[0])
        return fn

    handles = [layer.self_attn.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    device = next(model.parameters()).device
    try:
        for s in tqdm(range(0, batches.shape[0], batch_size), desc="calibration", unit="batch",
                      disable=not progress, leave=False):
            model(batches[s : s + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return [s.mean() for s in sums]


def check_calibration_batches(batches, vocab_size: int | None = None) -> None:
    """Raise ValueError unless ``batches`` is a non-empty int64 ``[N, T]`` of ids below ``vocab_size``."""
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.dtype != torch.long:
        raise ValueError("calibration batches must be an int64 tensor [num_samples, seq_len]")
    if batches.numel() == 0:
        raise ValueError("calibration batches are empty")
    if vocab_size is not None and (int(batches.min()) < 0 or int(batches.max()) >= vocab_size):
        raise ValueError(f"calibration batches: token ids must be in [0, {vocab_size}), got "
                         f"[{int(batches.min())}, {int(batches.max())}]")


def add_moment(total: torch.Tensor, x: torch.Tensor) -> int:
    """Add ``Σ x̃x̃ᵀ`` of attention inputs ``x [..., D]`` (``x̃ = [x; 1]``) to ``total``; returns the token count.

    fp32 per batch (fast), fp64 across batches: the one accumulation every calibration pass uses.
    """
    x = x.detach().reshape(-1, total.shape[0] - 1).float().cpu()
    x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    total += (x.T @ x).double()
    return x.shape[0]


@dataclass
class QKNormMoment:
    """Calibration moments of a QK-norm attention layer (float64).

    Attributes:
        kv: ``[2n+1, 2n+1]`` ``E[ũũᵀ]``, ``ũ = [k_norm(W_k x) (all h_kv heads); W_v x; 1]``, ``n = h_kv·d_h``.
        q: ``[h_q, d_h, d_h]`` ``E[q̂_h q̂_hᵀ]`` of the normalised queries (before RoPE).
    """

    kv: torch.Tensor
    q: torch.Tensor


class MomentSum:
    """Running sums over tokens of one attention layer's calibration moment; :meth:`mean` returns it:
    ``E[x̃x̃ᵀ]`` of the layer input, or a :class:`QKNormMoment` for a QK-norm source layer."""

    def __init__(self, attn):
        s = attn.spec
        self.attn, self.count = attn, 0
        if s.qk_norm:
            n = 2 * s.num_kv_heads * s.head_dim
            self.kv = torch.zeros(n + 1, n + 1, dtype=torch.float64)
            self.q = torch.zeros(s.num_heads, s.head_dim, s.head_dim, dtype=torch.float64)
        else:
            self.kv = torch.zeros(s.hidden_size + 1, s.hidden_size + 1, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the tokens of attention inputs ``x [..., D]``."""
        a = self.attn
        if not a.spec.qk_norm:
            self.count += add_moment(self.kv, x)
            return
        B, d = x.shape[0], a.spec.head_dim
        x = x.reshape(B, -1, x.shape[-1])
        q = a.q_norm(a.q_proj(x).view(B, x.shape[1], -1, d)).reshape(-1, a.spec.num_heads, d).double().cpu()
        k = a.k_norm(a.k_proj(x).view(B, x.shape[1], -1, d)).reshape(q.shape[0], -1)
        u = torch.cat([k, a.v_proj(x).reshape(q.shape[0], -1), torch.ones_like(k[:, :1])], 1).double().cpu()
        self.kv += u.T @ u
        self.q += torch.einsum("nhi,nhj->hij", q, q)
        self.count += q.shape[0]

    def mean(self):
        if self.count == 0:
            raise ValueError("calibration saw no tokens")
        if self.attn.spec.qk_norm:
            return QKNormMoment(kv=self.kv / self.count, q=self.q / self.count)
        return self.kv / self.count


def calibration_tokens(tokenizer_dir, *, num_samples: int, seq_len: int, text: str = "sotu",
                       seed: int = 0) -> torch.Tensor:
    """``[num_samples, seq_len]`` windows of real calibration text (default: the sotu calib split).

    ``text`` is a ``--calib`` spec (``CALIB_GRAMMAR``): one source, or a weighted mixture such
    as ``sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25``. Each source gets its share of
    the windows (``window_counts``), sampled from its own calib split with ``seed``; the rows
    come source by source, in spec order.
    """

    sources = parse_calib_spec(str(text))
    counts = window_counts(sources, num_samples)
    parts = []
    for c, n in zip(sources, counts):
        parts.append(calibration_batches(c.text(), num_samples=n, seq_len=seq_len, seed=seed,
                                         tokenizer=str(tokenizer_dir)))
    return torch.cat(parts)


def check_shrinkage(shrinkage, shrink_to: str = "identity") -> None:
    """Raise ValueError naming ``calib_shrinkage`` unless it is a real number in [0, 1), or ``calib_shrink_to``
    unless it is one of :data:`SHRINK_TARGETS`."""
    if shrink_to not in SHRINK_TARGETS:
        raise ValueError(f"calib_shrink_to must be one of {SHRINK_TARGETS}, got {shrink_to!r}")
    ok = isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0 <= shrinkage < 1
    if not ok:  # (NaN fails the comparison)
        raise ValueError(f"calib_shrinkage must be a number in [0, 1) (0 = no shrinkage; 1 would discard the "
                         f"calibration), got {shrinkage!r}")


def _shrink_cov(C: torch.Tensor, lam: float, shrink_to: str) -> torch.Tensor:
    n = C.shape[0]
    target = torch.diag(C.diagonal()) if shrink_to == "diagonal" else torch.trace(C) / n * torch.eye(n, dtype=C.dtype)
    return (1 - lam) * C + lam * target


def shrink_moment(moment, shrinkage: float, shrink_to: str = "identity"):
    """``moment`` (``E[x̃x̃ᵀ]``, last coordinate the constant 1, or a :class:`QKNormMoment`) with its covariance
    shrunk toward a scaled identity (or its own diagonal, ``shrink_to="diagonal"``) by ``shrinkage`` λ (module
    docstring); the mean is kept. A QK-norm moment's ``kv`` is shrunk the same way and each query head's
    ``E[q̂q̂ᵀ]`` toward ``tr/d_h·I`` or its diagonal (uncentred). λ = 0 returns ``moment`` itself."""
    check_shrinkage(shrinkage, shrink_to)
    if shrinkage == 0:
        return moment
    if isinstance(moment, QKNormMoment):
        return QKNormMoment(kv=shrink_moment(moment.kv, shrinkage, shrink_to),
                            q=torch.stack([_shrink_cov(q, shrinkage, shrink_to) for q in moment.q]))
    S = moment.double()
    mu = S[:-1, -1]
    out = S.clone()
    out[:-1, :-1] = _shrink_cov(S[:-1, :-1] - torch.outer(mu, mu), shrinkage, shrink_to) + torch.outer(mu, mu)
    return out
