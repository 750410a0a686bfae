"""Per-layer latent ranks (issue 16): the allocation, the model / cache / engine / planner that hold
them, the conversion that makes them (in memory == streaming), and bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from kvslim.checkpoint import STAMP
from kvslim.cli import main
from kvslim.convert import convert_checkpoint, convert_model
from kvslim.convert.ranks import RANK_STEP, allocate_ranks, fit_error
from kvslim.engine.allocator import page_bytes
from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams
from kvslim.engine.tp import shard_model
from kvslim.model import ModelConfig, Transformer
from kvslim.plan import plan
from kvslim.testing import assert_close, tiny_model, tiny_spec

RANKS = [16, 40, 24]  # per-layer latent dims of the tiny models below (not powers of two on purpose)


def _spectra(seed: int, layers: int, heads: int = 1, n: int = 112) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        scale = float(torch.rand(1, generator=g)) * 10
        out.append([(torch.rand(n, generator=g, dtype=torch.float64) * scale).sort(descending=True).values
                    for _ in range(heads)])
    return out


@pytest.mark.parametrize("layers,budget,rank_min,heads,cap", [(7, 16, 16, 1, 117), (7, 48, 16, 1, 117),
                                                              (7, 64, 32, 2, 117), (5, 112, 16, 1, 117),
                                                              (30, 128, 16, 1, 320)])
def test_allocation_spends_the_budget_exactly_in_steps(layers, budget, rank_min, heads, cap):
    spectra = _spectra(layers + budget, layers, heads, n=cap)
    ranks, rep = allocate_ranks(spectra, budget=budget, rank_min=rank_min, cap=cap)  # 117 -> 112 in steps
    assert sum(ranks) == layers * budget
    assert all(r % RANK_STEP == 0 and rank_min <= r <= cap // 16 * 16 for r in ranks)
    assert rep["objective"] <= rep["objective_uniform"] + 1e-12
    assert rep["objective"] == pytest.approx(sum(fit_error(s, r) for s, r in zip(spectra, ranks)))


def test_greedy_allocation_is_the_optimum():
    """Sorted spectra make each layer's error convex in the rank, so greedy = exhaustive search."""
    for seed in range(5):
        spectra = _spectra(seed, 4, n=96)
        ranks, rep = allocate_ranks(spectra, budget=48, rank_min=16, cap=96)
        grid = range(16, 97, 16)
        best = min(sum(fit_error(s, r) for s, r in zip(spectra, c))
                   for c in itertools.product(grid, repeat=4) if sum(c) == 4 * 48)
        assert rep["objective"] == pytest.approx(best)


def test_allocation_follows_the_energy():
    flat = torch.linspace(1, 0.5, 112, dtype=torch.float64)
    spectra = [[flat], [10 * flat], [flat], [0.1 * flat]]
    ranks, _ = allocate_ranks(spectra, budget=48, rank_min=16, cap=112)
    assert ranks[1] == max(ranks) and ranks[3] == min(ranks) == 16 and sum(ranks) == 4 * 48


def test_relative_allocation_ignores_each_layers_scale():
    spectra = _spectra(7, 5)
    scaled = [[e * 10.0 ** (i - 2) for e in layer] for i, layer in enumerate(spectra)]
    a, rep = allocate_ranks(spectra, budget=48, rank_min=16, cap=112, relative=True)
    assert allocate_ranks(scaled, budget=48, rank_min=16, cap=112, relative=True)[0] == a
    assert allocate_ranks(scaled, budget=48, rank_min=16, cap=112)[0] != a  # energy follows the scale
    assert sum(a) == 5 * 48 and rep["objective"] <= rep["objective_uniform"]


def _gqa_source(layers: int = 3) -> Transformer:
    """GQA-2, d_h = 32: MLA with d_R = 16 can keep 112 latent dims (7 steps of 16), GLA-2 64 per head."""
    return tiny_model(tiny_spec("gqa-2", num_heads=4, head_dim=32, hidden_size=128), layers=layers)


def _moments(model):
    from kvslim.convert import attention_input_moments

    calib = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(3))
    return attention_input_moments(model, calib, progress=False)


@pytest.mark.parametrize("to,opts,full", [("mla", dict(rope_dim=16), 112), ("gla", dict(rope_dim=16, latent_heads=2), 64),
                                          ("mla", dict(rope_dim=16, fit="output"), 112)])
def test_full_rank_everywhere_is_the_uniform_conversion(to, opts, full):
    src = _gqa_source()
    mom = _moments(src)
    a, _ = convert_model(src, to, moments=mom, kv_lora_rank=full, progress=False, **opts)
    b, stats = convert_model(src, to, moments=mom, kv_lora_rank=full, rank_alloc="energy", progress=False, **opts)
    assert stats["layer_ranks"] == [full] * 3 and b.config.layer_ranks is None
    assert a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("to,opts", [("mla", dict(rope_dim=16, kv_lora_rank=48, fit="output")),
                                     ("mla", dict(rope_dim=16, kv_lora_rank=32, rank_min=32)),
                                     ("mla", dict(rope_dim=16, kv_lora_rank=48, rank_alloc="relative")),
                                     ("gla", dict(rope_dim=16, latent_heads=2, kv_lora_rank=32))])
def test_energy_conversion_keeps_the_budget_and_runs(to, opts):
    src = _gqa_source(layers=4)
    mom = _moments(src)
    opts = {"rank_alloc": "energy", **opts}
    model, stats = convert_model(src, to, moments=mom, progress=False, **opts)
    ranks = stats["layer_ranks"]
    R = opts["kv_lora_rank"]
    assert sum(ranks) == 4 * R and all(r % 16 == 0 and r >= opts.get("rank_min", 16) for r in ranks)
    assert stats["rank_alloc"]["objective"] <= stats["rank_alloc"]["objective_uniform"]
    assert [layer.self_attn.kv_b_proj.weight.shape[1] for layer in model.model.layers] == ranks
    uniform, _ = convert_model(src, to, moments=mom, progress=False,
                               **{k: v for k, v in opts.items() if k not in ("rank_min", "rank_alloc")})
    assert model.config.kv_elements_per_token() == uniform.config.kv_elements_per_token()  # equal bytes
    x = torch.randint(0, 97, (2, 12))
    assert torch.isfinite(model(x)).all()


def _prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]


@pytest.mark.parametrize("kind", ["mla", "gla-2"])
def test_per_layer_model_round_trips_and_decode_matches_prefill(kind, tmp_path):
    model = tiny_model(tiny_spec(kind), layers=3, layer_ranks=RANKS)
    assert [s.latent_dim for s in model.config.layer_specs] == RANKS and model.spec.latent_dim == 40
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["layer_ranks"] == RANKS
    back = Transformer.from_pretrained(tmp_path / "m")
    x = torch.randint(0, 97, (2, 11))
    ref = model(x)
    assert torch.equal(back(x), ref)
    back.set_attention_options(impl="triton")  # the tied kernel, under TRITON_INTERPRET on CPU
    cache = back.new_cache(2, 16, page_size=4)
    assert [p.shape[-1] for p in cache.pools] == [back.config.layer_spec(i).row_dim for i in range(3)]
    steps = [back(x[:, :5], cache)[:, -1]] + [back(x[:, t : t + 1], cache)[:, -1] for t in range(5, 11)]
    assert_close(torch.stack(steps, 1), ref[:, 4:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,kv_dtype", [("mla", None), ("gla-2", None), ("mla", "fp8")])
def test_engine_generates_like_model_generate(kind, kv_dtype):
    model = tiny_model(tiny_spec(kind), layers=3, layer_ranks=RANKS)
    prompts = _prompts()
    ref = model.generate(prompts, max_new_tokens=8, kv_dtype=kv_dtype)
    eng = LLMEngine(model, EngineConfig(num_pages=32, page_size=4, max_batch=4, max_num_batched_tokens=8,
                                        kv_dtype=kv_dtype))
    fmts = [s.row_format(kv_dtype or "fp32") for s in model.config.layer_specs]
    assert [p.shape[-1] for p in eng.runner.pools] == [f.storage_width for f in fmts]
    assert eng.stats()["kv_bytes_per_token"] == sum(f.row_bytes for f in fmts)
    assert eng.generate(prompts, SamplingParams(max_tokens=8)) == ref


def test_tensor_parallel_shards_keep_each_layers_rank():
    model = tiny_model(tiny_spec("gla-2"), layers=3, layer_ranks=RANKS)
    x, pos = torch.randn(1, 6, 64), torch.arange(6)[None]
    shards = [shard_model(model, r, 2) for r in range(2)]
    for i, layer in enumerate(model.model.layers):
        parts = [s.model.layers[i].self_attn(x, pos) for s in shards]
        assert shards[0].model.layers[i].self_attn.local.latent_dim == RANKS[i]
        assert_close(sum(parts), layer.self_attn(x, pos), atol=1e-5)


def test_planner_and_pool_sizes_sum_over_layers(tmp_path, capsys):
    spec = tiny_spec("mla")  # d_R = 8
    r = plan(spec, batch=2, context=64, num_layers=3, dtype="bf16", layer_ranks=RANKS)
    per_layer = [(rk + 8) * 2 for rk in RANKS]
    assert r.bytes_per_token_all_layers_device == sum(per_layer)
    assert r.cache_bytes_device == 2 * 64 * sum(per_layer)
    assert r.bytes_per_token == sum(per_layer) / 3 and r.layer_ranks == tuple(RANKS)
    u = plan(spec.replace(latent_dim=24), batch=2, context=64, num_layers=3)
    v = plan(spec.replace(latent_dim=24), batch=2, context=64, num_layers=3, layer_ranks=[24] * 3)
    assert dataclasses.replace(v, layer_ranks=None) == u  # one rank everywhere: the uniform plan
    fp8 = plan(spec, batch=1, context=8, num_layers=3, dtype="fp8", layer_ranks=RANKS)
    assert fp8.bytes_per_token_all_layers_device == sum(spec.replace(latent_dim=rk).row_format("fp8").row_bytes
                                                        for rk in RANKS)
    model = tiny_model(spec, layers=3, layer_ranks=RANKS)
    specs = model.config.layer_specs
    assert page_bytes(specs, 3, 4, "bf16") == 4 * sum(per_layer)
    assert model.new_cache(1, 8, dtype=torch.bfloat16).nbytes() == 8 * sum(per_layer)
    model.save_pretrained(tmp_path / "m")
    assert main(["plan", "--hf-config", str(tmp_path / "m"), "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "latent dims per layer:" in out and "16, 40, 24" in out
    assert f"KV per token, all layers, device:  {sum(per_layer)} bytes" in out
    assert main(["plan", "--kind", "mla", "--heads", "4", "--head-dim", "16", "--hidden", "64", "--rope-dim", "8",
                 "--layer-ranks", "16,40,24", "--context", "64"]) == 0
    assert f"{sum(per_layer)} bytes" in capsys.readouterr().out


def _hf_llama(path: Path, layers: int = 4) -> Path:
    """A tiny random SmolLM2-like Hugging Face Llama (GQA-3, d_h 16; MLA with d_R 8 keeps up to 88 dims)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, max_position_embeddings=128, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # layers of unequal value energy: the allocation has something to choose
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.v_proj.weight.mul_(4.0 ** (i % 3 - 1))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    return _hf_llama(tmp_path_factory.mktemp("ranks-src") / "hf")


@pytest.mark.parametrize("fit", ["bkv", "output"])
def test_streaming_energy_conversion_is_byte_identical_and_loads(hf_source, tmp_path, fit):
    calib = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    res = {}
    for stream in (False, True):
        res[stream] = convert_checkpoint(model_dir=hf_source, out=tmp_path / str(stream), to="mla", kv_lora_rank=32,
                                         rope_dim=8, fit=fit, rank_alloc="energy", calib_tokens=calib,
                                         progress=False, stream=stream)
    a, b = tmp_path / "False", tmp_path / "True"
    for f in a.iterdir():
        if f.name != STAMP:
            assert (b / f.name).read_bytes() == f.read_bytes(), f.name
    assert res[True].stats == res[False].stats and res[True].layer_ranks == res[False].layer_ranks
    ranks = json.loads((b / "config.json").read_text())["layer_ranks"]
    assert ranks == res[True].layer_ranks and sum(ranks) == 4 * 32 and len(set(ranks)) > 1  # kvslim format
    conv = Transformer.from_pretrained(b)
    src = Transformer.from_pretrained(hf_source)
    mem, _ = convert_model(src, "mla", calib=calib, kv_lora_rank=32, rope_dim=8, fit=fit, rank_alloc="energy",
                           progress=False)
    x = torch.randint(0, 97, (1, 10))
    assert torch.equal(conv(x), mem(x))


@pytest.mark.parametrize("case,match", [
    (dict(to="mla", kv_lora_rank=32, rank_alloc="greedy"), "rank_alloc must be one of"),
    (dict(to="mla", kv_lora_rank=24, rank_alloc="energy"), r"kv_lora_rank \(latent_dim\) = 24 must be a multiple of 16"),
    (dict(to="mla", kv_lora_rank=32, rank_alloc="energy", rank_min=48), "below rank_min"),
    (dict(to="mla", kv_lora_rank=32, rank_alloc="energy", rank_min=24), "rank_min must be a positive multiple"),
    (dict(to="mla", kv_lora_rank=32, rank_min=16), "rank_min=16 applies to per-layer ranks only"),
    (dict(to="mla", kv_lora_rank=96, rank_alloc="energy"), "larger than possible"),
    (dict(to="mla", kv_lora_rank=32, rank_alloc="energy", rope_dim=7), "rope"),
    (dict(to="mla", kv_lora_rank=32, rank_alloc="energy", fmt="deepseek"), "format 'deepseek'"),
    (dict(to="mla", kv_lora_rank=32, rank_alloc="energy", target="vllm"), "format 'deepseek'"),
    (dict(to="gta", rank_alloc="energy"), "applies to --to mla or gla"),
    (dict(to="gqa", kv_heads=1, rank_alloc="energy"), "applies to --to mla or gla"),
])
def test_bad_rank_options_fail_before_anything_is_written(hf_source, tmp_path, case, match):
    case = {"rope_dim": 8, **case}
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(model_dir=hf_source, out=tmp_path / "out", progress=False,
                           calib_tokens=torch.randint(0, 97, (2, 8)), **case)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".kvslim-" in p.name]


def test_cli_rank_alloc_is_checked_by_the_parser(hf_source, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--model", str(hf_source), "--to", "mla", "--kv-lora-rank", "32", "--rank-alloc", "cars",
              "--out", str(tmp_path / "o")])
    assert "--rank-alloc" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_model_config_names_bad_layer_ranks():
    mla = tiny_model(tiny_spec("mla"), layers=3).config
    with pytest.raises(ValueError, match="layer_ranks applies to mla/gla"):
        tiny_model(tiny_spec("gqa-2"), layers=3).config.with_layer_ranks([8, 16, 8])
    with pytest.raises(ValueError, match="num_layers=3"):
        mla.with_layer_ranks([8, 16])
    with pytest.raises(ValueError, match="positive ints"):
        mla.with_layer_ranks([8, 0, 8])
    with pytest.raises(ValueError, match="must be the largest layer rank"):
        ModelConfig(**{**mla.to_dict(), "layer_ranks": [8, 16, 8]})
    with pytest.raises(ValueError, match="layer_ranks"):
        plan(tiny_spec("gqa-2"), batch=1, context=8, num_layers=2, layer_ranks=[8, 8])
    assert mla.with_layer_ranks([24, 24, 24]).layer_ranks is None  # uniform: one representation
