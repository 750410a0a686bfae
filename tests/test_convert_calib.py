"""Calibration mixtures (``--calib`` specs) and the local genres (code, pyref, legal, docs)."""

import os

import pytest
import torch

from kvslim.convert.calib import calibration_tokens, parse_calib_spec, window_counts
from kvslim.eval.local import LOCAL_GENRES, _is_eval, local_documents, local_split


def test_parse_calib_spec_grammar(tmp_path):
    got = parse_calib_spec("sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25")
    assert [(c.source, c.weight, c.is_file) for c in got] == [
        ("sotu", 0.25, False), ("moby-dick", 0.25, False), ("shakespeare", 0.25, False), ("code", 0.25, False)]
    assert [(c.source, c.weight) for c in parse_calib_spec("sotu")] == [("sotu", 1.0)]
    assert [(c.source, c.weight) for c in parse_calib_spec(" sotu:calib:3 , pyref ")] == [("sotu", 3.0), ("pyref", 1.0)]
    f = tmp_path / "my:text.txt"  # a path holding a colon, with and without a weight
    f.write_text("hello world")
    assert [(c.source, c.weight, c.is_file) for c in parse_calib_spec(f"{f}")] == [(str(f), 1.0, True)]
    assert [(c.source, c.weight, c.is_file) for c in parse_calib_spec(f"{f}:2,code")] == [
        (str(f), 2.0, True), ("code", 1.0, False)]


@pytest.mark.parametrize("spec, match", [
    ("sotu,nowhere-corpus", "unknown source 'nowhere-corpus'"),
    ("sotu:eval", "not 'eval'"),
    ("code:eval:1", "not 'eval'"),
    ("sotu:0", "weight must be a positive number"),
    ("sotu:-1,code", "weight must be a positive number"),
    ("sotu:nan", "weight must be a positive number"),
    ("sotu,,code", "empty item"),
    ("", "non-empty"),
    ("sotu:1,sotu:calib:2", r"\['sotu'\] more than once"),
])
def test_parse_calib_spec_errors_name_the_item(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_calib_spec(spec)


def test_window_counts_split_exactly_by_weight():
    specs = parse_calib_spec("sotu:1,moby-dick:1,code:1")
    assert window_counts(specs, 32) == [11, 11, 10]
    assert sum(window_counts(parse_calib_spec("sotu:0.7,code:0.3"), 17)) == 17
    assert window_counts(parse_calib_spec("sotu:3,code:1"), 8) == [6, 2]
    with pytest.raises(ValueError, match="'code' gets 0 of 4 windows"):
        window_counts(parse_calib_spec("sotu:100,code:1"), 4)


def test_calibration_mixture_takes_each_share_from_its_source(tmp_path):
    from kvslim.eval import smollm2_dir, tokenize

    tok = smollm2_dir()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(("apple banana cherry " * 200).strip())
    b.write_text(("seven eight nine ten " * 200).strip())
    ids_a, ids_b = set(tokenize(a.read_text(), tok).tolist()), set(tokenize(b.read_text(), tok).tolist())
    assert not ids_a & ids_b
    x = calibration_tokens(tok, num_samples=8, seq_len=16, text=f"{a}:3,{b}:1", seed=0)
    assert x.shape == (8, 16)
    assert all(set(r.tolist()) <= ids_a for r in x[:6]) and all(set(r.tolist()) <= ids_b for r in x[6:])
    y = calibration_tokens(tok, num_samples=8, seq_len=16, text=f"{a}:3,{b}:1", seed=0)
    assert torch.equal(x, y)  # seeded


def test_local_genres_have_disjoint_calib_and_eval_documents():
    for name in LOCAL_GENRES:
        docs = local_documents(name)
        ev = [k for k in docs if _is_eval(k)]
        assert ev and len(ev) < len(docs), name
        split = local_split(name)
        assert split["calib"] and split["eval"]
        assert docs[ev[0]] in split["eval"] and docs[ev[0]] not in split["calib"]
    assert "pydoc_data" not in " ".join(local_documents("code"))
    assert all(k.endswith(".py") for k in local_documents("code"))


def test_bad_calib_spec_fails_before_anything_is_written(tmp_path, capsys):
    from kvslim.cli import main
    from kvslim.convert import convert_checkpoint
    from kvslim.spec import AttentionSpec
    from kvslim.testing import tiny_model

    spec = AttentionSpec(kind="gqa", hidden_size=64, num_heads=4, head_dim=16, num_kv_heads=2, rope_theta=1e4)
    tiny_model(spec, vocab=97).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="unknown source 'legalese'"):
        convert_checkpoint(model_dir=tmp_path / "src", out=tmp_path / "out", to="mla", kv_lora_rank=8,
                           rope_dim=16, calib_text="sotu:0.5,legalese:0.5", progress=False)
    assert not (tmp_path / "out").exists()
    rc = main(["convert", "--model", str(tmp_path / "src"), "--to", "mla", "--kv-lora-rank", "8", "--rope-dim",
               "16", "--out", str(tmp_path / "out"), "--calib", "sotu:eval"])
    assert rc == 2 and "not 'eval'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_local_genre_names_win_over_directories(tmp_path, monkeypatch):
    from kvslim.eval import load_text

    (tmp_path / "docs").mkdir()  # like the repository's own docs/ folder
    monkeypatch.chdir(tmp_path)
    assert load_text("docs:eval") == local_split("docs")["eval"]
    assert load_text("code", "calib") == local_split("code")["calib"]


def test_calib_preset_mix_is_the_four_genre_mixture():
    from kvslim.convert.calib import CALIB_PRESETS, DEFAULT_CALIB, parse_calib_spec

    assert DEFAULT_CALIB == "mix"
    mix = parse_calib_spec("mix")
    assert mix == parse_calib_spec("sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25") == parse_calib_spec(
        CALIB_PRESETS["mix"])
    assert [c.source for c in mix] == ["sotu", "moby-dick", "shakespeare", "code"]
    with pytest.raises(ValueError, match="unknown source"):
        parse_calib_spec("mix,legal")  # a preset is a whole spec, not an item


def test_training_mixture_stream_takes_each_share_of_the_tokens(tmp_path):
    """``--text`` mixtures for training (kvslim.eval.mixture): one stream, each source its weight's share
    of the tokens, the scarcest source limiting the length; single sources are not mixtures."""
    from kvslim.eval import smollm2_dir, tokenize
    from kvslim.eval.mixture import is_mixture, mixture_tokens

    tok = smollm2_dir()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(("apple banana cherry " * 300).strip())
    b.write_text(("seven eight nine ten " * 50).strip())
    ids_a, ids_b = tokenize(a.read_text(), tok), tokenize(b.read_text(), tok)
    x = mixture_tokens(f"{a}:3,{b}:1", tok)
    in_a = torch.isin(x, ids_a.unique())
    n_b = len(ids_b)  # b is the scarce source: all of it, and three times as many tokens of a
    assert int((~in_a).sum()) == n_b and int(in_a.sum()) == 3 * n_b
    assert torch.equal(x[: 3 * n_b], ids_a[: 3 * n_b]) and torch.equal(x[3 * n_b :], ids_b)
    assert is_mixture("mix") and is_mixture(f"{a},{b}")
    assert not is_mixture("sotu") and not is_mixture(str(a)) and not is_mixture(torch.zeros(3))
    with pytest.raises(ValueError, match="unknown source"):
        mixture_tokens(f"{a},nowhere", tok)


def test_training_reads_a_mixture_text(tmp_path):
    """kvslim.train's data loading takes a mixture spec as ``text`` (``kvslim finetune --text mix``)."""
    from kvslim.eval import smollm2_dir
    from kvslim.eval.mixture import mixture_tokens
    from kvslim.train.run import _texts_and_tokenizer

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one two three four five six " * 40)
    b.write_text("red green blue " * 40)
    spec = f"{a}:1,{b}:1"
    _, train, val = _texts_and_tokenizer(spec, str(b), smollm2_dir())
    assert torch.equal(train, mixture_tokens(spec, smollm2_dir())) and val is not None
