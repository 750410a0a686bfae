"""Choices a conversion makes from calibration text alone (issue 16): ``freqfold="auto"``.

FreqFold (rorope.py) trades exactness of each kept RoPE component's frequency for more kept energy; which
group size serves a model best is not visible in any one layer's fit. ``select_freqfold`` converts the model
once per candidate (the calibration moments are shared, so each costs only the fits) and keeps the candidate
with the lowest next-token NLL on *selection windows*: calibration-split text drawn with another seed than
the fitting windows, never evaluation text. Candidates: ``c``, ``2c``, ``4c`` (``c`` the smallest valid group,
:func:`~kvslim.convert.rorope.collapse_factor`) that divide the source's frequencies. A streaming conversion
scores the same candidates layer by layer instead (stream.py ``stream_select_nll``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvslim.convert.rorope import collapse_factor

__all__ = ["SELECT_SAMPLES", "freqfold_candidates", "nll_sum", "select_freqfold", "selection", "selection_tokens",
           "window_nll"]

AUTO = "auto"
SELECT_SAMPLES = 8  # calibration windows freqfold="auto" scores its candidates on


def selection_tokens(src, *, seq_len: int, text: str, seed: int) -> torch.Tensor:
    """The ``[SELECT_SAMPLES, seq_len]`` selection windows of a conversion whose fitting windows have ``seed``:
    the same calibration text (calib splits), drawn with ``seed + 1``."""
    from kvslim.convert.calib import calibration_tokens

    return calibration_tokens(src, num_samples=SELECT_SAMPLES, seq_len=seq_len, text=text, seed=seed + 1)


def nll_sum(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """``(summed next-token NLL in nats, tokens scored)`` of ``logits [B, T, V]`` for ``tokens [B, T]``."""
    logits = logits.float()
    tot = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                            reduction="sum")
    return float(tot), tokens[:, 1:].numel()


@torch.no_grad()
def window_nll(model, x: torch.Tensor, batch_size: int = 2) -> float:
    """Mean next-token NLL (nats) over token windows ``x [N, T]`` (position t predicts t+1)."""
    tot, n = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, x.shape[0], batch_size):
        b = x[s : s + batch_size].to(device)
        t, k = nll_sum(model(b), b)
        tot, n = tot + t, n + k
    return tot / n


def selection(nll: dict, select_tokens: torch.Tensor) -> dict:
    """``{"chosen", "ppl": {freqfold: perplexity}, "windows"}`` from each candidate's mean NLL (the lowest wins)."""
    ppl = {f: math.exp(v) for f, v in nll.items()}
    return {"chosen": min(ppl, key=ppl.get), "ppl": ppl, "windows": list(select_tokens.shape)}


def freqfold_candidates(source_rope_dim: int, target_rope_dim: int, rope_repeat: int = 1) -> list[int]:
    """``c, 2c, 4c`` (the FreqFold groups :func:`select_freqfold` tries) that divide the ``r/2`` frequencies."""
    c = collapse_factor(source_rope_dim, target_rope_dim, rope_repeat)
    return [f for f in (c, 2 * c, 4 * c) if (source_rope_dim // 2) % f == 0]


def select_freqfold(convert: Callable[[int], tuple], candidates: list[int], select_tokens: torch.Tensor,
                    progress: bool = False) -> tuple[object, dict, dict]:
    """``(model, stats, selection)`` of the candidate whose conversion has the lowest NLL on ``select_tokens``.

    Args:
        convert: ``freqfold -> (converted model, stats)``.
        candidates: FreqFold group sizes to try (:func:`freqfold_candidates`).
        select_tokens: ``[N, T]`` calibration-split windows drawn with another seed than the fitting windows.
    Returns:
        the chosen model and its stats, and ``{"chosen", "ppl": {freqfold: perplexity}, "windows"}``.
    """
    best, nll = None, {}
    for f in candidates:
        out, stats = convert(f)
        nll[f] = window_nll(out, select_tokens)
        if progress:
            print(f"freqfold {f}: selection-window perplexity {math.exp(nll[f]):.3f}", flush=True)
        if best is None or nll[f] < nll[best[0]]:
            best = (f, out, stats)
        else:
            del out
    return best[1], best[2], selection(nll, select_tokens)  # the same first-lowest candidate
