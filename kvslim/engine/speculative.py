"""Speculative decoding without a draft model: n-gram prompt lookup proposals, greedy and sampled verification.

Proposal (prompt lookup decoding, Saxena 2023; vLLM's ``ngram`` method): for n from
``ngram_max`` down to ``ngram_min``, find the most recent earlier occurrence of the sequence's
last n tokens among its own tokens (prompt + output) and propose the (up to k) tokens that
followed it. Verification: the last sampled token and the k proposals are fed in one forward of
q_len = 1 + k (the decode kernels take q_len <= 8 with causal masking among the new tokens),
which gives the greedy token after each of them; the longest prefix of proposals equal to those
tokens is accepted, plus the model's own token after it (the *bonus*), so a step yields 1 .. k+1
tokens and the output equals plain greedy decoding exactly (up to the arithmetic of a q_len > 1
kernel call, which equals q_len = 1 calls to rounding).

Sampled requests (temperature > 0) are verified by rejection sampling (Leviathan et al. 2023,
Chen et al. 2023) with the n-gram proposal as a point-mass draft distribution q = 1[x = d]:
proposal d is accepted with probability p(d) (p: the request's own temperature / top-k / top-p
distribution at that position); on rejection the token is drawn from the residual
max(p - q, 0) = p without d, renormalised, and the step ends; if all are accepted a bonus token is
drawn from p at the last position. Every emitted token is then distributed exactly as under plain
sampling (the draws differ, so a seeded request's tokens are not the same as without speculation).

Rows written for rejected proposals sit past the sequence's ``num_computed``: they are never read
(attention reads ``seq_len`` rows) and the next forward overwrites them; pages allocated only
for them are freed by the scheduler (``Scheduler.trim``).
"""

from __future__ import annotations

import numpy as np
import torch

MAX_SPECULATIVE_TOKENS = 7  # q_len = 1 + k <= 8, the kernels' limit


def propose_ngram(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens (n from max to min).

    Returns ``[]`` when no n-gram of length ``ngram_min .. ngram_max`` recurs.
    """
    L = len(tokens)
    if k <= 0 or ngram_min >= L:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        # windows starting at j = 0 .. L-n-1, i.e. occurrences that end before the last token
        win = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((win == arr[L - n :]).all(axis=1))
        if hits.size:
            j = int(hits[-1]) + n
            return arr[j : j + k].tolist()
    return []


def accepted_prefix(draft: list[int], target: list[int]) -> int:
    """How many proposals are accepted: the length of the common prefix of ``draft`` and ``target``.

    ``target[i]`` is the model's greedy token after the i-th fed token (the last sampled one, then
    the proposals), so ``target`` has one more entry than ``draft`` (the bonus token).
    """
    a = 0
    for d, t in zip(draft, target):
        if d != t:
            break
        a += 1
    return a


def rejection_sample(draft: list[int], probs: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """Tokens emitted for point-mass proposals ``draft`` given target ``probs [len(draft) + 1, V]``.

    Returns the accepted proposals followed by one token drawn from the residual (on a rejection) or
    from the last position (all accepted), so ``len(result) - 1`` proposals were accepted.
    """
    u = torch.rand(len(draft), generator=generator, device=probs.device).tolist()
    out = []
    for i, d in enumerate(draft):
        p = probs[i]
        if u[i] < float(p[d]):
            out.append(d)
            continue
        residual = p.clone()
        residual[d] = 0
        if not float(residual.sum()) > 0:  # p(d) rounded below 1 with no other mass: d is the only token
            out.append(d)
            continue
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return out
