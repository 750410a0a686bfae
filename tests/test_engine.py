"""Engine: continuous batching == model.generate, preemption, sampling, validation, pool sizing, TP=2."""

import pytest
import torch

from kvslim.engine.allocator import BlockAllocator, OutOfPages, num_pages_for_memory
from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams
from kvslim.engine.source import ModelSource
from kvslim.spec import AttentionSpec
from kvslim.testing import tiny_model, tiny_spec

KINDS = ("gqa-2", "gta-2", "mla", "gla-2")
LENS = (3, 17, 9, 30, 1, 12)
ARRIVALS = [0, 0, 2, 3, 5, 9]


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(seed=1, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENS]


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
@pytest.mark.parametrize("kind", KINDS + ("mha", "mqa"))
def test_engine_matches_generate_with_ragged_arrivals(kind, kv_dtype):
    """Engine == model.generate (greedy), also over a packed fp8 cache (the reference forward
    then reads the same quantized rows: prefill attends to what decode will read back)."""
    model = tiny_model(tiny_spec(kind))
    prompts = _prompts()
    ref = model.generate(prompts, max_new_tokens=10, kv_dtype=kv_dtype)
    # budget 16 < the 30-token prompt: chunked prefill over several steps, mixed with decodes
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=16,
                                        kv_dtype=kv_dtype))
    if kv_dtype == "fp8":
        assert eng.runner.pools[0].dtype == torch.uint8
        assert eng.runner.pools[0].shape[-1] == model.spec.row_format("fp8").row_bytes
        assert eng.stats()["kv_dtype"] == "fp8"
    out = eng.generate(prompts, SamplingParams(max_tokens=10), arrival_steps=ARRIVALS)
    assert out == ref
    assert eng.stats()["preemptions"] == 0
    assert eng.allocator.num_free == eng.allocator.num_usable


@pytest.mark.parametrize("kind,kv_dtype", [("gqa-2", None), ("gla-2", None), ("mla", None), ("gta-2", "fp8"),
                                           ("mla", "fp8")])
def test_preemption_by_recompute_keeps_outputs(kind, kv_dtype):
    model = tiny_model(tiny_spec(kind))
    prompts = _prompts(seed=2)
    ref = model.generate(prompts, max_new_tokens=12, kv_dtype=kv_dtype)
    # 11 usable pages x 4 tokens: the 6 sequences (up to 42 tokens) cannot all fit
    eng = LLMEngine(model, EngineConfig(num_pages=12, page_size=4, max_batch=8, max_num_batched_tokens=16,
                                        kv_dtype=kv_dtype))
    out = eng.generate(prompts, SamplingParams(max_tokens=12), arrival_steps=ARRIVALS)
    assert eng.stats()["preemptions"] > 0
    assert out == ref
    assert eng.allocator.num_free == eng.allocator.num_usable


def test_max_batch_limits_running_and_keeps_fifo():
    model = tiny_model(tiny_spec("gqa-2"))
    prompts = _prompts(seed=3)
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=2, max_num_batched_tokens=64))
    seqs = [eng.add_request(p, SamplingParams(max_tokens=4)) for p in prompts]
    first_token_order = []
    while eng.has_unfinished():
        assert len(eng.scheduler.running) <= 2
        for s in eng.step():
            if len(s.output) == 1:
                first_token_order.append(seqs.index(s))
    assert first_token_order == sorted(first_token_order)  # FIFO: served in arrival order
    assert [s.output for s in seqs] == model.generate(prompts, max_new_tokens=4)


def test_seeded_sampling_is_independent_of_batching():
    model = tiny_model(tiny_spec("gla-2"))
    prompts = _prompts(seed=4)
    p = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=123)
    alone = LLMEngine(model, EngineConfig(num_pages=64, page_size=4)).generate([prompts[1]], p)[0]
    batched = LLMEngine(model, EngineConfig(num_pages=64, page_size=4)).generate(prompts, p, arrival_steps=ARRIVALS)[1]
    assert alone == batched
    other = LLMEngine(model, EngineConfig(num_pages=64, page_size=4)).generate(
        [prompts[1]], SamplingParams(max_tokens=8, temperature=1.0, seed=7))[0]
    assert other != alone


def test_stop_tokens_eos_and_max_tokens():
    model = tiny_model(tiny_spec("gta-2"))
    prompt = _prompts()[3]
    free_run = model.generate([prompt], max_new_tokens=10)[0]
    stop = free_run[4]
    first = free_run.index(stop)
    eng = LLMEngine(model, EngineConfig(num_pages=32, page_size=4), eos_token_id=stop)
    assert eng.generate([prompt], SamplingParams(max_tokens=10))[0] == free_run[: first + 1]
    assert eng.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0] == free_run
    eng = LLMEngine(model, EngineConfig(num_pages=32, page_size=4))
    s = eng.add_request(prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop,)))
    while eng.has_unfinished():
        eng.step()
    assert s.output == free_run[: first + 1] and s.finish_reason == "stop"
    s = eng.add_request(prompt, SamplingParams(max_tokens=3))
    while eng.has_unfinished():
        eng.step()
    assert s.output == free_run[:3] and s.finish_reason == "length"


def test_bad_requests_raise_clear_errors():
    model = tiny_model(tiny_spec("mla"))
    eng = LLMEngine(model, EngineConfig(num_pages=9, page_size=4))  # 32 tokens of capacity
    assert eng.max_model_len == 32
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        eng.add_request(list(range(30)), SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="non-empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        eng.add_request([1, 200], SamplingParams())
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=1.5), dict(top_k=-2),
                dict(seed="x"), dict(stop_token_ids=(-1,)), dict(max_tokens=True)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert eng.allocator.num_free == eng.allocator.num_usable


def test_abort_frees_pages_mid_generation():
    model = tiny_model(tiny_spec("gqa-2"))
    eng = LLMEngine(model, EngineConfig(num_pages=32, page_size=4))
    seqs = [eng.add_request(p, SamplingParams(max_tokens=20)) for p in _prompts()]
    eng.step()
    eng.step()
    assert eng.allocator.num_free < eng.allocator.num_usable
    for s in seqs:
        eng.abort(s.request_id)
    assert not eng.has_unfinished()
    assert eng.allocator.num_free == eng.allocator.num_usable
    assert all(s.finish_reason == "abort" for s in seqs)


def test_allocator_errors():
    a = BlockAllocator(5, 4)
    assert a.num_usable == 4 and a.pages_for(9) == 3
    pages = a.allocate(3)
    assert 0 not in pages  # the scratch page is never handed out
    with pytest.raises(OutOfPages):
        a.allocate(2)
    a.free(pages)
    with pytest.raises(ValueError, match="double free"):
        a.free(pages[:1])
    with pytest.raises(ValueError):
        BlockAllocator(1, 4)


def test_fp8_pool_holds_more_pages_per_byte():
    """Pool sizing reads the packed row: MLA 656 B vs 1152 B per token per layer."""
    gib = 2**30
    spec = AttentionSpec.preset("mla")
    n16 = num_pages_for_memory(spec, 24, gib, page_size=16, dtype=torch.bfloat16)
    n8 = num_pages_for_memory(spec, 24, gib, page_size=16, dtype="fp8")
    assert n8 == gib // (24 * 16 * 656) and n16 == gib // (24 * 16 * 1152)
    with pytest.raises(ValueError, match="kv dtype"):
        EngineConfig(num_pages=8, kv_dtype="int4")


def test_pool_sizing_follows_bytes_per_token():
    gib = 2**30
    kw = dict(page_size=16, dtype=torch.bfloat16)
    n = {(name, tp): num_pages_for_memory(AttentionSpec.preset(name), 24, gib, tp_size=tp, **kw)
         for name, tp in (("gqa-4", 1), ("gla-2", 1), ("mla", 2), ("gla-2", 2))}
    # seed 000 table: GQA-4 2048 B, GLA-2 1152 B at TP=1; at TP=2 GLA-2 640 B, MLA 1152 B
    assert n["gqa-4", 1] == gib // (24 * 16 * 2048)
    assert n["gla-2", 1] == gib // (24 * 16 * 1152)
    assert n["mla", 2] == gib // (24 * 16 * 1152)
    assert n["gla-2", 2] == gib // (24 * 16 * 640)


def test_tp2_gloo_matches_tp1():
    from kvslim.engine.tp import TPSession

    prompts = _prompts(seed=5)
    with TPSession(2) as tp:
        for preset in ("gla-2", "mla", "gta-2"):
            src = ModelSource(preset=preset, shape="tiny", seed=0)
            ref = src.build().generate(prompts, max_new_tokens=8)
            shard = tp.load(src)
            # tight pool: preemption and recompute also run under TP
            eng = LLMEngine(shard, EngineConfig(num_pages=16, page_size=4, max_batch=8, max_num_batched_tokens=16), tp=tp)
            assert eng.runner.row_dim == shard.model.layers[0].self_attn.local.row_dim
            out = eng.generate(prompts, SamplingParams(max_tokens=8), arrival_steps=ARRIVALS)
            assert out == ref, preset
            assert eng.allocator.num_free == eng.allocator.num_usable


def test_paper_shape_shards_like_the_paper():
    from kvslim.engine.source import SHAPES

    sh = SHAPES["paper"]
    spec = lambda p: AttentionSpec.preset(p, num_heads=sh["heads"], head_dim=sh["head_dim"],  # noqa: E731
                                          hidden_size=sh["hidden"])
    # GLA-8 on 8 ranks: one 256+64 latent head per rank, no duplication; MLA replicates its 512+64
    assert spec("gla-8").shard(8).row_dim == 320 and spec("gla-8").duplication(8) == 1
    assert spec("mla").shard(8).row_dim == 576 and spec("mla").duplication(8) == 8
    assert spec("gla-4").shard(4).row_dim == 320 and spec("mla").shard(4).row_dim == 576


@pytest.mark.parametrize("tp,presets", [(4, ("gla-4", "mla", "gta-4")), (8, ("gla-8", "mla"))])
def test_tp4_tp8_gloo_match_tp1(tp, presets):
    """The paper-scale layouts (GLA-8 on 8 ranks, MLA replicated on 4/8) checked for exactness on CPU."""
    from kvslim.engine.tp import TPSession

    prompts = _prompts(seed=7)
    with TPSession(tp) as session:
        for preset in presets:
            src = ModelSource(preset=preset, shape="tiny16", seed=0)
            ref = src.build().generate(prompts, max_new_tokens=6)
            shard = session.load(src)
            local = shard.model.layers[0].self_attn.local
            full = src.build().config.attention
            if preset.startswith("gla"):  # one latent head (or h_c / tp) per rank: the cache splits
                assert local.row_dim < full.row_dim
            eng = LLMEngine(shard, EngineConfig(num_pages=32, page_size=4, max_batch=8, max_num_batched_tokens=16), tp=session)
            out = eng.generate(prompts, SamplingParams(max_tokens=6), arrival_steps=ARRIVALS)
            assert out == ref, (tp, preset)
            assert eng.allocator.num_free == eng.allocator.num_usable


@pytest.mark.parametrize("kind", ("gqa-2", "mla"))
def test_equal_length_prefill_chunks_share_one_forward(kind):
    model = tiny_model(tiny_spec(kind))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (60, 20, 20, 20, 6, 6)]
    ref = model.generate(prompts, max_new_tokens=6)
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=40))
    calls = []
    orig = eng.runner.prefill
    eng.runner.prefill = lambda chunks, starts, pages: calls.append((len(chunks[0]), list(starts))) or orig(
        chunks, starts, pages)
    out = eng.generate(prompts, SamplingParams(max_tokens=6), arrival_steps=[0, 1, 1, 1, 3, 3])
    assert out == ref
    assert (20, [40, 0]) in calls  # a continued chunk and a fresh prompt in one forward (masked SDPA path)
    assert any(len(s) >= 2 and not any(s) for _, s in calls)  # fresh prompts batched (causal SDPA path)


def test_engine_bench_driver_counts_every_token():
    from kvslim.engine.bench import run_engine_bench

    model = tiny_model(tiny_spec("gla-2"))
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=4, max_num_batched_tokens=32))
    s = run_engine_bench(eng, num_requests=6, concurrency=3, input_len=9, output_len=5, seed=1)
    assert s["completed"] == 6 and s["num_errors"] == 0 and not s["timed_out"]
    assert s["output_tokens"] == 6 * 5 and s["prompt_tokens"] == 6 * 9
    assert s["output_throughput"] == pytest.approx(s["output_tokens"] / s["wall_s"])
    assert len(s["_raw"]["ttft"]) == 6 and len(s["_raw"]["itl"]) == 6 * 4  # one gap per token after the first
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        assert all(0 < s[key][q] < 60 for q in ("mean", "p50", "p99")), key
    assert s["ttft_s"]["p50"] <= s["e2e_s"]["p50"]
    # closed loop: at most 3 in flight, so every decode batch has <= 3 rows and some have 3
    assert 0 < s["mean_decode_batch"] <= 3 and s["decode_steps"] >= 5
    assert s["decode_step_ms"] > 0 and s["prefill_s"] > 0 and s["steps"] == eng.counters["steps"]
    assert eng.allocator.num_free == eng.allocator.num_usable and not eng.has_unfinished()
    # a deadline already past: the requests in flight are aborted, nothing leaks
    s = run_engine_bench(eng, num_requests=4, concurrency=2, input_len=9, output_len=5, deadline=0.0)
    assert s["timed_out"] and s["completed"] < 4
    assert eng.allocator.num_free == eng.allocator.num_usable and not eng.has_unfinished()


def test_decode_block_table_rows_hold_each_sequences_pages():
    # tight pool: preemptions free slots and pages, readmissions reuse them (rows must be cleared)
    model = tiny_model(tiny_spec("gqa-2"))
    prompts = _prompts(seed=2)
    eng = LLMEngine(model, EngineConfig(num_pages=12, page_size=4, max_batch=8, max_num_batched_tokens=16))
    sent = full = 0
    orig = eng.runner.decode

    def decode(toks, starts, slots, updates=(), src=None):
        nonlocal sent, full
        logits = orig(toks, starts, slots, updates, src=src)
        by_slot = {s.slot: s for s in eng.scheduler.running}
        for slot in slots:
            s = by_slot[slot]
            row = eng.runner.table[slot].tolist()
            assert row[: len(s.pages)] == s.pages and not any(row[len(s.pages):]), (slot, row, s.pages)
        sent += sum(len(p) for _, _, p in updates)
        full += sum(len(by_slot[slot].pages) for slot in slots)
        return logits

    eng.runner.decode = decode
    out = eng.generate(prompts, SamplingParams(max_tokens=12), arrival_steps=ARRIVALS)
    assert out == model.generate(prompts, max_new_tokens=12)
    assert eng.stats()["preemptions"] > 0
    assert 0 < sent < full / 2  # only new pages travel, not every row every step
    assert not any(eng.runner.table[-1].tolist())  # the scratch row stays on page 0


@pytest.mark.parametrize("preset,want", [("gqa-2", 16), ("gta-2", 16), ("mla", 64), ("gla-2", 64)])
def test_default_page_size_by_cache_kind(preset, want):
    """page_size=None: 64 for latent caches, 16 for the others (engine_roofline measurements); an
    explicit size wins."""
    from kvslim.engine.config import default_page_size

    model = tiny_model(tiny_spec(preset), layers=1)
    assert default_page_size(model.spec) == want
    eng = LLMEngine(model, EngineConfig(num_pages=8, max_batch=2, device="cpu"))
    assert eng.allocator.page_size == want
    eng = LLMEngine(model, EngineConfig(num_pages=8, page_size=8, max_batch=2, device="cpu"))
    assert eng.allocator.page_size == 8



def test_a_step_samples_its_forwards_once_at_the_end():
    """Decode and several prefill forwards of one step: every forward is launched before the one sampling
    (one ``tolist``, one host sync per step), with the same tokens as ``generate``; chunks that do not finish
    their prompt are left out of the sampled rows."""
    model = tiny_model(tiny_spec("gqa-2"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 37, 9, 9, 23)]
    ref = model.generate(prompts, max_new_tokens=5)
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=8, max_num_batched_tokens=24,
                                        overlap=False))
    log = []
    run, prefill, decode, sample = eng.step, eng.runner.prefill, eng.runner.decode, eng._sample
    eng.step = lambda: log.append("step") or run()
    eng.runner.prefill = lambda *a: log.append("forward") or prefill(*a)
    eng.runner.decode = lambda *a, **k: log.append("forward") or decode(*a, **k)
    eng._sample = lambda seqs, logits: log.append(("sample", len(seqs), logits.shape[0])) or sample(seqs, logits)
    out = eng.generate(prompts, SamplingParams(max_tokens=5), arrival_steps=[0, 0, 1, 1, 2])
    assert out == ref
    steps, cur = [], None
    for e in log:
        if e == "step":
            cur = []
            steps.append(cur)
        else:
            cur.append(e)
    assert any(s.count("forward") >= 2 for s in steps), steps  # steps with several forwards happen
    for s in steps:
        samples = [e for e in s if e != "forward"]
        assert len(samples) <= 1, s
        if samples:
            assert s[-1] == samples[0], s  # sampled after the step's last forward
            assert samples[0][1] == samples[0][2], s  # one logits row per sampled sequence
