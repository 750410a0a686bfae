"""Fused projections (one GEMM for q/k/v or q + latent down-projection, one for gate+up) compute
exactly what the separate layers compute, keep the state dict, and undo themselves when the
model is moved or cast after fusing."""

from __future__ import annotations

import pytest
import torch

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine, SamplingParams
from kvslim.engine.source import random_model
from kvslim.layers import fuse_linears, linears

KINDS = ["mha", "mqa", "gqa-2", "gta-2", "mla", "gla-2"]


@pytest.mark.parametrize("preset", KINDS)
def test_fused_forward_equals_separate(preset):
    model = random_model(preset, "tiny", seed=3)
    with torch.no_grad():  # biases and norms away from their init values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 97, (2, 11))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(tokens)
    model.fuse_projections()
    assert all(m.__dict__.get("_fused") for m in (model.model.layers[0].self_attn, model.model.layers[0].mlp))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model(tokens), ref, rtol=1e-5, atol=1e-5)
    # cast after fusing: the stale fusion is dropped, the layers' own (cast) weights are used
    model.double()
    out = model(tokens)
    assert not model.model.layers[0].mlp.__dict__["_fused"]
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


def test_fused_weights_stay_in_sync():
    lin = [torch.nn.Linear(8, n) for n in (3, 5)]
    holder = torch.nn.Module()
    holder.a, holder.b = lin
    fuse_linears(holder, ("a", "b"))
    with torch.no_grad():
        holder.b.weight.mul_(2.0)  # in-place update of one layer reaches the fused GEMM
    x = torch.randn(4, 8)
    ya, yb = linears(holder, ("a", "b"), x)
    torch.testing.assert_close(yb, holder.b(x))
    torch.testing.assert_close(ya, holder.a(x))


def test_fuse_refuses_mixed_bias():
    holder = torch.nn.Module()
    holder.a, holder.b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3, bias=False)
    with pytest.raises(ValueError, match="bias"):
        fuse_linears(holder, ("a", "b"))


@pytest.mark.parametrize("preset", ["gqa-2", "mla"])
def test_engine_fused_equals_unfused(preset):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 1, 5]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = []
    for fuse in (False, True):
        model = random_model(preset, "tiny", seed=1)
        cfg = EngineConfig(num_pages=32, page_size=4, max_batch=4, max_model_len=64, device="cpu",
                           fuse_projections=fuse)
        outs.append(LLMEngine(model, cfg).generate(prompts, params))
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="fuse_projections"):
        EngineConfig(fuse_projections="yes")
