"""Calibration batches: fixed-length token windows sampled from the calibration split.

Converters that fit projections to activations (TransMLA §4: RoRoPE and BKV-PCA run PCA over
calibration keys/values) need a few hundred windows of real text. Windows are sampled with a
seeded `torch.Generator`, so the same (tokens, num_samples, seq_len, seed) always gives the
same batch, independent of global RNG state. Pass calibration text only (e.g.
`split_text("sotu")["calib"]`); evaluation text is kept disjoint by `kvslim.eval.data`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvslim.eval.perplexity import _as_token_ids, tokenize

__all__ = ["calibration_batches"]


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
