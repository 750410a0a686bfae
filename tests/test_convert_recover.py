"""benchmarks/convert_recover.py and recover_bundle.py on synthetic texts and a tiny random model (CPU, seconds).

Bundle round trip (tokens and GGUF parts), the train/eval separation on tokens, the budget's stopping
rule and schedule, the batch mixture, and a whole ``run`` from a bundle to the written report.
"""

import json
import random

import pytest
import torch

from benchmarks import convert_recover as cr
from benchmarks import recover_bundle as rb
from benchmarks.convert_matrix import GENRES
from kvslim.eval.tokenizer import save_tokenizer, train_bpe
from kvslim.spec import AttentionSpec
from kvslim.testing import tiny_model

WORDS = 1200


pytestmark = pytest.mark.usefixtures("one_thread")


def _texts():
    """A text per (source, split), each from its own slice of a made-up vocabulary: no shared passage."""
    rng = random.Random(0)
    pool = [f"w{i}" for i in range(WORDS)]
    out, k = {}, 0
    for g in GENRES:
        for split in ("calib", "eval"):
            words = pool[k * 80 : (k + 1) * 80]
            k += 1
            n = 1500 if split == "calib" else 700
            out[(g, split)] = " ".join(rng.choice(words) for _ in range(n))
    return out


@pytest.fixture(scope="module")
def tok():
    return train_bpe("\n\n".join(_texts().values()), 400)


@pytest.fixture(scope="module")
def data(tok):
    texts = _texts()
    return rb.collect(tok, windows=3, seq_len=24, calib_samples=8, calib_seq_len=16,
                      prompts=["w1 w2", "w3"], read_text=lambda s, split: texts[(s, split)])


def test_collect_train_is_calib_only_and_disjoint_from_eval(data):
    assert list(data["train"]) == ["sotu", "moby-dick", "shakespeare", "code"]
    assert data["train_weights"] == dict.fromkeys(data["train"], 0.25)
    assert set(data["eval"]) == set(GENRES) and all(x.shape == (3, 24) for x in data["eval"].values())
    assert data["calib"].shape == (8, 16)
    assert set(data["meta"]["texts"]) == {f"{s}:calib" for s in data["train"]} | {f"{g}:eval" for g in GENRES}
    # no eval 32-gram (in fact no eval window) occurs in the training streams
    assert data["meta"]["overlap"] == dict.fromkeys(GENRES, 0.0)
    train = torch.cat(list(data["train"].values()))
    for x in data["eval"].values():
        for w in x:
            assert rb.ngram_overlap([train], w[None], n=8) == 0.0
    # the calibration windows are windows of the training streams
    ngrams = {tuple(train[i : i + 16].tolist()) for i in range(train.numel() - 15)}
    assert all(tuple(w.tolist()) in ngrams for w in data["calib"])


def test_ngram_overlap_sees_a_leak():
    train = [torch.arange(100)]
    assert rb.ngram_overlap(train, torch.arange(10, 50)[None], n=8) == 1.0
    assert rb.ngram_overlap(train, torch.arange(90, 110)[None], n=8) == pytest.approx(3 / 13)  # 90..97, 91.., 92..
    assert rb.ngram_overlap(train, torch.arange(40, 80)[None] + 200, n=8) == 0.0


def test_bundle_round_trip_and_gguf_parts(tmp_path, data, tok):
    save_tokenizer(tok, tmp_path / "tok")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(5000)))
    meta = rb.write_bundle(tmp_path / "ship", data, tokenizer_dir=tmp_path / "tok", gguf=gguf, part1_bytes=3000)
    assert meta["ids_dtype"] == "uint16" and (tmp_path / "ship/bundle/tokenizer.json").is_file()
    back = rb.read_bundle(tmp_path / "ship/bundle")
    for k in ("train", "eval"):
        assert list(back[k]) == list(data[k])
        for s in data[k]:
            assert back[k][s].dtype == torch.int64 and torch.equal(back[k][s], data[k][s])
    assert torch.equal(back["calib"], data["calib"]) and back["prompts"] == data["prompts"]
    assert back["train_weights"] == data["train_weights"]
    assert [p["bytes"] for p in meta["gguf"]["parts"]] == [3000, 2000]
    # part 1 arrives elsewhere (another call), part 2 beside the bundle
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ship/gguf.part1").rename(tmp_path / "elsewhere/gguf.part1")
    with pytest.raises(ValueError, match="part1"):
        rb.find_parts(back["meta"]["gguf"], [tmp_path / "ship"])
    parts = rb.find_parts(back["meta"]["gguf"], [tmp_path / "ship", tmp_path / "elsewhere"])
    joined = rb.join_parts(back["meta"]["gguf"], parts, tmp_path / "out/model.gguf")
    assert joined.read_bytes() == gguf.read_bytes()
    parts[1].write_bytes(parts[1].read_bytes()[:-1])  # a truncated copy is named
    with pytest.raises(ValueError, match="gguf.part2"):
        rb.join_parts(back["meta"]["gguf"], parts, tmp_path / "out2/model.gguf")
    # writing again replaces the bundle it wrote, but never a foreign folder named bundle
    rb.write_bundle(tmp_path / "ship", data)
    (tmp_path / "mine/bundle").mkdir(parents=True)
    (tmp_path / "mine/bundle/notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a bundle"):
        rb.write_bundle(tmp_path / "mine", data)
    assert (tmp_path / "mine/bundle/notes.txt").read_text() == "keep"


def test_budget_stops_at_whichever_comes_first():
    b = cr.Budget(tokens=1000, seconds=10.0)
    assert b.stop(0, 100, 0.0) is None
    assert b.stop(900, 100, 9.9) is None  # the step that reaches the budget exactly still runs
    assert b.stop(901, 100, 0.0) == "tokens"
    assert b.stop(0, 100, 10.0) == "time"
    assert b.progress(500, 1.0) == 0.5 and b.progress(100, 8.0) == 0.8 and b.progress(2000, 0) == 1.0
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert cr.lr_at(0, 0.0, **kw) == pytest.approx(0.25)
    assert cr.lr_at(10, 0.0, **kw) == pytest.approx(1.0)
    assert cr.lr_at(10, 0.5, **kw) == pytest.approx(0.55)
    assert cr.lr_at(10, 1.0, **kw) == pytest.approx(0.1)


def test_mixture_batch_shares_and_seed():
    streams = [torch.arange(100), torch.arange(1000, 1100), torch.arange(2000, 2100)]
    x = cr.mixture_batch(streams, [0.5, 0.25, 0.25], 8, 5, step=3)
    assert x.shape == (8, 5) and torch.equal(x, cr.mixture_batch(streams, [0.5, 0.25, 0.25], 8, 5, step=3))
    assert [int(((x // 1000) == i).all(1).sum()) for i in range(3)] == [4, 2, 2]  # rows never straddle sources
    assert not torch.equal(x, cr.mixture_batch(streams, [0.5, 0.25, 0.25], 8, 5, step=4))
    counts = torch.zeros(3)
    for step in range(200):  # 2 rows for 3 equal sources: the remainder row is drawn by weight
        counts += torch.bincount(cr.mixture_batch(streams, [1, 1, 1], 2, 5, step)[:, 0] // 1000, minlength=3)
    assert counts.sum() == 400 and counts.min() > 100


def _tiny_source(tmp_path, vocab):
    spec = AttentionSpec(kind="gqa", hidden_size=64, num_heads=4, head_dim=16, num_kv_heads=2, rope_theta=1e4)
    model = tiny_model(spec, vocab=vocab, tie=True)
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_run_writes_the_report(tmp_path, monkeypatch, data, tok):
    rb.write_bundle(tmp_path / "ship", data)
    model = _tiny_source(tmp_path, len(tok))
    monkeypatch.setitem(cr.TARGETS, "tiny-mla", ("tiny MLA r=8", "mla", dict(kv_lora_rank=8, rope_dim=8, fit="output")))
    res = tmp_path / "res"
    cr.main(["run", "--bundle", str(tmp_path / "ship/bundle"), "--model", str(model), "--targets", "tiny-mla",
             "--tokens", "100", "--time-budget", "60", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1",
             "--log-every", "1", "--windows", "2", "--gen-tokens", "2", "--device", "cpu", "--results-dir", str(res)])
    out = json.loads((res / "convert_recovery.json").read_text())
    (row,) = out["rows"]
    t = row["train"]
    assert (t["steps"], t["tokens"], t["stopped_by"]) == (3, 96, "tokens")  # a 4th step would pass 100 tokens
    assert [h["step"] for h in t["history"]] == [1, 2, 3] and all(h["kl"] >= 0 for h in t["history"])
    assert set(row["ppl_before"]) == set(row["ppl_after"]) == set(GENRES)
    assert row["cache_fraction"] == pytest.approx(16 / 64)  # 8 latent + 8 RoPE of 2 x 2 x 16
    assert len(row["generations_after"]) == 2
    md = (res / "convert_recovery.md").read_text()
    assert "held-out gmean" in md and "**pyref**" in md and "tiny MLA r=8" in md
    assert out["meta"]["data"]["overlap"] == dict.fromkeys(GENRES, 0.0)
    # a time budget binds when it is the smaller one
    cr.main(["run", "--bundle", str(tmp_path / "ship/bundle"), "--model", str(model), "--targets", "tiny-mla",
             "--tokens", "100000", "--time-budget", "0.01", "--batch-size", "2", "--seq-len", "16", "--windows", "1",
             "--gen-tokens", "0", "--device", "cpu", "--results-dir", str(res), "--stem", "timed"])
    t = json.loads((res / "timed.json").read_text())["rows"][0]["train"]
    assert t["stopped_by"] == "time" and t["steps"] >= 1
    # a target that no longer fits the whole run's deadline is skipped and listed
    cr.main(["run", "--bundle", str(tmp_path / "ship/bundle"), "--model", str(model), "--targets", "tiny-mla",
             "--deadline", "1", "--windows", "1", "--gen-tokens", "0", "--device", "cpu", "--results-dir", str(res),
             "--stem", "late"])
    late = json.loads((res / "late.json").read_text())
    assert late["rows"] == [] and late["skipped"][0]["target"] == "tiny-mla"
    assert "tiny-mla: not run" in (res / "late.md").read_text()


def _write_gguf(model, path):
    """``model`` (a tiny llama-like kvslim model, tied) as a float32 llama GGUF, Q/K rows in llama.cpp's order."""
    gguf = pytest.importorskip("gguf")
    c, a = model.config, model.config.attention
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, c.num_layers), (w.add_context_length, c.max_position_embeddings),
                   (w.add_embedding_length, c.hidden_size), (w.add_feed_forward_length, c.intermediate_size),
                   (w.add_head_count, a.num_heads), (w.add_head_count_kv, a.num_kv_heads),
                   (w.add_rope_freq_base, a.rope_theta), (w.add_layer_norm_rms_eps, c.rms_norm_eps),
                   (w.add_vocab_size, c.vocab_size), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                   (w.add_pad_token_id, 2)):
        add(v)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in model.state_dict().items():
        v = v.float().numpy()
        if k == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", v)
        elif k == "model.norm.weight":
            w.add_tensor("output_norm.weight", v)
        elif k.startswith("model.layers."):
            i, rest = k.split(".", 3)[2:]
            name = names[rest.rsplit(".", 1)[0]]
            if name in ("attn_q", "attn_k"):  # llama.cpp's convert permute (read_gguf_llama undoes it)
                n = a.num_heads if name == "attn_q" else a.num_kv_heads
                v = v.reshape(n, 2, v.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(v.shape)
            w.add_tensor(f"blk.{i}.{name}.weight", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_run_from_gguf_parts(tmp_path, monkeypatch, data, tok):
    """The GPU path: the model from the two GGUF parts found in two directories, then from the joined file alone."""
    from kvslim.model import Transformer

    src = Transformer.from_pretrained(_tiny_source(tmp_path, len(tok)))
    _write_gguf(src, tmp_path / "tiny.gguf")
    rb.write_bundle(tmp_path / "ship", data, gguf=tmp_path / "tiny.gguf", part1_bytes=20_000)
    (tmp_path / "tmp_ship").mkdir()
    (tmp_path / "ship/gguf.part1").rename(tmp_path / "tmp_ship/gguf.part1")  # came in an earlier call
    monkeypatch.setitem(cr.TARGETS, "tiny-mla", ("tiny MLA r=8", "mla", dict(kv_lora_rank=8, rope_dim=8, fit="output")))
    argv = ["run", "--bundle", str(tmp_path / "ship/bundle"), "--parts-dir", str(tmp_path / "tmp_ship"),
            str(tmp_path / "ship"), "--targets", "tiny-mla", "--tokens", "32", "--batch-size", "2", "--seq-len", "16",
            "--windows", "1", "--gen-tokens", "0", "--device", "cpu", "--results-dir", str(tmp_path / "res")]
    cr.main(argv)
    out = json.loads((tmp_path / "res/convert_recovery.json").read_text())
    assert out["meta"]["model"].startswith("GGUF tiny.gguf")
    evals = {g: x[:1] for g, x in rb.read_bundle(tmp_path / "ship/bundle")["eval"].items()}
    assert out["original"]["ppl"] == pytest.approx(cr.genre_ppl(src, evals), rel=1e-6)  # the same weights
    for p in ("tmp_ship/gguf.part1", "ship/gguf.part2"):
        (tmp_path / p).unlink()
    cr.main(argv)  # the joined GGUF (in the first --parts-dir) is enough now
    assert (tmp_path / "tmp_ship/tiny.gguf").is_file()
