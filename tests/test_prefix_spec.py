"""Prefix caching and n-gram speculative decoding: engine tokens == model.generate (greedy), pages balance."""

import pytest
import torch

from kvslim.engine import scheduler as scheduler_mod
from kvslim.engine import speculative
from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.prefix import PrefixCachingAllocator, extend_digests
from kvslim.engine.scheduler import SamplingParams
from kvslim.engine.source import ModelSource
from kvslim.engine.speculative import accepted_prefix, propose_ngram
from kvslim.testing import tiny_model, tiny_spec

KINDS = ("mha", "mqa", "gqa-2", "gta-2", "mla", "gla-2")
ARRIVALS = [0, 0, 1, 3, 4, 6, 9]


pytestmark = pytest.mark.usefixtures("one_thread")


def _shared_prompts(seed=0, vocab=97):
    """Requests sharing a 21-token "system prompt" (5 full pages of 4 + 1), one repeated whole, one short."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    system = rand(21)
    prompts = [system + rand(n) for n in (3, 9, 1, 14)]
    prompts += [list(prompts[0]), system[:16], rand(7)]  # an entirely cached prompt; one of exactly 4 pages
    return prompts


def _repetitive_prompts(seed=0, vocab=97):
    """Prompts with recurring n-grams, so that prompt lookup has something to propose."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for period, reps in ((5, 4), (3, 6), (7, 3), (4, 2)):
        unit = torch.randint(0, vocab, (period,), generator=g).tolist()
        out.append(unit * reps + unit[:2])
    out.append(torch.randint(0, vocab, (11,), generator=g).tolist())  # nothing to look up
    return out


def _engine(model, **kw):
    base = dict(num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=16)
    return LLMEngine(model, EngineConfig(**(base | kw)))


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_caching_matches_generate(kind, kv_dtype):
    model = tiny_model(tiny_spec(kind))
    prompts = _shared_prompts()
    ref = model.generate(prompts, max_new_tokens=8, kv_dtype=kv_dtype)
    eng = _engine(model, kv_dtype=kv_dtype)
    assert eng.scheduler.prefix_caching  # on by default
    out = eng.generate(prompts, SamplingParams(max_tokens=8), arrival_steps=ARRIVALS)
    assert out == ref
    s = eng.stats()
    # later arrivals reuse the 5 full pages of the system prompt; the repeated prompt all but its last page
    assert s["prefix_hit_tokens"] >= 20 * 3
    assert s["prefix_queried_tokens"] == sum(map(len, prompts))
    assert 0 < s["prefix_hit_rate"] < 1
    assert s["prefill_tokens"] <= s["prefix_queried_tokens"] - s["prefix_hit_tokens"]
    assert eng.allocator.num_free == eng.allocator.num_usable  # every page back (free or evictable)
    assert eng.allocator.num_used == 0 and eng.allocator.num_cached > 0


def test_prefix_caching_prefills_fewer_tokens_than_without():
    model = tiny_model(tiny_spec("gqa-2"))
    prompts = _shared_prompts(seed=1)
    ref = model.generate(prompts, max_new_tokens=6)
    stats = {}
    for on in (False, True):
        eng = _engine(model, enable_prefix_caching=on)
        assert eng.generate(prompts, SamplingParams(max_tokens=6), arrival_steps=ARRIVALS) == ref
        stats[on] = eng.stats()
    assert stats[False]["prefix_hit_tokens"] == 0 and not stats[False]["prefix_caching"]
    saved = stats[False]["prefill_tokens"] - stats[True]["prefill_tokens"]
    assert saved >= stats[True]["prefix_hit_tokens"] - len(prompts)  # at most one token per prompt goes to decode


@pytest.mark.parametrize("budget", [64, 8])
def test_requests_arriving_together_wait_for_the_shared_prefix(budget):
    """Requests queued behind one that is prefilling their common prefix reuse it instead of recomputing."""
    model = tiny_model(tiny_spec("gla-2"))
    g = torch.Generator().manual_seed(7)
    system = torch.randint(0, 97, (20,), generator=g).tolist()
    prompts = [system + torch.randint(0, 97, (n,), generator=g).tolist() for n in (2, 5, 3, 7)]
    ref = model.generate(prompts, max_new_tokens=6)
    eng = _engine(model, max_num_batched_tokens=budget)  # 8: the first prompt's prefill takes 3 steps
    assert eng.generate(prompts, SamplingParams(max_tokens=6)) == ref
    assert eng.stats()["prefix_hit_tokens"] == 3 * 20  # 5 pages of 4, computed once
    assert eng.allocator.num_free == eng.allocator.num_usable


@pytest.mark.parametrize("length", [16, 17])
def test_entirely_cached_prompt_still_computes_one_token(length):
    model = tiny_model(tiny_spec("mla"))
    prompt = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = model.generate([prompt], max_new_tokens=5)[0]
    eng = _engine(model)
    assert eng.generate([prompt], SamplingParams(max_tokens=5))[0] == ref
    calls = []
    orig = eng.runner.prefill
    eng.runner.prefill = lambda c, s, p: calls.append((len(c[0]), list(s))) or orig(c, s, p)
    assert eng.generate([prompt], SamplingParams(max_tokens=5))[0] == ref
    # 16 tokens: 3 pages reused, the last page (4 tokens) recomputed; 17: 4 pages reused, 1 token
    hit = 12 if length == 16 else 16
    assert eng.stats()["prefix_hit_tokens"] == hit
    assert calls == [(length - hit, [hit])]  # only the uncached rest is fed, at its position


@pytest.mark.parametrize("kind,kv_dtype", [("gqa-2", None), ("gla-2", None), ("mla", "fp8"), ("gta-2", "fp8")])
def test_prefix_caching_under_preemption_and_eviction(kind, kv_dtype):
    model = tiny_model(tiny_spec(kind))
    prompts = _shared_prompts(seed=2)
    ref = model.generate(prompts, max_new_tokens=10, kv_dtype=kv_dtype)
    # 13 usable pages of 4 tokens: sequences of up to 45 tokens preempt each other and evict cached pages
    eng = _engine(model, num_pages=14, kv_dtype=kv_dtype)
    out = eng.generate(prompts, SamplingParams(max_tokens=10), arrival_steps=ARRIVALS)
    s = eng.stats()
    assert s["preemptions"] > 0 and s["prefix_evictions"] > 0 and s["prefix_hit_tokens"] > 0
    assert out == ref
    assert eng.allocator.num_free == eng.allocator.num_usable and eng.allocator.num_used == 0
    # after the pressure, the pool still serves exactly (cached pages that survived included)
    assert eng.generate(prompts[:2], SamplingParams(max_tokens=10)) == ref[:2]


def test_allocator_refcounts_share_evict_and_free():
    a = PrefixCachingAllocator(6, 2)  # 5 usable pages
    tokens = [5, 6, 7, 8, 9]
    d = extend_digests([], tokens, 2, 2)
    assert d == extend_digests([], tokens[:4] + [1], 2, 2)  # a page's digest depends only on the prefix
    assert d[1] != extend_digests([], [5, 6, 7, 9], 2, 2)[1] and d[0] != extend_digests([], [6, 5], 2, 1)[0]
    p = a.allocate(3)
    a.register(p[0], d[0])
    a.register(p[1], d[1])
    assert a.match(d) == p[:2] and a.num_cached == 2
    a.share(p[:2])  # a second user
    a.free(p)  # the first user leaves: the shared pages stay in use, the third page is free
    assert a.refcount(p[0]) == a.refcount(p[1]) == 1 and a.num_free == 3
    a.free(p[:2])  # the last user leaves: both become evictable, still counted free, still cached
    assert a.num_used == 0 and a.num_free == a.num_usable and a.match(d) == p[:2]
    assert a.num_evictable(p[:2]) == 2
    taken = a.allocate(5)  # needs every page: evicts the cached ones, the tail (p[1]) first
    assert a.evictions == 2 and a.match(d) == [] and a.num_cached == 0
    assert taken[-2:] == [p[1], p[0]]
    a.free(taken)
    with pytest.raises(ValueError, match="double free"):
        a.free(taken[:1])


@pytest.mark.parametrize("kind", KINDS)
def test_speculative_decoding_matches_plain_greedy(kind):
    model = tiny_model(tiny_spec(kind))
    prompts = _repetitive_prompts()
    ref = model.generate(prompts, max_new_tokens=16)
    eng = _engine(model, num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
    out = eng.generate(prompts, SamplingParams(max_tokens=16), arrival_steps=[0, 0, 2, 3, 5])
    assert out == ref
    s = eng.stats()
    assert s["spec_proposed_tokens"] > 0 and s["spec_accepted_tokens"] > 0
    assert 0 < s["spec_acceptance_rate"] <= 1 and s["spec_mean_accepted"] > 0
    assert s["generation_tokens"] == sum(map(len, ref))
    assert eng.allocator.num_free == eng.allocator.num_usable and eng.allocator.num_used == 0


def test_speculation_takes_fewer_steps_and_works_with_fp8_and_eos():
    model = tiny_model(tiny_spec("gla-2"))
    prompts = _repetitive_prompts(seed=1)
    ref = model.generate(prompts, max_new_tokens=20, kv_dtype="fp8")
    steps = {}
    for k in (0, 7):
        eng = _engine(model, kv_dtype="fp8", num_speculative_tokens=k)
        assert eng.generate(prompts, SamplingParams(max_tokens=20)) == ref
        steps[k] = eng.stats()["steps"]
    assert steps[7] < steps[0]
    # a stop token inside an accepted run ends the request right there, pages balanced
    stop = ref[0][len(ref[0]) // 2]
    cut = [r[: r.index(stop) + 1] if stop in r else r for r in ref]
    eng = _engine(model, kv_dtype="fp8", num_speculative_tokens=7)
    assert eng.generate(prompts, SamplingParams(max_tokens=20, stop_token_ids=(stop,))) == cut
    assert eng.allocator.num_free == eng.allocator.num_usable


def test_mixed_greedy_and_sampled_batch():
    model = tiny_model(tiny_spec("gta-2"))
    prompts = _repetitive_prompts(seed=2)
    # the tiny model's logits are flat: a low temperature makes proposals likely enough to be accepted
    greedy, sampled = SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.01, seed=11)
    params = [greedy, sampled, greedy, sampled, greedy]
    eng = _engine(model, num_speculative_tokens=3)
    out = eng.generate(prompts, params)
    ref = model.generate(prompts, max_new_tokens=12)
    assert [out[i] for i in (0, 2, 4)] == [ref[i] for i in (0, 2, 4)]  # greedy ones: exact
    assert eng.stats()["spec_accepted_tokens"] > 0
    again = _engine(model, num_speculative_tokens=3).generate(prompts, params)
    assert again == out  # seeded sampled requests are reproducible with speculation too
    assert all(len(o) == 12 and all(0 <= t < 97 for t in o) for o in out)
    assert eng.allocator.num_free == eng.allocator.num_usable
    sampled_only = _engine(model, num_speculative_tokens=3)
    sampled_only.generate(prompts, SamplingParams(max_tokens=12, temperature=0.01, seed=3))
    assert sampled_only.stats()["spec_accepted_tokens"] > 0  # sampled requests are verified too


def _wrong_rejection_sample(draft, probs, generator):
    """A plausible bug: a rejected position is drawn from p itself instead of the residual p - q."""
    u = torch.rand(len(draft), generator=generator).tolist()
    for i, d in enumerate(draft):
        if u[i] >= float(probs[i, d]):
            return draft[:i] + [int(torch.multinomial(probs[i], 1, generator=generator))]
    return draft + [int(torch.multinomial(probs[len(draft)], 1, generator=generator))]


@pytest.mark.parametrize("fn,ok", [(speculative.rejection_sample, True), (_wrong_rejection_sample, False)])
def test_rejection_sampling_keeps_the_target_distribution(fn, ok):
    """Emitted tokens follow p at every position (and the test tells a wrong residual apart)."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    gen = torch.Generator().manual_seed(0)
    n = 12000
    first, second = torch.zeros(4), torch.zeros(4)
    for _ in range(n):
        out = fn([1, 2], probs, gen)
        first[out[0]] += 1
        if len(out) > 1:  # the first proposal accepted: out[1] is the second position's token
            second[out[1]] += 1
    err = max((first / n - probs[0]).abs().max().item(), (second / second.sum() - probs[1]).abs().max().item())
    assert (err < 0.03) if ok else (err > 0.1), err


def test_rejected_proposals_roll_back_exactly(monkeypatch):
    """Proposals that are mostly wrong: every rejection must roll back (lengths, pages) exactly."""
    model = tiny_model(tiny_spec("mla"))
    prompts = _repetitive_prompts(seed=3)
    ref = model.generate(prompts, max_new_tokens=14)

    def bad(tokens, k, lo, hi):
        return [(tokens[-1] * 7 + i) % 97 for i in range(k)]  # a k-token guess, almost never right

    monkeypatch.setattr(scheduler_mod, "propose_ngram", bad)

    def run(eng):
        step, checked = eng.step, []

        def checked_step():  # after every step no decoding sequence holds more pages than its tokens need
            out = step()
            for q in eng.scheduler.running:
                if q.pending == 1:
                    checked.append(len(q.pages) <= eng.allocator.pages_for(q.num_tokens))
            return out

        eng.step = checked_step
        return eng.generate(prompts, SamplingParams(max_tokens=14), arrival_steps=[0, 0, 1, 2, 3]), checked

    eng = _engine(model, num_pages=20, num_speculative_tokens=7)  # tight: proposals need and free pages
    out, checked = run(eng)
    assert out == ref and checked and all(checked)
    s = eng.stats()
    assert s["spec_proposed_tokens"] > 5 * s["spec_accepted_tokens"]
    assert eng.allocator.num_free == eng.allocator.num_usable and eng.allocator.num_used == 0
    # the page check can fail: without trimming, pages taken for rejected proposals stay held
    monkeypatch.setattr(scheduler_mod.Scheduler, "trim", lambda self, seq: None)
    out, checked = run(_engine(model, num_pages=64, num_speculative_tokens=7))
    assert out == ref and not all(checked)


def test_a_wrong_acceptance_rule_is_caught(monkeypatch):
    """The equivalence test can fail: accepting one proposal too many changes the output."""
    model = tiny_model(tiny_spec("gqa-2"))
    prompts = _repetitive_prompts(seed=4)
    ref = model.generate(prompts, max_new_tokens=16)
    monkeypatch.setattr(speculative, "accepted_prefix", lambda d, t: min(len(d), accepted_prefix(d, t) + 1))
    out = _engine(model, num_speculative_tokens=4).generate(prompts, SamplingParams(max_tokens=16))
    assert out != ref


def test_propose_ngram():
    toks = [1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    assert propose_ngram(toks, 2, 1, 3) == [4, 5]  # the latest earlier "1 2 3" was followed by 4 5
    assert propose_ngram(toks, 5, 1, 3) == [4, 5, 1, 2, 3]
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []  # nothing recurs
    assert propose_ngram([7, 8, 7], 3, 1, 1) == [8, 7]  # proposals stop at the sequence's end
    assert propose_ngram([7, 8, 7], 3, 2, 3) == []  # no recurring bigram
    assert propose_ngram([4, 4], 0, 1, 3) == []
    assert accepted_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and accepted_prefix([1], [2, 3]) == 0


@pytest.mark.parametrize("bad,field", [
    (dict(num_speculative_tokens=-1), "num_speculative_tokens"),
    (dict(num_speculative_tokens=8), "num_speculative_tokens"),
    (dict(num_speculative_tokens=True), "num_speculative_tokens"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
    (dict(prompt_lookup_min=0), "prompt_lookup_min"),
    (dict(prompt_lookup_max=-1), "prompt_lookup_max"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_batch=-2), "max_batch"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching"),
    (dict(enable_prefix_caching=True, num_pages=1), "num_pages"),
    (dict(num_pages=0), "num_pages"),
    (dict(page_size=0), "page_size"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**bad)


def test_cli_flags_reach_the_config():
    import argparse

    from kvslim.cli.engine_args import add_engine_args, add_model_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_engine_args(p)
    cfg = engine_config_from_args(p.parse_args([]))
    assert cfg.enable_prefix_caching and cfg.num_speculative_tokens == 0
    cfg = engine_config_from_args(p.parse_args(["--no-prefix-caching", "--num-speculative-tokens", "5",
                                                "--prompt-lookup-min", "2", "--prompt-lookup-max", "4"]))
    assert not cfg.enable_prefix_caching and cfg.num_speculative_tokens == 5
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (2, 4)
    assert engine_config_from_args(p.parse_args(["--enable-prefix-caching"])).enable_prefix_caching


def test_tp2_prefix_caching_and_speculation_match_tp1():
    from kvslim.engine.tp import TPSession

    prompts = _shared_prompts(seed=5)[:5] + _repetitive_prompts(seed=5)[:2]
    with TPSession(2) as tp:
        for preset in ("gla-2", "mla"):
            src = ModelSource(preset=preset, shape="tiny", seed=0)
            ref = src.build().generate(prompts, max_new_tokens=8)
            shard = tp.load(src)
            # tight pool: preemption, eviction and speculation page changes all mirrored by the follower
            eng = LLMEngine(shard, EngineConfig(num_pages=20, page_size=4, max_batch=8, max_num_batched_tokens=16,
                                                num_speculative_tokens=3), tp=tp)
            out = eng.generate(prompts, SamplingParams(max_tokens=8), arrival_steps=ARRIVALS)
            assert out == ref, preset
            s = eng.stats()
            assert s["prefix_hit_tokens"] > 0 and s["spec_accepted_tokens"] > 0
            assert eng.allocator.num_free == eng.allocator.num_usable
