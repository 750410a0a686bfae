"""Engine features on a real GPU (skipped without CUDA): overlapped decode, compiled decode, fused
projections, prefix caching and n-gram speculation give the same greedy tokens as the plain engine,
with CUDA graphs.

fp32: identical tokens. bf16: every feature changes rounding (Inductor keeps fused elementwise
chains in fp32; a cached prefix is attended from the pool instead of the prefill's SDPA), so
greedy paths may part at a near-tie; the test then checks, with an fp32 forward of the same
weights, that the two tokens at the first divergence are within bf16 noise of each other.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine, SamplingParams
from kvslim.engine.source import random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHARED = list(range(5, 69))  # a 64-token shared prefix (4 pages of 16)


def prompts():
    g = torch.Generator().manual_seed(0)
    out = [SHARED + torch.randint(0, 90, (n,), generator=g).tolist() for n in (3, 17, 40, 1)]
    out.append([7, 8, 9, 10] * 12)  # repetitive: n-gram proposals get accepted
    return out


def run(model, **kw):
    kw.setdefault("compile", False)  # the plain engine; compiled runs ask for it (the default on CUDA)
    cfg = EngineConfig(num_pages=256, page_size=16, max_batch=8, max_model_len=512, device="cuda",
                       graph_batches=(1, 2, 4, 8), **kw)
    eng = LLMEngine(model, cfg)
    return eng.generate(prompts(), SamplingParams(max_tokens=24, ignore_eos=True)), eng.stats()


def near_tie_gaps(model32, got, want) -> list[float]:
    """For each output pair that differs: the fp32 logit gap between the two tokens at the first
    divergence, in units of that position's logit standard deviation."""
    gaps = []
    for p, a, b in zip(prompts(), got, want):
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            continue
        ctx = torch.tensor([p + b[:i]], device="cuda")
        with torch.no_grad():
            logits = model32(ctx)[0, -1].float()
        gaps.append(float((logits[b[i]] - logits[a[i]]).abs() / logits.std()))
    return gaps


def same_or_near_tie(model32, got, want, dtype, what):
    if dtype == torch.float32:
        assert got == want, what
        return
    gaps = near_tie_gaps(model32, got, want)
    print(f"{what}: {len(gaps)} of {len(want)} outputs part; fp32 gaps (logit std) {[round(g, 4) for g in gaps]}")
    assert all(g < 0.05 for g in gaps), f"{what}: divergence at a non-tie: gaps {gaps}"


@pytest.mark.parametrize("preset", ["gqa-2", "gta-2", "mla", "gla-2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_features_same_tokens(preset, dtype):
    model32 = random_model(preset, "tiny", device="cuda")
    model = random_model(preset, "tiny", device="cuda").to(dtype)
    base, st = run(model, enable_prefix_caching=False, fuse_projections=False)
    assert st["overlap_steps"] > 0  # greedy decode ran overlapped, through the graphs
    sync, st = run(model, enable_prefix_caching=False, fuse_projections=False, overlap=False)
    assert st["overlap_steps"] == 0
    same_or_near_tie(model32, base, sync, dtype, f"{preset} overlap")
    model = random_model(preset, "tiny", device="cuda").to(dtype)  # unfused copy for the next runs
    fused, _ = run(model, enable_prefix_caching=False, fuse_projections=True)
    same_or_near_tie(model32, fused, base, dtype, f"{preset} fused")
    counters.clear()
    comp, _ = run(model, enable_prefix_caching=False, compile=True)  # the model stays fused
    same_or_near_tie(model32, comp, base, dtype, f"{preset} compiled")
    # one graph per compiled forward on CUDA too (CUDA-only code paths can break it where CPU CI cannot see)
    assert not counters["graph_break"], dict(counters["graph_break"])
    cached, st = run(model, enable_prefix_caching=True)
    same_or_near_tie(model32, cached, fused, dtype, f"{preset} prefix cache")
    if dtype == torch.float32:  # q_len > 1 verify vs q_len = 1 decode: exact argmax only in fp32
        spec, st = run(model, enable_prefix_caching=False, num_speculative_tokens=4)
        assert spec == fused


def test_lone_sequence_replays_the_batch_two_graph():
    """The default graph batches start at 2 (no batch-1 compile): one sequence decodes through the batch-2
    graph with a padded row and gives model.generate's tokens."""
    from kvslim.engine.config import DEFAULT_GRAPH_BATCHES

    assert 1 not in DEFAULT_GRAPH_BATCHES
    model = random_model("mla", "tiny", device="cuda")
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=16, max_batch=8, max_model_len=256, device="cuda"))
    assert eng.runner.use_graphs and min(eng.runner.graphs) == 2
    prompt = prompts()[1]
    out = eng.generate([prompt], SamplingParams(max_tokens=16))
    assert eng.stats()["overlap_steps"] > 0  # decoded through the graphs
    assert out == model.generate([prompt], max_new_tokens=16)
