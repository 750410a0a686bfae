"""LLMEngine: paged KV pool + continuous-batching scheduler + runner + sampling.

Single-threaded: ``add_request`` queues, ``step`` runs one scheduler step (a decode batch
and/or prefill chunks) and samples. Greedy decode-only steps run overlapped (step n+1 is
launched before step n's tokens are read, ``kvslim/engine/overlap.py``); everything else is
synchronous. ``EngineLoop`` in
``kvslim/engine/loop.py`` (a thread) or ``EngineProcess`` in ``kvslim/engine/process.py``
(a process) drives it for the HTTP server; ``generate`` drives it offline. Under tensor
parallelism this object lives on rank 0 and mirrors every forward to the other ranks
through a ``tp.TPSession`` (``kvslim/engine/tp.py``), verification forwards of speculative
decoding included (they carry their page lists, as prefill does, so prefix-cache sharing needs
nothing more from the followers: they mirror the leader's page decisions).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import torch

from kvslim.engine import speculative
from kvslim.engine.allocator import BlockAllocator, free_device_memory, num_pages_for_memory
from kvslim.engine.config import EngineConfig, default_page_size
from kvslim.engine.overlap import DecodePipeline
from kvslim.engine.prefix import PrefixCachingAllocator
from kvslim.engine.runner import ModelRunner
from kvslim.engine.scheduler import FINISHED, SamplingParams, Scheduler, Sequence, decode_inputs
from kvslim.rows import RowFormat, kv_dtype_name
from kvslim.sampling import probabilities, sample

Listener = Callable[[Sequence, "int | None"], None]
log = logging.getLogger("kvslim.engine")


def validate_request(prompt, params: SamplingParams, *, vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError if the request can never run: bad ids, or prompt + max_tokens > max_model_len."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("prompt must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must be ints in [0, {vocab_size})")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    total = len(prompt) + params.max_tokens
    if total > max_model_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
            f"max_model_len {max_model_len}"
        )


class LLMEngine:
    """Serve many sequences from one preallocated paged KV pool per layer.

    Args:
        model: a ``Transformer`` (eval mode, on its device and dtype) or one TP rank's shard.
        config: the :class:`~kvslim.engine.config.EngineConfig` (pool size, page size, batch and
            token budgets, CUDA graphs, RNG seed); its ``device``/``dtype``/``tp`` fields are
            for :func:`~kvslim.engine.build.build_engine`: here the model already sits on
            its device and ``tp`` is the session.
        eos_token_id: stops a request unless its params say ``ignore_eos``.
        tp: a ``tp.TPSession`` mirroring forwards to the other ranks (None = single rank).
    """

    def __init__(self, model, config: EngineConfig | None = None, *, eos_token_id: int | None = None, tp=None):
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.engine_config = config
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.device = p.device
        tp_size = tp.size if tp is not None else 1
        specs = self.config.layer_specs  # per-layer latent ranks: rows of different widths
        kv_dtype = config.kv_dtype or kv_dtype_name(p.dtype)
        self.kv_formats = [RowFormat.for_spec(s, kv_dtype, tp_size) for s in specs]
        self.kv_format = self.kv_formats[0]
        num_pages, page_size = config.num_pages, config.page_size or default_page_size(self.config.attention)
        if num_pages is None:
            kv_memory = config.kv_memory_bytes
            if kv_memory is None:
                kv_memory = free_device_memory(self.device, config.mem_util)
            num_pages = num_pages_for_memory(specs, self.config.num_layers, kv_memory, page_size=page_size,
                                             dtype=kv_dtype, tp_size=tp_size)
        alloc_cls = PrefixCachingAllocator if config.enable_prefix_caching else BlockAllocator
        self.allocator = alloc_cls(num_pages, page_size)
        limit = self.allocator.num_usable * page_size
        self.max_model_len = min(config.max_model_len or self.config.max_position_embeddings, limit)
        self.scheduler = Scheduler(self.allocator, max_batch=config.max_batch,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   num_speculative_tokens=config.num_speculative_tokens,
                                   ngram=(config.prompt_lookup_min, config.prompt_lookup_max),
                                   max_model_len=self.max_model_len)
        self.eos_token_id = eos_token_id
        self.tp = tp
        runner_kw = dict(num_pages=num_pages, page_size=page_size,
                         max_pages_per_seq=self.allocator.pages_for(self.max_model_len), max_batch=config.max_batch,
                         kv_format=self.kv_formats, cuda_graphs=config.cuda_graphs,
                         graph_batches=config.graph_batches,
                         compile=self.device.type == "cuda" if config.compile is None else config.compile,
                         prefill_compile=config.prefill_compile, fuse_projections=config.fuse_projections)
        if tp is not None:
            tp.send("init", runner_kw)
        self.runner = ModelRunner(model, **runner_kw)
        seed = config.seed
        self.rng = torch.Generator(device=self.device).manual_seed(seed if seed is not None else random.randrange(2**31))
        self.requests: dict[str, Sequence] = {}
        self.listeners: dict[str, Listener] = {}
        self.last_step = (0, 0)
        self.counters = dict(prompt_tokens=0, generation_tokens=0, requests_finished=0, requests_aborted=0,
                             requests_failed=0, steps=0, prefill_tokens=0, spec_verifies=0, spec_proposed_tokens=0,
                             spec_accepted_tokens=0, overlap_steps=0, overlap_discarded_tokens=0)
        # overlapped greedy decode: one rank, no speculation (verify steps need their tokens first)
        self.pipeline = DecodePipeline(self, config.overlap and tp is None and not config.num_speculative_tokens)

    def validate(self, prompt, params: SamplingParams) -> None:
        """Raise ValueError if the request can never run (bad ids, too long)."""
        validate_request(prompt, params, vocab_size=self.config.vocab_size, max_model_len=self.max_model_len)

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, *, request_id: str | None = None,
                    listener: Listener | None = None) -> Sequence:
        params = params or SamplingParams()
        self.validate(prompt, params)
        seq = Sequence(list(prompt), params, request_id=request_id or "")
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.requests[seq.request_id] = seq
        if listener is not None:
            self.listeners[seq.request_id] = listener
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += len(prompt)
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return False
        self._finish(seq, "abort")
        self.counters["requests_aborted"] += 1
        self.pipeline.settle()  # a step in flight with no running sequence left is read (and dropped) now
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self.pipeline.pending)

    def step(self) -> list[Sequence]:
        """Run one scheduler step; returns the sequences that got a token or finished.

        A forward that raises fails the sequences of that forward (finish reason ``"error"``,
        pages freed, ``seq.error`` says why) and the step goes on with the others; one
        sequence whose logits are not finite or whose sampling raises fails alone. Under
        tensor parallelism a failed forward leaves the ranks out of step, so it is re-raised.

        Overlap (``EngineConfig.overlap``): a greedy decode-only step is launched, the step after it
        is launched on the device's tokens, and only then this step's tokens are read; the next call
        launches the step after that and reads the one in flight (``kvslim/engine/overlap.py``).
        """
        self.counters["steps"] += 1
        if self.pipeline.pending is not None:
            return self.pipeline.advance()
        plan = self.scheduler.schedule()
        self.last_step = (len(plan.decode), sum(n for _, n in plan.prefill))  # (decode batch, prefill tokens)
        self.counters["prefill_tokens"] += self.last_step[1]
        if plan.decode and not plan.prefill and not plan.verify and self.pipeline.eligible(plan.decode):
            return self.pipeline.start(plan.decode)
        touched: list[Sequence] = []
        sample: list[tuple[list[Sequence], torch.Tensor, str]] = []  # (sequences, their logits, forward), sampled last
        if plan.verify:
            touched += self._verify(plan.verify)
        if plan.decode:
            seqs = plan.decode
            toks = [s.last_token for s in seqs]
            starts, slots, updates = decode_inputs(seqs)  # table updates: only pages added since the last step
            try:
                if self.tp is not None:
                    self.tp.send("decode", toks, starts, slots, updates)
                logits = self.runner.decode(toks, starts, slots, updates)
                for s in seqs:
                    s.num_computed += 1
                self.scheduler.commit(seqs)
                sample.append((seqs, logits, "decode"))
            except Exception as e:  # noqa: BLE001 - fail this forward's sequences, not the server
                self._fail_forward(seqs, "decode", e)
            touched += seqs
        groups: dict[int, list[Sequence]] = {}
        for seq, n in plan.prefill:  # chunks of one length run as one forward
            groups.setdefault(n, []).append(seq)
        for n, seqs in groups.items():
            starts = [s.num_computed for s in seqs]
            chunks = [s.tokens[st : st + n] for s, st in zip(seqs, starts)]
            pages = [s.pages for s in seqs]
            try:
                if self.tp is not None:
                    self.tp.send("prefill", chunks, starts, pages)
                logits = self.runner.prefill(chunks, starts, pages)
                done = []
                for i, s in enumerate(seqs):
                    s.num_computed += n
                    if s.pending == 0:
                        done.append(i)
                self.scheduler.commit(seqs)
                if done:
                    if len(done) < len(seqs):  # rows picked on the device (a list index would be a synchronous copy)
                        logits = logits.index_select(0, self.runner.upload(done, torch.long))
                    sample.append(([seqs[i] for i in done], logits, "prefill"))
                    touched += [seqs[i] for i in done]
            except Exception as e:  # noqa: BLE001 - fail this forward's sequences, not the server
                self._fail_forward(seqs, "prefill", e)
                touched += seqs
        self._sample_forwards(sample)
        return touched

    def _sample_forwards(self, sample: list[tuple[list[Sequence], torch.Tensor, str]]) -> None:
        """Sample the step's forwards together, after all of them are launched: one ``tolist`` for the step,
        so the host queues every forward while the device runs the first (a sync per forward serialised host
        and device work: each prefill forward waited for the one before it to finish)."""
        if not sample:
            return
        seqs = [s for group, _, _ in sample for s in group]
        try:
            logits = sample[0][1] if len(sample) == 1 else torch.cat([rows for _, rows, _ in sample])
            self._sample(seqs, logits)
        except Exception as e:  # noqa: BLE001 - an error surfacing at the sync: fail the step's sequences
            self._fail_forward(seqs, "+".join(dict.fromkeys(w for _, _, w in sample)), e)

    def _verify(self, entries: list[tuple[Sequence, list[int]]]) -> list[Sequence]:
        """Speculative steps: feed each sequence's last token + its proposals, accept the longest
        prefix the model agrees with plus its own next token (greedy), or rejection-sample them
        (temperature > 0; ``kvslim/engine/speculative.py``)."""
        groups: dict[int, list[tuple[Sequence, list[int]]]] = {}
        for seq, draft in entries:  # one forward per q_len: the model takes one T per forward
            groups.setdefault(len(draft), []).append((seq, draft))
        touched = []
        c = self.counters
        for group in groups.values():
            seqs = [s for s, _ in group]
            chunks = [[s.tokens[-1], *d] for s, d in group]
            starts = [s.num_computed for s in seqs]
            pages = [s.pages for s in seqs]
            try:
                if self.tp is not None:
                    self.tp.send("verify", chunks, starts, pages)
                logits = self.runner.verify(chunks, starts, pages)
                vals, idx = logits.max(-1)
                finite = torch.isfinite(vals).all(-1).tolist()
                targets = idx.tolist()
            except Exception as e:  # noqa: BLE001 - fail this forward's sequences, not the server
                self._fail_forward(seqs, "verify", e)
                touched += seqs
                continue
            now = time.monotonic()
            for i, ((s, draft), target, ok) in enumerate(zip(group, targets, finite)):
                touched.append(s)
                if not ok:
                    self._fail(s, "the model produced non-finite logits (NaN or inf) for this request")
                    continue
                p = s.params
                if p.temperature == 0:
                    a = speculative.accepted_prefix(draft, target)
                    new = draft[:a] + [target[a]]
                else:
                    try:
                        probs = probabilities(logits[i], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
                        new = speculative.rejection_sample(draft, probs, s.generator or self.rng)
                    except Exception as e:  # noqa: BLE001 - one request's sampling fails only that request
                        self._fail(s, f"sampling failed: {type(e).__name__}: {e}")
                        continue
                    a = len(new) - 1
                c["spec_verifies"] += 1
                c["spec_proposed_tokens"] += len(draft)
                c["spec_accepted_tokens"] += a
                reason = None
                for tok in new:
                    reason = self._push(s, tok, now)
                    if reason is not None:
                        break
                # rows of the fed token and the accepted proposals are valid; the rest get overwritten
                s.num_computed = min(s.num_computed + a + 1, s.num_tokens)
                self.scheduler.commit([s])  # before a finish frees them: finished requests leave pages cached
                if reason is not None:
                    self._finish(s, reason)
                    c["requests_finished"] += 1
                else:
                    self.scheduler.trim(s)
        return touched

    def _push(self, seq: Sequence, tok: int, now: float) -> str | None:
        """Append one verified token to ``seq`` and notify; returns the finish reason it causes."""
        p = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output.append(tok)
        self.counters["generation_tokens"] += 1
        reason = None
        if tok in p.stop_token_ids or (tok == self.eos_token_id and not p.ignore_eos):
            reason = "stop"
        elif len(seq.output) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        listener = self.listeners.get(seq.request_id)
        if listener is not None:
            listener(seq, tok)
        return reason

    def _fail_forward(self, seqs: list[Sequence], what: str, e: Exception) -> None:
        if self.tp is not None:
            raise e
        log.exception("%s forward of %d sequences failed", what, len(seqs))
        for s in seqs:
            if not s.finished:
                self._fail(s, f"engine error in the {what} forward: {type(e).__name__}: {e}")

    def _fail(self, seq: Sequence, message: str) -> None:
        """Finish ``seq`` alone with reason ``"error"`` (its listener sees ``seq.error``)."""
        seq.error = message
        self._finish(seq, "error")
        self.counters["requests_failed"] += 1

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token, append it, notify its listener, finish it if done.

        One ``max`` and one ``tolist`` (the step's only host sync) for the whole batch; the
        per-sequence loop is the engine's hottest Python at large batches, hence its locals.
        ``max`` propagates NaN, so a row whose maximum is not finite (NaN, +inf, all -inf) is
        marked -1 and fails alone, before ``torch.multinomial`` could see it (on CUDA its
        invalid-probability check is a device-side assert that would end every request).
        """
        vals, idx = logits.max(-1)
        greedy = torch.where(torch.isfinite(vals), idx, -1).tolist()
        now = time.monotonic()
        eos, max_len, listeners = self.eos_token_id, self.max_model_len, self.listeners
        failed = 0
        for i, seq in enumerate(seqs):
            p = seq.params
            tok = greedy[i]
            if tok < 0:
                self._fail(seq, "the model produced non-finite logits (NaN or inf) for this request")
                failed += 1
                continue
            if p.temperature != 0:
                try:
                    tok = int(sample(logits[i : i + 1], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                     generator=seq.generator or self.rng)[0])
                except Exception as e:  # noqa: BLE001 - one request's sampling fails only that request
                    self._fail(seq, f"sampling failed: {type(e).__name__}: {e}")
                    failed += 1
                    continue
            reason = seq.append_token(tok, now, eos, max_len)
            listener = listeners.get(seq.request_id)
            if listener is not None:
                listener(seq, tok)
            if reason is not None:
                self._finish(seq, reason)
                self.counters["requests_finished"] += 1
        self.counters["generation_tokens"] += len(seqs) - failed

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.pipeline.hold(seq)  # pages a decode step in flight still writes wait for it
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
        listener = self.listeners.pop(seq.request_id, None)
        if listener is not None:
            listener(seq, None)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None, *,
                 arrival_steps: list[int] | None = None, max_steps: int = 1_000_000) -> list[list[int]]:
        """Run ``prompts`` to completion; request ``i`` joins at step ``arrival_steps[i]`` (default 0)."""
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        arrivals = arrival_steps or [0] * len(prompts)
        if not (len(plist) == len(arrivals) == len(prompts)):
            raise ValueError("prompts, params and arrival_steps must have the same length")
        for p, sp in zip(prompts, plist):
            self.validate(p, sp)
        order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        seqs: list[Sequence | None] = [None] * len(prompts)
        step, k = 0, 0
        while k < len(order) or self.has_unfinished():
            while k < len(order) and arrivals[order[k]] <= step:
                i = order[k]
                seqs[i] = self.add_request(prompts[i], plist[i])
                k += 1
            if self.has_unfinished():
                self.step()
            step += 1
            if step > max_steps:
                raise RuntimeError(f"generate did not finish in {max_steps} steps")
        return [s.output for s in seqs]

    def stats(self) -> dict:
        a, s, c = self.allocator, self.scheduler, self.counters
        extra = dict(prefix_caching=s.prefix_caching, prefix_queried_tokens=s.prefix_queried_tokens,
                     prefix_hit_tokens=s.prefix_hit_tokens,
                     prefix_hit_rate=s.prefix_hit_tokens / max(1, s.prefix_queried_tokens),
                     prefix_cached_pages=getattr(a, "num_cached", 0), prefix_evictions=getattr(a, "evictions", 0),
                     num_speculative_tokens=s.num_spec,
                     spec_acceptance_rate=c["spec_accepted_tokens"] / max(1, c["spec_proposed_tokens"]),
                     spec_mean_accepted=c["spec_accepted_tokens"] / max(1, c["spec_verifies"]))
        return dict(num_pages=a.num_usable, free_pages=a.num_free, page_size=a.page_size,
                    running=len(s.running), waiting=len(s.waiting), preemptions=s.num_preemptions,
                    max_model_len=self.max_model_len, cuda_graphs=self.runner.use_graphs,
                    overlap=self.pipeline.enabled,
                    kv_dtype=self.kv_format.kv_dtype, kv_bytes_per_token=sum(f.row_bytes for f in self.kv_formats),
                    **self.counters, **extra)


__all__ = ["LLMEngine", "SamplingParams", "Sequence", "FINISHED", "validate_request"]
