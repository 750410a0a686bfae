"""Per-layer latent ranks under one total KV budget (issue 16; CARE-style non-uniform allocation).

A uniform conversion gives every layer the same ``kv_lora_rank`` R. The layers do not lose the
same amount at R: each latent fit (latent.py: BKV-PCA, the output-aware fit, or the MHA2MLA
SVD) keeps the top components of a per-layer eigenproblem, and its objective at rank r is
the energy of the eigenvalues it drops, ``err_l(r) = Σ_{i ≥ r} λ_{l,i}`` (summed over the latent
heads of a GLA layer). ``rank_alloc="energy"`` chooses ranks ``r_l`` minimising ``Σ_l err_l(r_l)``
subject to

* ``Σ_l r_l = L·R`` exactly: the same cache bytes as the uniform conversion (MLA's row is
  ``r_l + d_R`` per layer, so equal rank sums are equal bytes);
* ``r_l`` a multiple of ``RANK_STEP`` (16) in ``[rank_min, cap]``, ``cap`` = the largest useful rank
  (``max_latent_dim``) rounded down to the step.

Because the eigenvalues are sorted, each ``err_l`` is convex in r, so handing out the budget one
step at a time to the layer whose next step removes the most error (greedy marginal gain) is
optimal for this separable problem. Everything is computed from the calibration moments: the
allocation reads no evaluation text.

``rank_alloc="relative"`` runs the same greedy on ``err_l(r) / err_l(0)``, each layer's *fraction* of
its own energy dropped (scale-free). Measured on SmolLM2 (benchmarks/results/convert_matrix_ranks.md):
the absolute ``energy`` objective follows the residual stream's growth with depth, starves the
first layers (16 dims) and is worse than uniform on every genre although its calibration
objective is 33-57 % lower (held-out gmean +37 % to +86 %). ``relative`` (added after that
result) stays close to uniform and ties it (-2 % to +1 %, within the noise of the measurement).

**Why 16.** The tied decode kernel (kvslim/kernels/tied.py) accepts any latent width (it pads
the state to ``next_pow2`` and masks), the fp8 row needs widths divisible by 4 (rows.py), and
the Hopper kernel only 256 or 512 (so ``impl="auto"`` keeps the ``tl`` kernel for other widths).
Multiples of 16 keep every row 32-byte aligned in bf16, fill the ``tl.dot`` K-dimension of
bf16 tensor cores (16), give fp8 tiles of 16+ channels, and keep the number of distinct
widths (each a separate kernel compile) small.
"""

from __future__ import annotations

import heapq

import torch

__all__ = ["RANK_ALLOCS", "RANK_STEP", "allocate_ranks", "check_rank_alloc", "fit_error", "resolve_rank_min"]

RANK_ALLOCS = ("uniform", "energy", "relative")
RANK_STEP = 16


def resolve_rank_min(rank_min: int | None) -> int:
    """The least rank of a layer: ``rank_min``, by default one step."""
    return RANK_STEP if rank_min is None else rank_min


def check_rank_alloc(rank_alloc: str, *, to: str, latent_dim, rank_min: int | None, cap: int) -> None:
    """Raise ValueError naming the bad field if ``rank_alloc`` cannot allocate this budget.

    ``to``: the conversion target; ``latent_dim``: the uniform rank R (budget ``L·R``); ``cap``: the
    largest useful rank per layer (``max_latent_dim``).
    """
    if rank_alloc not in RANK_ALLOCS:
        raise ValueError(f"rank_alloc must be one of {RANK_ALLOCS}, got {rank_alloc!r}")
    if rank_alloc == "uniform":
        if rank_min is not None:
            raise ValueError(f"rank_min={rank_min!r} applies to per-layer ranks only (rank_alloc 'energy' or "
                             "'relative')")
        return
    if to not in ("mla", "gla"):
        raise ValueError(f"rank_alloc={rank_alloc!r} allocates latent ranks: it applies to --to mla or gla, not {to!r}")
    m = resolve_rank_min(rank_min)
    if isinstance(m, bool) or not isinstance(m, int) or m < RANK_STEP or m % RANK_STEP:
        raise ValueError(f"rank_min must be a positive multiple of {RANK_STEP} (the kernels' latent granularity), "
                         f"got {rank_min!r}")
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim % RANK_STEP:
        raise ValueError(f"kv_lora_rank (latent_dim) = {latent_dim!r} must be a multiple of {RANK_STEP} with "
                         f"rank_alloc={rank_alloc!r}: the budget num_layers x kv_lora_rank is split in steps of "
                         f"{RANK_STEP}")
    if latent_dim < m:
        raise ValueError(f"kv_lora_rank (latent_dim) = {latent_dim} is below rank_min = {m}: a budget of "
                         f"num_layers x {latent_dim} cannot give every layer its minimum")
    top = cap // RANK_STEP * RANK_STEP
    if m > top:
        raise ValueError(f"rank_min = {m} exceeds the largest useful rank per layer ({cap}, {top} in steps of "
                         f"{RANK_STEP})")
    if latent_dim > top:
        raise ValueError(f"kv_lora_rank (latent_dim) = {latent_dim} exceeds the largest rank per layer in steps "
                         f"of {RANK_STEP} ({top}; the keys and values span {cap})")


def fit_error(spectra: list[torch.Tensor], r: int) -> float:
    """A layer's fit objective at rank ``r``: the eigen-energy its latent heads drop."""
    return float(sum(ev[r:].sum() for ev in spectra))


def allocate_ranks(spectra: list[list[torch.Tensor]], *, budget: int, rank_min: int, cap: int,
                   step: int = RANK_STEP, relative: bool = False) -> tuple[list[int], dict]:
    """Per-layer ranks with ``Σ r_l = L·budget``, greedy on the marginal drop of :func:`fit_error`.

    Args:
        spectra: per layer, per latent head, the fit's eigenvalues in descending order.
        budget: the uniform rank R (checked by :func:`check_rank_alloc`).
        rank_min, cap: the least rank and the largest useful one (rounded down to ``step``).
        step: the granularity.
        relative: minimise the sum of each layer's dropped *fraction* of its energy (``rank_alloc="relative"``).
    Returns:
        ``(ranks, report)``; ``report`` holds the objective of the ranks and of uniform R, summed
        over layers (``objective``, ``objective_uniform``).
    """
    L = len(spectra)
    top = cap // step * step
    if not (rank_min <= budget <= top) or budget % step or rank_min % step:
        raise ValueError(f"internal: budget {budget}, rank_min {rank_min}, cap {cap} are not a valid allocation")
    ev = [[e.double() for e in layer] for layer in spectra]
    if relative:
        ev = [[e / max(fit_error(layer, 0), 1e-300) for e in layer] for layer in ev]

    def gain(i: int, r: int) -> float:  # error removed by ranks r .. r+step of layer i
        return float(sum(e[r : r + step].sum() for e in ev[i]))

    ranks = [rank_min] * L
    heap = [(-gain(i, rank_min), i) for i in range(L) if rank_min < top]
    heapq.heapify(heap)
    for _ in range(L * (budget - rank_min) // step):
        _, i = heapq.heappop(heap)  # ties: the lowest layer index
        ranks[i] += step
        if ranks[i] < top:
            heapq.heappush(heap, (-gain(i, ranks[i]), i))
    report = {"budget": budget, "rank_min": rank_min, "step": step, "ranks": list(ranks),
              "objective": sum(fit_error(ev[i], ranks[i]) for i in range(L)),
              "objective_uniform": sum(fit_error(ev[i], budget) for i in range(L))}
    return ranks, report
