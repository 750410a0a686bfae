"""Overlapped greedy decode: step n+1 is launched before the host reads step n's tokens (issue #13).

In the synchronous engine the device idles while the host reads a step's tokens, appends them,
checks stop conditions, notifies listeners and schedules the next step (vLLM's async scheduling
and SGLang's overlap scheduler remove that gap the same way as here). When a decode step is
*eligible* (decode only: no prefill chunk, no speculative verify, no preemption; every sequence
greedy; single rank; ``EngineConfig.overlap``) the engine runs it through :class:`DecodePipeline`:

1. step n is launched; its greedy tokens stay on the device (``ModelRunner.greedy``) and a
   non-blocking copy to pinned host memory is queued behind an event;
2. step n+1 is launched at once for the same sequences, assuming each continues: its input
   tokens are step n's greedy tokens gathered on the device (``ModelRunner.decode(src=...)``),
   its positions, slots and block-table updates are staged on the host, and a sequence whose
   next page starts at the new position gets that page now;
3. only then the host waits for step n's tokens, appends them, checks stop conditions and
   notifies listeners, while the device runs step n+1. The next ``step()`` call launches n+2
   and reads n+1, and so on: each call still yields one decode step's tokens.

A sequence that reaches ``max_tokens`` or ``max_model_len`` at step n is known to finish before
step n+1 is launched, so it is left out of it. One that stops on a stop token / EOS, fails
(non-finite logits) or is aborted while step n+1 is in flight is finished as in the synchronous
engine; the token step n+1 computes for it is discarded (never appended, counted in
``overlap_discarded_tokens``), and its pages are *held* until that step has been read (it
writes the KV row of the last token there), so no other sequence is given them while it runs.
The device runs everything on one stream, so this is belt and braces on CUDA and exact by
construction on CPU.

The pipeline drains (the next step is not launched ahead; the one in flight is read and the
step after it runs synchronously) when the queue's head could be admitted (a prefill), a running
sequence is not in the batch (being prefilled), or the pages of the next positions are not free
(the synchronous step preempts). Sampled requests, speculative decoding and tensor parallelism
always take the synchronous path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvslim.engine.scheduler import RUNNING, Sequence, decode_inputs


@dataclass(eq=False)
class InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list[Sequence]
    handle: tuple  # from ModelRunner.greedy_to_host
    ids: set[int] = field(default_factory=set)  # id() of ``seqs``
    held: list[list[int]] = field(default_factory=list)  # pages of sequences finished while this step runs

    def __post_init__(self):
        self.ids = {id(s) for s in self.seqs}


class DecodePipeline:
    """The overlapped decode path of one :class:`~kvslim.engine.engine.LLMEngine` (see the module docstring).

    Args:
        engine: the engine (its runner, scheduler, allocator, listeners and counters are used).
        enabled: overlap allowed at all (``EngineConfig.overlap``, single rank, no speculation).
    """

    def __init__(self, engine, enabled: bool):
        self.engine = engine
        self.enabled = enabled
        self.pending: InFlight | None = None

    def eligible(self, seqs: list[Sequence]) -> bool:
        """Whether a decode-only step of ``seqs`` may run overlapped (all greedy)."""
        return self.enabled and all(s.params.temperature == 0 for s in seqs)

    def start(self, seqs: list[Sequence]) -> list[Sequence]:
        """Launch a scheduled decode-only step of ``seqs`` (tokens from the host), then :meth:`advance`."""
        toks = [s.last_token for s in seqs]
        try:
            step = self._launch(seqs, toks, None)
        except Exception as e:  # noqa: BLE001 - fail this forward's sequences, not the server
            self.engine._fail_forward(seqs, "decode", e)
            return seqs
        self.pending = step
        return self.advance()

    def advance(self) -> list[Sequence]:
        """Launch the step after the one in flight (unless the pipeline must drain), then read the one
        in flight; returns the sequences that got a token or finished."""
        step = self.pending
        self.engine.last_step = (len(step.seqs), 0)
        batch, src = self._next_batch(step)
        ahead = err = None
        if batch:
            try:
                ahead = self._launch(batch, None, src)
            except Exception as e:  # noqa: BLE001 - failed after step is read, as the synchronous path would
                err = e
        self.pending = ahead
        touched = self._resolve(step)
        if err is not None:
            self.engine._fail_forward([s for s in batch if s.status == RUNNING], "decode", err)
        self.settle()
        return touched

    def hold(self, seq: Sequence) -> None:
        """Called before ``seq`` finishes: if the step in flight writes its pages, keep them until it is read."""
        p = self.pending
        if p is not None and seq.pages and id(seq) in p.ids:
            p.held.append(seq.pages)
            seq.pages = []

    def settle(self) -> None:
        """Read the step in flight now if none of its sequences is still running (nothing to wait for)."""
        p = self.pending
        if p is not None and not any(s.status == RUNNING for s in p.seqs):
            self.pending = None
            self._resolve(p)

    def _next_batch(self, step: InFlight) -> tuple[list[Sequence], list[int]]:
        """The sequences of the step after ``step`` and their rows in ``step``; empty to drain."""
        eng = self.engine
        sch, alloc = eng.scheduler, eng.allocator
        live = [s for s in step.seqs if s.status == RUNNING]
        if len(live) != len(sch.running) or sch.can_admit():
            return [], []  # a sequence is being prefilled, or the next step admits one: drain
        batch, src, grow = [], [], []
        max_len, ps = eng.max_model_len, alloc.page_size
        for i, s in enumerate(step.seqs):
            if s.status != RUNNING:
                continue
            n = len(s.prompt) + len(s.output) + 1  # its tokens once step's token is appended
            if len(s.output) + 1 >= s.params.max_tokens or n >= max_len:
                continue  # step's token finishes it by length: nothing to compute after it
            batch.append(s)
            src.append(i)
            if len(s.pages) * ps <= s.num_computed:  # the next row starts a page
                grow.append(s)
        if grow:
            if not alloc.can_allocate(len(grow)):
                return [], []  # the synchronous step preempts
            for s, page in zip(grow, alloc.allocate(len(grow))):
                s.pages.append(page)
        return batch, src

    def _launch(self, seqs: list[Sequence], toks: list[int] | None, src: list[int] | None) -> InFlight:
        """Stage and launch one decode step (tokens from the host, or from the rows ``src`` of the last one)."""
        eng = self.engine
        starts, slots, updates = decode_inputs(seqs)
        eng.runner.decode(toks, starts, slots, updates, src=src)
        for s in seqs:
            s.num_computed += 1
        if src is not None:
            eng.counters["overlap_steps"] += 1
        return InFlight(seqs, eng.runner.greedy_to_host(len(seqs)))

    def _resolve(self, step: InFlight) -> list[Sequence]:
        """Wait for ``step``'s tokens, release the pages it held, append, check stops, notify, finish.

        The hot loop at large batches (as ``LLMEngine._sample``), hence its locals.
        """
        eng = self.engine
        try:
            toks = eng.runner.read_greedy(step.handle)
        except Exception as e:  # noqa: BLE001 - fail this forward's sequences, not the server
            toks = None
            error = e
        for pages in step.held:  # the step that wrote them has completed
            eng.allocator.free(pages)
        step.held = []
        if toks is None:
            live = [s for s in step.seqs if s.status == RUNNING]
            eng._fail_forward(live, "decode", error)
            return live
        now = time.monotonic()
        eos, max_len, listeners, c = eng.eos_token_id, eng.max_model_len, eng.listeners, eng.counters
        commit = eng.scheduler.commit
        touched, going = [], []
        emitted = 0
        for seq, tok in zip(step.seqs, toks):
            if seq.status != RUNNING:
                c["overlap_discarded_tokens"] += 1  # finished while this step ran: its token is not its
                continue
            touched.append(seq)
            if tok < 0:
                eng._fail(seq, "the model produced non-finite logits (NaN or inf) for this request")
                continue
            reason = seq.append_token(tok, now, eos, max_len)
            out = seq.output
            emitted += 1
            listener = listeners.get(seq.request_id)
            if listener is not None:
                listener(seq, tok)
            if reason is None:
                going.append(seq)
                continue
            # its last token is never fed: a row the step in flight writes for it is not its
            seq.num_computed = min(seq.num_computed, len(seq.prompt) + len(out) - 1)
            commit([seq])  # before the finish frees them: finished requests leave pages cached
            eng._finish(seq, reason)
            c["requests_finished"] += 1
        commit(going)  # every fed token is known now: the pages they filled can be named
        c["generation_tokens"] += emitted
        return touched
