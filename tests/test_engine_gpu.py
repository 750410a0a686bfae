"""Engine features on a real GPU (skipped without CUDA): compiled decode, prefix caching and n-gram
speculation give the same greedy tokens as the plain engine, with CUDA graphs, bf16."""

from __future__ import annotations

import pytest
import torch

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
    cfg = EngineConfig(num_pages=256, page_size=16, max_batch=8, max_model_len=512, device="cuda",
                       graph_batches=(1, 2, 4, 8), **kw)
    eng = LLMEngine(model, cfg)
    return eng.generate(prompts(), SamplingParams(max_tokens=24, ignore_eos=True)), eng.stats()


@pytest.mark.parametrize("preset", ["gqa-2", "gta-2", "mla", "gla-2"])
@pytest.mark.parametrize("dtype", [torch.float32])  # bf16: not exact (2026-12-03 H200: gqa-2 differed)
def test_engine_features_same_tokens(preset, dtype):
    model = random_model(preset, "tiny", device="cuda").to(dtype)
    base, _ = run(model, enable_prefix_caching=False)
    comp, _ = run(model, enable_prefix_caching=False, compile=True)
    assert comp == base
    cached, st = run(model, enable_prefix_caching=True)
    assert cached == base
    if dtype == torch.float32:  # q_len > 1 verify vs q_len = 1 decode: exact argmax only in fp32
        spec, st = run(model, enable_prefix_caching=False, num_speculative_tokens=4)
        assert spec == base
