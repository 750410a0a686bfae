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

__all__ = ["freqfold_candidates", "select_freqfold", "window_nll"]

AUTO = "auto"


@torch.no_grad()
def window_nll(model, x: torch.Tensor, batch_size: int = 2) -> float:
    """Mean next-token NLL (nats) over token windows ``x [N, T]`` (position t predicts t+1)."""
    tot, n = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, x.shape[0], batch_size):
        b = x[s : s + batch_size].to(device)
        logits = model(b).float()
        tot += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       b[:, 1:].reshape(-1), reduction="sum"))
        n += b[:, 1:].numel()
    return tot / n


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
        select_tokens: ``[N, T]`` calibration-split windows, disjoint from the fitting windows.
    Returns:
        the chosen model and its stats, and ``{"chosen", "ppl": {freqfold: perplexity}, "windows"}``.
    """
    best, ppl = None, {}
    for f in candidates:
        out, stats = convert(f)
        ppl[f] = math.exp(window_nll(out, select_tokens))
        if progress:
            print(f"freqfold {f}: selection-window perplexity {ppl[f]:.3f}", flush=True)
        if best is None or ppl[f] < ppl[best[0]]:
            best = (f, out, stats)
        else:
            del out
    f, out, stats = best
    return out, stats, {"chosen": f, "ppl": ppl, "windows": list(select_tokens.shape)}
