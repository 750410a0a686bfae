"""Continuous-batching scheduler: fair FIFO admission, chunked prefill, preemption by recompute.

A sequence's tokens are ``prompt + output``; ``num_computed`` of them have rows in the
KV pool. Each step the scheduler picks

* a **decode batch**: every running sequence with exactly one token left to feed
  (T = 1 each, at its own length: the model handles per-sequence lengths);
* **prefill chunks**: the remaining tokens of running sequences that are still being
  prefilled, then newly admitted ones, within a per-step token budget.

Admission is strict FIFO (the head of the queue blocks the rest, so no request starves)
and reserves the pages of the whole pending prefix. A decode that needs a new page when
none are free preempts the most recently admitted running sequence: its pages are freed
and it goes back to the *front* of the queue; on readmission its prompt and the tokens it
already generated are prefilled again (recompute), which reproduces its cache exactly.

With prefix caching (``kvslim/engine/prefix.py``) admission first looks up the longest cached
prefix of full pages of the sequence's tokens, shares those pages (reference counts) and
reserves pages only for the rest, which is all that is prefilled; ``commit`` names each page
once it is full and computed. When the next page of the head's prefix is being prefilled by a
running sequence (requests arriving together with one system prompt), the head waits for it
instead of computing the same rows again. With speculative decoding (``kvslim/engine/speculative.py``) a
decode that finds an n-gram proposal of k tokens and the pages for them becomes a
*verify* entry (q_len = 1 + k); ``trim`` frees the pages only rejected proposals needed.

Every running sequence holds a *slot* in ``[0, max_batch)``: the row of the runner's
persistent decode block table that holds its pages (``table_len`` of them are written
there; the engine sends the runner only the pages added since).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvslim.engine.allocator import BlockAllocator
from kvslim.engine.prefix import PrefixCachingAllocator, extend_digests
from kvslim.engine.speculative import propose_ngram
from kvslim.sampling import check_sampling

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
#: the seeds torch.Generator.manual_seed takes (int64, as OpenAI's and vLLM's ``seed``)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    """Per-request sampling: greedy when ``temperature == 0``.

    Args:
        max_tokens: new tokens to generate at most (>= 1).
        temperature, top_k, top_p: as in :func:`kvslim.sampling.sample` (temperature finite >= 0,
            top_k >= 0 with 0 = off, top_p in (0, 1]; NaN and inf are refused).
        seed: per-request RNG seed, an int64 (reproducible sampling regardless of batching).
        stop_token_ids: tokens that end the request (included in the output).
        ignore_eos: do not stop at the model's EOS token (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if isinstance(self.temperature, int) and not isinstance(self.temperature, bool):
            self.temperature = float(self.temperature)
        if isinstance(self.top_p, int) and not isinstance(self.top_p, bool):
            self.top_p = float(self.top_p)
        check_sampling(self.temperature, self.top_k, self.top_p)  # finite, in range, right types
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an int in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        ids = tuple(self.stop_token_ids or ())
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    request_id: str = ""
    output: list[int] = field(default_factory=list)
    status: str = WAITING
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None  # why it failed (finish_reason "error"): its sampling or its forward raised
    num_preemptions: int = 0
    slot: int = -1  # row of the runner's decode block table while running, else -1
    table_len: int = 0  # pages of ``pages`` already written to that row
    digests: list[bytes] = field(default_factory=list, repr=False)  # prefix digests of its first full pages
    num_named: int = 0  # pages of ``pages`` already offered to the prefix cache

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def last_token(self) -> int:
        """The token a decode step feeds: the last output token, or the prompt's last before any output."""
        return self.output[-1] if self.output else self.prompt[-1]

    def append_token(self, tok: int, now: float, eos: int | None, max_len: int) -> str | None:
        """Append a generated token; returns why the sequence ends with it (``stop`` / ``length``) or None."""
        if self.first_token_time is None:
            self.first_token_time = now
        out, p = self.output, self.params
        out.append(tok)
        if tok in p.stop_token_ids or (tok == eos and not p.ignore_eos):
            return "stop"
        if len(out) >= p.max_tokens or len(self.prompt) + len(out) >= max_len:
            return "length"
        return None


def decode_inputs(seqs: list[Sequence]) -> tuple[list[int], list[int], list]:
    """``(starts, slots, updates)`` of a decode batch: each sequence's position and block-table row, and
    the ``(slot, first column, pages)`` table updates for the pages added since its last decode step
    (marked written)."""
    updates = []
    for s in seqs:
        n = len(s.pages)
        if n != s.table_len:
            updates.append((s.slot, s.table_len, s.pages[s.table_len :]))
            s.table_len = n
    return [s.num_computed for s in seqs], [s.slot for s in seqs], updates


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, tokens to feed this step)
    preempted: list[Sequence]
    verify: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # (sequence, proposed tokens)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill and not self.verify


class Scheduler:
    """Chooses what each engine step runs; owns the queue, the running set and the pages.

    Args:
        allocator: the page allocator of the pool.
        max_batch: running sequences at most (the largest decode batch).
        max_num_batched_tokens: tokens fed per step at most (decode + prefill chunks).
        num_speculative_tokens: n-gram proposals per decode (0 = off).
        ngram: (min, max) n-gram lengths of the proposals.
        max_model_len: tokens a sequence may reach (proposals never go past it).

    Prefix caching is on when ``allocator`` is a :class:`~kvslim.engine.prefix.PrefixCachingAllocator`.
    """

    def __init__(self, allocator: BlockAllocator, *, max_batch: int = 64, max_num_batched_tokens: int = 512,
                 num_speculative_tokens: int = 0, ngram: tuple[int, int] = (1, 3), max_model_len: int | None = None):
        if max_batch < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_batch and max_num_batched_tokens must be >= 1")
        self.alloc = allocator
        self.prefix_caching = isinstance(allocator, PrefixCachingAllocator)
        self.num_spec = num_speculative_tokens
        self.ngram = ngram
        self.max_model_len = max_model_len or allocator.num_usable * allocator.page_size
        self.prefix_queried_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which found cached (not prefilled)
        self._inflight: dict[bytes, Sequence] = {}  # digests of pages a running sequence is still prefilling
        self.max_batch = max_batch
        self.max_tokens_per_step = max(max_num_batched_tokens, max_batch)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._free_slots = list(range(max_batch - 1, -1, -1))

    def _release(self, seq: Sequence) -> None:
        if self._inflight:
            for d in seq.digests[seq.num_named :]:
                if self._inflight.get(d) is seq:
                    del self._inflight[d]
        self.alloc.free(seq.pages)
        seq.pages = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
        seq.slot, seq.table_len = -1, 0

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished, free its pages and drop it from the queues."""
        if seq.status == FINISHED:
            return
        if seq.status == RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self._release(seq)
        seq.status = FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.monotonic()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_named = 0
        seq.status = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.alloc.pages_for(num_tokens) - len(seq.pages)
        if need <= 0:
            return True
        if not self.alloc.can_allocate(need):
            return False
        seq.pages.extend(self.alloc.allocate(need))
        return True

    def _admit_pages(self, seq: Sequence, dry_run: bool = False) -> bool:
        """Reserve the pages of ``seq``'s tokens, sharing its longest cached prefix; False if they do not fit.

        ``dry_run``: only say whether they would fit (nothing is reserved or counted).
        """
        if not self.prefix_caching:
            if dry_run:
                return self.alloc.can_allocate(self.alloc.pages_for(seq.num_tokens) - len(seq.pages))
            return self._grow(seq, seq.num_tokens)
        a, ps, tokens = self.alloc, self.alloc.page_size, seq.tokens
        usable = (len(tokens) - 1) // ps  # at least one token is computed: its logits pick the next token
        digests = extend_digests(seq.digests, tokens, ps, usable)[:usable]
        hit = a.match(digests)
        if len(hit) < usable and digests[len(hit)] in self._inflight:
            return False  # a running sequence is computing the next pages of this prefix: wait for them
        need = a.pages_for(len(tokens)) - len(hit)
        if need > a.num_free - a.num_evictable(hit):
            return False
        if dry_run:
            return True
        a.share(hit)
        seq.pages = hit + a.allocate(need)
        seq.num_named = len(hit)
        seq.num_computed = len(hit) * ps
        self.prefix_queried_tokens += len(tokens)
        self.prefix_hit_tokens += len(hit) * ps
        for d in digests[len(hit) :]:
            self._inflight.setdefault(d, seq)
        return True

    def can_admit(self) -> bool:
        """Whether :meth:`schedule` would admit the head of the queue now (changes nothing)."""
        return (bool(self.waiting) and len(self.running) < self.max_batch
                and self._admit_pages(self.waiting[0], dry_run=True))

    def commit(self, seqs: list[Sequence]) -> None:
        """Offer the pages of ``seqs`` that became full and computed to the prefix cache."""
        if not self.prefix_caching:
            return
        a, ps = self.alloc, self.alloc.page_size
        for seq in seqs:
            full = seq.num_computed // ps
            if full <= seq.num_named or seq.status != RUNNING:
                continue
            digests = extend_digests(seq.digests, seq.tokens, ps, full)
            for i in range(seq.num_named, full):
                a.register(seq.pages[i], digests[i])
                if self._inflight.get(digests[i]) is seq:
                    del self._inflight[digests[i]]
            seq.num_named = full

    def trim(self, seq: Sequence) -> None:
        """Free the pages past what ``seq``'s tokens need (after rejected proposals)."""
        keep = self.alloc.pages_for(seq.num_tokens)
        if len(seq.pages) > keep:
            self.alloc.free(seq.pages[keep:])
            del seq.pages[keep:]
            if seq.table_len > keep:
                seq.table_len = 0  # the decode row is rewritten (and cleared) at the next decode

    def _propose(self, seq: Sequence, n: int, room: int) -> list[int]:
        """An n-gram proposal for ``seq`` of ``n`` tokens that fits ``room`` tokens of budget."""
        p = seq.params
        k = min(self.num_spec, room, p.max_tokens - len(seq.output) - 1, self.max_model_len - n - 1)
        if k <= 0:
            return []
        draft = propose_ngram(seq.tokens, k, *self.ngram)
        if not draft:
            return []
        # proposals take pages only with a page to spare per running sequence: never a preemption
        extra = self.alloc.pages_for(n + len(draft)) - len(seq.pages)
        if extra > 0 and self.alloc.num_free - extra < len(self.running):
            return []
        self._grow(seq, n + len(draft))
        return draft

    def schedule(self) -> StepPlan:
        preempted: list[Sequence] = []
        decode: list[Sequence] = []
        partial: list[Sequence] = []  # running, still being prefilled
        verify: list[tuple[Sequence, list[int]]] = []
        spec_tokens = 0
        page_size = self.alloc.page_size
        for seq in list(self.running):  # hot loop at large batches: the properties are inlined
            if seq.status != RUNNING:
                continue
            n = len(seq.prompt) + len(seq.output)
            pending = n - seq.num_computed
            if pending != 1:
                if pending > 1:
                    partial.append(seq)
                continue
            if self.num_spec:
                room = self.max_tokens_per_step - len(self.running) - spec_tokens
                draft = self._propose(seq, n, room)
                if draft:
                    verify.append((seq, draft))
                    spec_tokens += len(draft)
                    continue
            if len(seq.pages) * page_size < n:
                while not self._grow(seq, n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
            if seq.status == RUNNING:
                decode.append(seq)
        budget = self.max_tokens_per_step - len(decode) - len(verify) - spec_tokens
        prefill: list[tuple[Sequence, int]] = []
        for seq in partial:
            if budget <= 0:
                break
            if seq.status == RUNNING:  # not preempted by a later decode
                n = min(seq.pending, budget)
                prefill.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch and not preempted:
            seq = self.waiting[0]
            if not self._admit_pages(seq):
                break  # FIFO: the head waits for pages, nobody overtakes it
            self.waiting.popleft()
            seq.status = RUNNING
            seq.slot, seq.table_len = self._free_slots.pop(), 0
            self.running.append(seq)
            n = min(seq.pending, budget)
            prefill.append((seq, n))
            budget -= n
        return StepPlan(decode, prefill, preempted, verify)
