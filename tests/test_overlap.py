"""Overlapped decode (issue #13): step n+1 launched before step n's tokens are read, tokens unchanged.

On CPU the device is synchronous, so what these tests check is the pipeline's bookkeeping: the
same tokens as ``model.generate`` and as the synchronous engine under ragged arrivals, finishes at
different steps, stop tokens, aborts, preemption and prefix caching; that launches really precede
the previous step's read; that no token follows a finish; and that every page comes back (and none
is handed out while the step in flight still writes it).
"""

import argparse

import pytest
import torch

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import RUNNING, SamplingParams
from kvslim.testing import tiny_model, tiny_spec

KINDS = ("gqa-2", "gta-2", "mla", "gla-2")
ARRIVALS = [0, 0, 2, 3, 5, 9, 9]
MAX_TOKENS = [10, 1, 7, 12, 3, 9, 2]  # finishes at different steps, one right after its prefill


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(seed=1, vocab=97):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    system = rand(9)  # two pages of 4 shared by three prompts: prefix-cache hits
    return [rand(3), system + rand(8), rand(9), system + rand(21), rand(1), system + rand(3), rand(12)]


def _engine(model, overlap=True, **kw):
    base = dict(num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=16, overlap=overlap)
    return LLMEngine(model, EngineConfig(**(base | kw)))


def _check_held_pages(eng):
    """Pages of sequences finished while a step runs are held: not free, and no other sequence's
    unless they are cached full pages it shared before (those are never written again)."""
    p = eng.pipeline.pending
    a = eng.allocator
    held = {pg for pages in (p.held if p else []) for pg in pages}
    owned = {pg for s in eng.scheduler.running for pg in s.pages}
    free = set(a._free) | set(getattr(a, "_lru", ()))
    assert not held & free, held & free
    assert all(pg in getattr(a, "_digest_of", ()) for pg in held & owned), held & owned
    eng.held_seen = getattr(eng, "held_seen", 0) + len(held)


def _drive(eng, prompts, params, arrivals, aborts=None):
    """``eng.generate`` by hand, with aborts (``{step: [request index]}``) and a listener that checks
    that no token follows a finish; returns the outputs and the finish reasons."""
    aborts = aborts or {}
    seqs = [None] * len(prompts)
    done = [False] * len(prompts)
    events = [[] for _ in prompts]

    def listener(i):
        def on_event(seq, tok):
            assert not done[i], f"request {i}: event {tok} after its finish"
            if tok is None:
                done[i] = True
            else:
                events[i].append(tok)
        return on_event

    step = 0
    while step <= max(arrivals) or eng.has_unfinished():
        for i, a in enumerate(arrivals):
            if a == step:
                seqs[i] = eng.add_request(prompts[i], params[i], listener=listener(i))
        for i in aborts.get(step, ()):
            eng.abort(seqs[i].request_id)
            _check_held_pages(eng)
        if eng.has_unfinished():
            eng.step()
            _check_held_pages(eng)
        step += 1
        assert step < 500
    assert all(done) and events == [s.output for s in seqs]
    assert eng.allocator.num_free == eng.allocator.num_usable and eng.allocator.num_used == 0
    assert eng.pipeline.pending is None
    return [s.output for s in seqs], [s.finish_reason for s in seqs]


@pytest.mark.parametrize("kind", KINDS)
def test_overlap_matches_generate_and_the_synchronous_engine(kind):
    model = tiny_model(tiny_spec(kind))
    prompts = _prompts()
    params = [SamplingParams(max_tokens=m) for m in MAX_TOKENS]
    full = model.generate(prompts, max_new_tokens=max(MAX_TOKENS))
    ref = [f[:m] for f, m in zip(full, MAX_TOKENS)]
    runs = {}
    for overlap in (True, False):
        eng = _engine(model, overlap)
        out, reasons = _drive(eng, prompts, params, ARRIVALS)
        assert out == ref and reasons == ["length"] * len(prompts)
        runs[overlap] = eng.stats()
    on, off = runs[True], runs[False]
    assert on["overlap"] and not off["overlap"]
    # arrivals until step 9 and chunked prefill keep some steps synchronous; the decode tail overlaps
    assert on["overlap_steps"] >= on["steps"] // 2 and off["overlap_steps"] == 0
    assert on["prefix_hit_tokens"] > 0 and on["generation_tokens"] == off["generation_tokens"] == sum(MAX_TOKENS)
    # finishes by length are known before the next launch: nothing is computed for them
    assert on["overlap_discarded_tokens"] == 0


@pytest.mark.parametrize("kind", ("gqa-2", "mla"))
def test_stop_tokens_mid_pipeline_are_exact_and_drop_the_step_in_flight(kind):
    model = tiny_model(tiny_spec(kind))
    prompts = _prompts(seed=2)
    free = model.generate(prompts, max_new_tokens=12)
    params, cut = [], []
    for i, f in enumerate(free):  # request i stops at its (2 + i % 6)-th new token or a later first occurrence
        k = next((k for k in range(2 + i % 6, 11) if f[k] not in f[:k]), None)
        params.append(SamplingParams(max_tokens=12, stop_token_ids=() if k is None else (f[k],)))
        cut.append(f if k is None else f[: k + 1])
    assert sum(len(c) < 12 for c in cut) >= 4
    arrivals = [0, 0, 0, 0, 1, 1, 2]
    outs = {}
    for overlap in (True, False):
        eng = _engine(model, overlap, max_num_batched_tokens=64)
        outs[overlap] = _drive(eng, prompts, params, arrivals)
        if overlap:  # stops read while the next step ran: that step's tokens for them were dropped
            assert eng.counters["overlap_discarded_tokens"] >= 3 and eng.held_seen > 0
    assert outs[True] == outs[False]
    assert outs[True][0] == cut
    assert outs[True][1].count("stop") == sum(len(c) < 12 for c in cut)


@pytest.mark.parametrize("kind", ("gta-2", "gla-2"))
def test_aborts_mid_run_give_the_synchronous_outputs(kind):
    model = tiny_model(tiny_spec(kind))
    prompts = _prompts(seed=3)
    params = [SamplingParams(max_tokens=14) for _ in prompts]
    aborts = {6: [0], 8: [3, 1], 13: [5]}  # running decodes, a request mid-prefill, two at once
    outs = {}
    for overlap in (True, False):
        eng = _engine(model, overlap, max_num_batched_tokens=8)
        outs[overlap] = _drive(eng, prompts, params, ARRIVALS, aborts)
        assert eng.counters["requests_aborted"] == 4
        assert getattr(eng, "held_seen", 0) > 0 or not overlap  # aborted while a step wrote their pages
    assert outs[True] == outs[False]
    full = model.generate(prompts, max_new_tokens=14)
    assert all(f[: len(o)] == o for f, o in zip(full, outs[True][0]))
    assert outs[True][1].count("abort") == 4


def test_aborting_everything_in_flight_returns_every_page_at_once():
    model = tiny_model(tiny_spec("gqa-2"))
    eng = _engine(model)
    seqs = [eng.add_request(p, SamplingParams(max_tokens=20)) for p in _prompts()[:4]]
    while eng.pipeline.pending is None:
        eng.step()
    assert eng.pipeline.pending.seqs  # a decode step is in flight, its tokens unread
    for s in seqs:
        eng.abort(s.request_id)
    assert not eng.has_unfinished() and eng.pipeline.pending is None
    assert eng.allocator.num_free == eng.allocator.num_usable
    assert all(s.finish_reason == "abort" for s in seqs)


@pytest.mark.parametrize("kind", KINDS)
def test_preemption_in_a_tiny_pool_keeps_outputs(kind):
    model = tiny_model(tiny_spec(kind))
    prompts = _prompts(seed=4)
    ref = model.generate(prompts, max_new_tokens=10)
    params = [SamplingParams(max_tokens=10)] * len(prompts)
    eng = _engine(model, num_pages=14)  # 13 pages x 4 tokens for up to 7 x 40 tokens
    out, _ = _drive(eng, prompts, params, ARRIVALS)
    assert out == ref
    assert eng.stats()["preemptions"] > 0 and eng.counters["overlap_steps"] > 0


def test_launches_precede_the_previous_read_and_not_without_overlap():
    """The counter and the order of calls prove the overlap: step n+1 is launched before step n is read."""
    model = tiny_model(tiny_spec("gla-2"))
    prompts = _prompts(seed=5)[:3]
    log = {}
    for overlap in (True, False):
        eng = _engine(model, overlap)
        calls = log[overlap] = []
        decode, read = eng.runner.decode, eng.runner.read_greedy
        eng.runner.decode = lambda *a, calls=calls, decode=decode, **k: calls.append("L") or decode(*a, **k)
        eng.runner.read_greedy = lambda h, calls=calls, read=read: calls.append("R") or read(h)
        assert eng.generate(prompts, SamplingParams(max_tokens=8)) == model.generate(prompts, max_new_tokens=8)
        if overlap:
            assert eng.counters["overlap_steps"] >= 5
        else:
            assert eng.counters["overlap_steps"] == 0
    seq = "".join(log[True])
    assert "LLR" in seq and seq.count("LR") >= 5  # launch n, launch n+1, read n; then launch, read, ...
    assert "R" not in log[False]  # synchronous: each decode's tokens are read by its own sampling


def test_sampled_requests_take_the_synchronous_path():
    model = tiny_model(tiny_spec("mla"))
    prompts = _prompts(seed=6)[:4]
    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=11)  # outlives the greedy ones
    params = [SamplingParams(max_tokens=8), sampled, SamplingParams(max_tokens=8), SamplingParams(max_tokens=8)]
    outs = {}
    for overlap in (True, False):
        eng = _engine(model, overlap)
        outs[overlap] = eng.generate(prompts, params)
        assert eng.counters["overlap_steps"] == 0  # every decode batch held the sampled request
    assert outs[True] == outs[False]
    ref = model.generate(prompts, max_new_tokens=8)
    assert [outs[True][i] for i in (0, 2, 3)] == [ref[i] for i in (0, 2, 3)]


def test_overlap_is_off_with_speculation_and_validated():
    model = tiny_model(tiny_spec("gqa-2"))
    assert not _engine(model, num_speculative_tokens=3).pipeline.enabled
    assert _engine(model).pipeline.enabled
    with pytest.raises(ValueError, match="overlap"):
        EngineConfig(overlap="yes")
    from kvslim.cli.engine_args import add_engine_args, add_model_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args([])).overlap
    assert not engine_config_from_args(p.parse_args(["--no-overlap"])).overlap


def test_pipeline_state_between_steps():
    """After a step in flight: every running sequence is in it, one row past its tokens, and the pages
    of the next row exist (grown ahead)."""
    model = tiny_model(tiny_spec("gqa-2"))
    eng = _engine(model)
    for p in _prompts(seed=7)[:3]:
        eng.add_request(p, SamplingParams(max_tokens=30))
    seen = 0
    while eng.has_unfinished():
        eng.step()
        p = eng.pipeline.pending
        if p is None:
            continue
        seen += 1
        for s in eng.scheduler.running:
            assert s in p.seqs and s.status == RUNNING
            assert s.num_computed == s.num_tokens  # its last token is being fed by the step in flight
            assert len(s.pages) * 4 >= s.num_computed
    assert seen > 20


def test_a_new_arrival_drains_the_pipeline_and_is_admitted_at_once():
    model = tiny_model(tiny_spec("gta-2"))
    prompts = _prompts(seed=8)
    eng = _engine(model)
    first = [eng.add_request(p, SamplingParams(max_tokens=25)) for p in prompts[:2]]
    while eng.pipeline.pending is None:
        eng.step()
    late = eng.add_request(prompts[2], SamplingParams(max_tokens=6))
    eng.step()  # reads the step in flight, launches nothing ahead: the next step admits
    assert eng.pipeline.pending is None and late.status != RUNNING
    eng.step()  # synchronous: prefill of the new request with the others' decode
    assert late.status == RUNNING and eng.last_step == (2, len(prompts[2]))
    while eng.has_unfinished():
        eng.step()
    ref = model.generate(prompts[:3], max_new_tokens=25)
    assert [s.output for s in first] == ref[:2] and late.output == ref[2][:6]
    assert eng.allocator.num_free == eng.allocator.num_usable
