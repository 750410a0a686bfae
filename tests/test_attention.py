"""Equivalence tests for the six attention variants (fp32, CPU, torch reference kernels)."""

import pytest
import torch

from kvslim.attention import build_attention
from kvslim.cache import KVCache
from kvslim.testing import TINY_PRESETS, assert_close, tiny_model, tiny_spec


@pytest.mark.parametrize("name", TINY_PRESETS)
@pytest.mark.parametrize("page_size", [None, 1, 4])
def test_decode_step_by_step_matches_prefill(name, page_size):
    model = tiny_model(tiny_spec(name))
    toks = torch.randint(0, 97, (3, 13))
    with torch.no_grad():
        full = model(toks)
        cache = model.new_cache(3, 16, page_size=page_size)
        outs = [model(toks[:, :5], cache)]
        outs += [model(toks[:, t : t + 1], cache) for t in range(5, 13)]
    assert_close(torch.cat(outs, 1), full, atol=2e-5, msg=name)
    assert cache.seq_lens.tolist() == [13, 13, 13]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_chunked_prefill_and_speculative_chunks(name):
    """Chunks longer than the kernel's q_len (gathered path) and q_len 2..8 (kernel path)."""
    model = tiny_model(tiny_spec(name))
    toks = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(toks)
        cache = model.new_cache(2, 32, page_size=8)
        outs, t = [], 0
        for n in (3, 11, 2, 8, 6):  # 11 > MAX_Q_LEN exercises the gathered path
            outs.append(model(toks[:, t : t + n], cache))
            t += n
    assert_close(torch.cat(outs, 1), full, atol=2e-5, msg=name)


@pytest.mark.parametrize("name", ["mla", "gla-2", "gla-4"])
@pytest.mark.parametrize("q_lora", [None, 24])
def test_absorbed_equals_naive(name, q_lora):
    spec = tiny_spec(name, q_lora_rank=q_lora) if q_lora else tiny_spec(name)
    model = tiny_model(spec)
    toks = torch.randint(0, 97, (2, 10))
    res = {}
    for absorb in (True, False):
        model.set_attention_options(absorb=absorb)
        with torch.no_grad():
            cache = model.new_cache(2, 12, page_size=4)
            outs = [model(toks[:, :4], cache)] + [model(toks[:, t : t + 1], cache) for t in range(4, 10)]
        res[absorb] = torch.cat(outs, 1)
    assert_close(res[True], res[False], atol=2e-5, msg=name)


def _copy_attention(dst, src):
    dst.load_state_dict(src.state_dict())


def test_gqa_with_all_kv_heads_is_mha_and_one_is_mqa():
    x = torch.randn(2, 7, 64)
    pos = torch.arange(7)[None].expand(2, 7)
    for h_kv, other in ((4, "mha"), (1, "mqa")):
        gqa = build_attention(tiny_spec(f"gqa-{h_kv}"))
        ref = build_attention(tiny_spec(other))
        _copy_attention(ref, gqa)
        with torch.no_grad():
            assert_close(gqa(x, pos), ref(x, pos), atol=1e-6)


def test_gqa_matches_explicit_mean_of_repeated_heads():
    """GQA == MHA whose K/V heads are copies of the group's head (the definition)."""
    gqa = build_attention(tiny_spec("gqa-2"))
    mha = build_attention(tiny_spec("mha"))
    sd = gqa.state_dict()
    sd["k_proj.weight"] = sd["k_proj.weight"].view(2, 16, 64).repeat_interleave(2, 0).reshape(64, 64)
    sd["v_proj.weight"] = sd["v_proj.weight"].view(2, 16, 64).repeat_interleave(2, 0).reshape(64, 64)
    mha.load_state_dict(sd)
    x = torch.randn(2, 5, 64)
    pos = torch.arange(5)[None].expand(2, 5)
    with torch.no_grad():
        assert_close(gqa(x, pos), mha(x, pos), atol=1e-6)


@pytest.mark.parametrize("name", TINY_PRESETS + ("gqa-1", "gla-4"))
def test_cache_bytes_per_token_match_spec(name):
    spec = tiny_spec(name)
    cache = KVCache(spec, 3, batch=2, max_len=8, dtype=torch.bfloat16)
    assert cache.nbytes() == 3 * 2 * 8 * spec.bytes_per_token(2)


@pytest.mark.parametrize(
    "name,tp",
    [("gta-2", 2), ("gta-4", 4), ("gta-2", 4), ("gla-2", 2), ("gla-4", 2), ("gla-2", 4), ("mla", 2),
     ("gqa-2", 2), ("mha", 4), ("mqa", 2)],
)
def test_tensor_parallel_shards_sum_to_unsharded(name, tp):
    spec = tiny_spec(name)
    torch.manual_seed(1)
    full = build_attention(spec)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 6, 64)
    pos = torch.arange(6)[None].expand(2, 6)
    cls = type(full)
    with torch.no_grad():
        ref = full(x, pos)
        parts, parts_dec = [], []
        for r in range(tp):
            shard = cls(spec, tp_rank=r, tp_size=tp)
            shard.load_state_dict(cls.shard_state_dict(full.state_dict(), spec, r, tp))
            parts.append(shard(x, pos))
            # decode path through a per-rank cache whose row is the rank's shard
            cache = KVCache(spec, 1, batch=2, max_len=8, page_size=2, tp_size=tp)
            assert cache.row_dim == spec.row_dim_per_rank(tp)
            out = [shard(x[:, :3], pos[:, :3], cache.layer(0))]
            cache.advance(3)
            for t in range(3, 6):
                out.append(shard(x[:, t : t + 1], pos[:, t : t + 1], cache.layer(0)))
                cache.advance(1)
            parts_dec.append(torch.cat(out, 1))
    assert_close(sum(parts), ref, atol=1e-5, msg=f"{name} tp={tp} prefill")
    assert_close(sum(parts_dec), ref, atol=1e-5, msg=f"{name} tp={tp} decode")


def test_paper_per_device_rows():
    from kvslim.spec import AttentionSpec

    p = AttentionSpec.preset
    assert [p(n).bytes_per_token() for n in ("gta-4", "gla-2", "mla", "gqa-4")] == [1152, 1152, 1152, 2048]
    assert [2 * p(n).row_dim_per_rank(2) for n in ("gta-4", "gla-2", "mla")] == [640, 640, 1152]


def test_ragged_generate_matches_single_sequences():
    model = tiny_model(tiny_spec("gla-2"))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batch = model.generate(prompts, max_new_tokens=6, page_size=4)
    single = [model.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batch == single
    # greedy decoding equals argmax over full recomputation
    seq = list(prompts[1])
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert batch[1] == seq[len(prompts[1]) :]


def test_cache_overflow_and_bad_inputs_raise():
    model = tiny_model(tiny_spec("gqa-2"))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.randint(0, 97, (1, 5)), cache)
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.randint(0, 97, (5,)))
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], temperature=-1)
    with pytest.raises(ValueError, match="tp_rank"):
        build_attention(tiny_spec("gqa-2"), tp_rank=2, tp_size=2)


@pytest.mark.parametrize("name", TINY_PRESETS + ("gla-4",))
def test_prefill_is_causal(name):
    """Changing later tokens never changes earlier logits (no leak from the future)."""
    model = tiny_model(tiny_spec(name))
    toks = torch.randint(0, 97, (2, 12))
    other = toks.clone()
    other[:, 7:] = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        a, b = model(toks), model(other)
    assert_close(a[:, :7], b[:, :7], atol=1e-6, msg=name)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mla", "gla-2"])
@pytest.mark.parametrize("kv", [None, "fp8"])
def test_latent_history_prefill_on_expanded_kv(name, kv, monkeypatch):
    """A chunk over a host-known history (``LayerCache.history``) runs SDPA on the gathered, expanded
    K/V with a lower-right causal mask: same output as the one-shot prefill (fp32) or as the gathered
    path reading the same fp8 cache, and the path is really taken."""
    from kvslim.cache import LayerCache
    from kvslim.rows import RowFormat

    torch.manual_seed(1)
    spec = tiny_spec(name)
    attn = build_attention(spec).eval()
    B, L, page, first = 3, 29, 4, 11
    x = torch.randn(B, L, spec.hidden_size)
    pos = torch.arange(L)[None].expand(B, L)
    fmt = RowFormat.for_spec(spec, kv) if kv else None
    width = fmt.storage_width if fmt else spec.row_dim
    calls = []
    orig = type(attn)._attend_history
    monkeypatch.setattr(type(attn), "_attend_history", lambda self, *a: calls.append(a[-1]) or orig(self, *a))

    def run(history_known: bool) -> torch.Tensor:
        pool = torch.full((B * 8 + 1, page, width), float("nan")) if fmt is None else \
            torch.zeros(B * 8 + 1, page, width, dtype=fmt.storage_dtype)
        bt = torch.randperm(B * 8)[: B * 8].view(B, 8).int() + 1
        outs = []
        with torch.no_grad():
            for lo, hi in ((0, first), (first, L)):
                start = torch.full((B,), lo, dtype=torch.int32)
                cache = LayerCache(pool, bt, start, fmt=fmt, history=lo if history_known else None)
                outs.append(attn(x[:, lo:hi], pos[:, lo:hi], cache))
        return torch.cat(outs, 1)

    got = run(True)
    assert calls == [L], calls  # the second chunk (18 > MAX_Q_LEN tokens) took the expanded history path
    want = attn(x, pos) if kv is None else run(False)
    assert_close(got, want, atol=2e-5 if kv is None else 1e-4, msg=f"{name} {kv}")


def test_prefix_rows_reads_pages_in_table_order_and_names_a_short_table():
    """``LayerCache.prefix_rows``: row t of sequence b is slot t % page of page block_table[b, t // page];
    asking for more rows than the table holds is a clear error, not an index fault."""
    from kvslim.cache import LayerCache

    pool = torch.randn(7, 4, 3)
    bt = torch.tensor([[5, 2], [1, 6]], dtype=torch.int32)
    cache = LayerCache(pool, bt, torch.zeros(2, dtype=torch.int32))
    rows = cache.prefix_rows(6)
    want = torch.stack([torch.cat([pool[5], pool[2]])[:6], torch.cat([pool[1], pool[6]])[:6]])
    assert torch.equal(rows, want)
    with pytest.raises(ValueError, match="9 rows need 3 pages, the block table has 2"):
        cache.prefix_rows(9)
