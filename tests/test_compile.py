"""torch.compile of the engine's decode step and prefill forwards: the kernels as custom ops
(kvslim.kernels.ops), same tokens."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine, SamplingParams
from kvslim.kernels import ops
from kvslim.rows import RowFormat
from kvslim.testing import tiny_model, tiny_spec

# budget 16: the 30-token prompt is prefilled in two chunks, the second (> 8 tokens) over the history of the
# first (latent attention: expanded K/V + SDPA; separate K/V: the prefill kernel, its custom op when compiled)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], list(range(3, 33))]


# the latent fp8 case runs the long prompt alone: every prefill shape (batch 1 vs more, fresh vs history) is
# another compiled graph, and each costs 20-30 s of cold Inductor compile on the CI machine
@pytest.mark.parametrize("preset,kv,prompts,unit", [("gqa-2", None, PROMPTS, "layer"), ("gla-2", "fp8", PROMPTS[2:], "layer"),
                                                     ("mla", None, PROMPTS[2:], "model")])
def test_compiled_decode_matches_eager(preset, kv, prompts, unit):
    model = tiny_model(tiny_spec(preset), layers=2)
    model.set_attention_options(impl="triton")  # the custom-op path (Triton interpreter on CPU)
    out = {}
    for comp in (False, True):
        counters.clear()
        cfg = EngineConfig(num_pages=64, page_size=4, max_batch=4, max_model_len=64, compile=comp, device="cpu",
                           kv_dtype=kv, max_num_batched_tokens=16, prefill_compile=unit)
        eng = LLMEngine(model, cfg)
        assert eng.runner.compiled is comp
        out[comp] = eng.generate(prompts, SamplingParams(max_tokens=6))
    assert out[True] == out[False]
    # one graph per forward: a break splits the model into per-layer graphs with Python between them (a
    # break in LayerCache.write did so on CUDA: 114 ms of host time per prefill step against 45 ms on the GPU)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_ops_schema_and_fake():
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 16)
    cache = torch.randn(6, 4, 2 * 2 * 16)
    bt = torch.arange(6, dtype=torch.int32).view(2, 3)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    torch.library.opcheck(ops.decode_separate_op, (q, cache, bt, lens, 2, 16, 0.25, 0, []),
                          test_utils=("test_schema", "test_faketensor"))
    qt = torch.randn(2, 1, 4, 24)
    tc = torch.randn(6, 4, 2 * 16 + 8)
    torch.library.opcheck(ops.decode_tied_op, (qt, tc, bt, lens, 2, 16, 16, 8, 16, 0.2, 0, []),
                          test_utils=("test_schema", "test_faketensor"))
    qp = torch.randn(2, 5, 4, 16)
    torch.library.opcheck(ops.prefill_separate_op, (qp, cache, bt, lens, 2, 16, 0.25, []),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.prefill_tied_op, (torch.randn(2, 5, 4, 24), tc, bt, lens, 2, 16, 16, 8, 16, 0.2, []),
                          test_utils=("test_schema", "test_faketensor"))
    # token-major [B, T, H, d] in and out, as the attention layer holds them; q a strided view (a slice of a
    # fused projection) as in the model
    qs = torch.randn(2, 5, 4, 24)[..., :16]
    ks, vs = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 4, 8)
    torch.library.opcheck(ops.sdpa_lower_right_op, (qs, ks, vs, 0.25), test_utils=("test_schema", "test_faketensor"))
    # the real output has the fake's strides (Inductor asserts them at run time; on CUDA the flash backend keeps
    # the query's layout, which no CPU test sees, so the op promises and returns contiguous)
    got = ops.sdpa_lower_right_op(qs, ks, vs, 0.25)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake:
        want_meta = ops.sdpa_lower_right_op(fake.from_tensor(qs), fake.from_tensor(ks), fake.from_tensor(vs), 0.25)
    assert got.shape == want_meta.shape and got.stride() == want_meta.stride() and got.is_contiguous()
    # lower right: the last query sees every key, the first only the history before the chunk and itself
    want = torch.nn.functional.scaled_dot_product_attention(
        qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
        attn_mask=torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(got, want)


def test_fmt_args_roundtrip():
    fmt = RowFormat("fp8", 40, quant=32, plain=8, tile=16)
    assert ops._fmt(ops.fmt_args(fmt)) == fmt
    assert ops.fmt_args(None) == [] and ops.fmt_args(RowFormat("bf16", 40)) == []


def test_compile_flag_validated():
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile="yes")


def test_compile_default_follows_the_device():
    """compile=None (the default) compiles on CUDA only: a CPU engine runs eagerly."""
    cfg = EngineConfig(num_pages=16, page_size=4, max_batch=2, max_model_len=32, device="cpu")
    assert cfg.compile is None
    eng = LLMEngine(tiny_model(tiny_spec("gqa-2"), layers=1), cfg)
    assert eng.runner.compiled is False


def test_prefill_guards_and_recompile_limit():
    """What the compiled prefill sees: Dynamo's recompile limit raised around the call (several runners share
    one code object), history only for chunks longer than MAX_Q_LEN, block tables at least two columns wide."""
    from kvslim.engine.runner import RECOMPILE_LIMIT
    from kvslim.kernels import MAX_Q_LEN

    model = tiny_model(tiny_spec("mla"), layers=1)
    eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=4, max_model_len=64, device="cpu"))
    runner, seen = eng.runner, []
    runner.compiled = True  # the limit is raised around compiled calls only (the spy below stands in for one)
    run = runner._prefill_fn

    def spy(tokens, start, block_table, every_position, history):
        seen.append((torch._dynamo.config.recompile_limit, tuple(block_table.shape), history))
        return run(tokens, start, block_table, every_position, history)

    runner._prefill_fn = spy
    assert torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT  # only raised around the call
    runner.prefill([[1, 2, 3]], [0], [[0]])  # short first chunk: no history, table padded to 2 columns
    runner.prefill([list(range(1, MAX_Q_LEN + 2))] * 2, [0, 0], [[1, 2, 3], [4, 5, 6]])  # long, fresh
    runner.prefill([list(range(1, MAX_Q_LEN + 2))] * 2, [0, 4], [[1, 2, 3], [4, 5, 6, 7]])  # unequal starts
    assert seen == [(RECOMPILE_LIMIT, (1, 2), None), (RECOMPILE_LIMIT, (2, 3), 0), (RECOMPILE_LIMIT, (2, 4), None)]
    assert torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT


@pytest.mark.parametrize("unit", ["layer", "model"])
def test_prefill_compile_unit_and_depth(monkeypatch, unit):
    """``prefill_compile="layer"`` traces one decoder layer, whatever the depth (every layer, weights and pool
    as inputs, reuses it), so a prefill guard set's compile does not grow with the model; ``"model"`` traces
    all of them. Same logits as eager either way (the eager backend: Dynamo's tracing, not Inductor's time)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    captured, graphs = {}, {}
    for layers in (1, 3):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model(tiny_spec("mla"), layers=layers)
        model.set_attention_options(impl="triton")
        logits = {}
        for comp in (False, True):
            eng = LLMEngine(model, EngineConfig(num_pages=64, page_size=4, max_batch=4, max_model_len=64, compile=comp,
                                                device="cpu", prefill_compile=unit))
            chunks, pages = [list(range(1, 13))] * 2, [[1, 2, 3], [4, 5, 6]]
            logits[comp] = eng.runner.prefill(chunks, [0, 0], pages)
        torch.testing.assert_close(logits[True], logits[False])
        captured[layers], graphs[layers] = counters["stats"]["calls_captured"], counters["stats"]["unique_graphs"]
    assert graphs == {1: 1, 3: 1}
    if unit == "layer":
        assert captured[3] == captured[1]
    else:
        assert captured[3] > 2 * captured[1]


def test_prefill_compile_bad_value():
    with pytest.raises(ValueError, match="prefill_compile"):
        EngineConfig(prefill_compile="block")
