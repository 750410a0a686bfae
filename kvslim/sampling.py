"""Token sampling: greedy, temperature, top-k, top-p (nucleus), with an optional generator.

Numerically safe for any finite temperature > 0: the row maximum is subtracted before the
division (so the largest logit becomes exactly 0 and every other one <= 0), and the division
runs in float64, where even ``1e-45`` is a normal number. A temperature far below the logit
gaps therefore turns into greedy decoding instead of ``inf - inf = NaN`` probabilities.
"""

from __future__ import annotations

import math
import sys

import torch


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless temperature is finite >= 0, top_k an int >= 0 and top_p in (0, 1]."""
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int (0 = off), got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not (0 < top_p <= 1)):  # NaN fails the comparison
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits ``[B, V]`` -> token ids ``[B]`` (greedy when temperature == 0).

    Every row must have a finite maximum (no NaN, no +inf, not all -inf): ``torch.multinomial``
    rejects the probabilities of such a row (on CUDA with a device-side assert), so
    :class:`~kvslim.engine.engine.LLMEngine` checks this before it calls here.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits ``[..., V]`` -> the distribution :func:`sample` draws from (fp32, temperature > 0)."""
    x = logits.float()
    x = x - x.amax(dim=-1, keepdim=True)  # max 0, the rest <= 0: no overflow, no inf - inf
    # float64 division: x / t is 0 at the max and <= 0 (possibly -inf) elsewhere for any t > 0;
    # below the smallest normal float64 (2.2e-308) the result is the same, so clamp there
    x = (x.double() / max(float(temperature), sys.float_info.min)).float()
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, idx = torch.sort(x, descending=True, dim=-1)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)
    return x.softmax(-1)  # the max entry is exp(0) = 1 before normalising: the sum is >= 1
