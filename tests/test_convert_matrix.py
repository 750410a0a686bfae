"""benchmarks/convert_matrix.py: the RoPE-budget rows and the guard against rows scored on other eval tokens.

The guard's pure parts are tested on fake rows (no model): ``window_digest``, ``check_eval_tokens``,
``stamp_legacy_row``, and ``render`` marking a row whose digest differs from the base row's.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import convert_matrix as cm
from kvslim.convert.latent import check_latent_target
from kvslim.spec import AttentionSpec

GENRES = ("sotu", "legal", "docs")
EVAL = "2 windows x 512 tokens per genre, evenly spaced over the eval split"


def _digests(**changed):
    return {g: changed.get(g, f"{i:016x}") for i, g in enumerate(GENRES)}


def _local(**changed):
    return {g: {"sha256": changed.get(g, f"text-{g}")} for g in ("legal", "docs")}


def _data(base_digest=None):
    base = {"calib": "-", "name": "orig", "ppl": dict.fromkeys(GENRES, 10.0)}
    if base_digest is not None:
        base["eval_digest"] = base_digest
    return {"rows": [base], "meta": {"eval": EVAL, "local_genres": _local()}}


def test_window_digest_is_of_the_tokens():
    x = torch.arange(2 * 16).reshape(2, 16)
    assert cm.window_digest(x) == cm.window_digest(x.to(torch.int32)) == cm.window_digest(x.clone())
    y = x.clone()
    y[1, 15] += 1
    assert cm.window_digest(y) != cm.window_digest(x) and len(cm.window_digest(x)) == 16


def test_guard_passes_on_the_same_tokens_and_empty_json():
    assert cm.check_eval_tokens(_data(_digests()), "orig", _digests(), _local(), EVAL) == []
    assert cm.check_eval_tokens({"rows": [], "meta": {}}, "orig", _digests(), _local(), EVAL) == []


def test_guard_names_the_genres_whose_windows_differ():
    with pytest.raises(ValueError, match=r"genre\(s\) legal, docs .*--fresh"):
        cm.check_eval_tokens(_data(_digests()), "orig", _digests(legal="a" * 16, docs="b" * 16), _local(), EVAL)


def test_guard_on_a_legacy_base_row_reads_the_recorded_text_hashes():
    with pytest.raises(ValueError, match=r"genre\(s\) docs .*installed packages changed"):
        cm.check_eval_tokens(_data(), "orig", _digests(), _local(docs="other"), EVAL)
    with pytest.raises(ValueError, match="every genre differ"):
        cm.check_eval_tokens(_data(), "orig", _digests(), _local(), EVAL.replace("512", "256"))
    warnings = cm.check_eval_tokens(_data(), "orig", _digests(), _local(), EVAL)
    assert len(warnings) == 1 and "sotu" in warnings[0] and "legal" not in warnings[0]


def test_stamp_legacy_row_only_when_perplexity_reproduces():
    base = _data()["rows"][0]
    with pytest.raises(ValueError, match=r"genre\(s\) legal"):
        cm.stamp_legacy_row(base, {"sotu": 10.0, "legal": 10.5, "docs": 10.0}, _digests(), "today")
    assert "eval_digest" not in base
    cm.stamp_legacy_row(base, dict.fromkeys(GENRES, 10.0 * (1 + 1e-6)), _digests(), "today")
    assert base["eval_digest"] == _digests() and "today" in base["eval_digest_note"]


def _row(name, digest, ppl=20.0):
    r = {"calib": "mix", "name": name, "kind": "mla", "elements": 192, "ppl": dict.fromkeys(cm.GENRES, ppl),
         "generations": ["a", "b"]}
    return r if digest is None else {**r, "eval_digest": digest}


def test_render_marks_rows_scored_on_other_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "RESULTS", tmp_path)
    same = {g: f"{i:016x}" for i, g in enumerate(cm.GENRES)}
    base = {"calib": "-", "name": "original GQA-3", "kind": "gqa", "elements": 384,
            "ppl": dict.fromkeys(cm.GENRES, 10.0), "generations": ["a", "b"], "eval_digest": same}
    meta = {"layers": 30, "date": "d", "model": "m", "cpu": "c", "torch_threads": 2,
            "versions": {"python": "3", "torch": "2", "transformers": "5"}, "calib_windows": "w",
            "calibs": cm.CALIBS, "eval": EVAL, "scored_tokens_per_genre": 1022, "gen_tokens": 16,
            "local_genres": {"legal": {"documents": 1, "chars": 9, "sha256": "x", "first_ids": ["a"]}}}
    rows = [base, _row("MLA r=128 output-aware", same), _row("MLA r=160 d_R=32 output-aware", {**same, "legal": "f" * 16}),
            _row("MLA r=192 TransMLA", None)]
    (tmp_path / "convert_matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    cm.render()
    md = (tmp_path / "convert_matrix.md").read_text()
    assert "| MLA r=160 d_R=32 output-aware **[OTHER EVAL TOKENS: legal]** |" in md
    assert "| MLA r=128 output-aware |" in md and "| MLA r=192 TransMLA° |" in md
    assert "MLA r=160 d_R=32 output-aware x2.00 vs MLA r=128 output-aware x2.00" in md  # the equal-bytes line
    assert "not comparable" in md and "d_R=128 x2" in md


def test_rope_budget_rows_are_192_elements_and_valid_targets():
    smollm2 = AttentionSpec(kind="gqa", hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64)
    rows = [v for v in cm.variants_smollm2() if "d_R=" in v[1] and v[1] != "MLA r=192 d_R=32 output-aware"]
    assert [(kw["rope_dim"], kw.get("rope_repeat", 1)) for *_, kw in rows] == (
        [(d, 1) for d in cm.ROPE_BUDGET] + [(d, k) for _, d, k in cm.ROPE_REPEAT])
    for calib, name, to, kw in rows:
        assert calib == "mix" and to == "mla" and kw["fit"] == "output"
        assert kw["kv_lora_rank"] + kw["rope_dim"] == 192 and f"r={kw['kv_lora_rank']} d_R={kw['rope_dim']}" in name
        check_latent_target(smollm2, 1, kw["kv_lora_rank"], kw["rope_dim"], fit="output",
                            rope_repeat=kw.get("rope_repeat", 1))
    with pytest.raises(ValueError, match="must divide the source's rotary dims"):  # two heads' worth, one slot each
        check_latent_target(smollm2, 1, 64, 128, fit="output")


def test_gta_diagnostic_rows_match_gta3_bytes():
    # GTA-3 on SmolLM2 caches 3 states of 64 + one shared 32-dim RoPE key = 224 elements; the MLA rows that explain
    # its gap must cache exactly that many, one with GTA's RoPE budget (32), one with a head's (64)
    smollm2 = AttentionSpec(kind="gqa", hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64)
    by = {name: (calib, to, kw) for calib, name, to, kw in cm.variants_smollm2()}
    for name, rope in (("MLA r=192 d_R=32 output-aware", 32), ("MLA r=160 output-aware", 64)):
        calib, to, kw = by[name]
        assert (calib, to, kw["fit"], kw["rope_dim"]) == ("mix", "mla", "output", rope)
        assert kw["kv_lora_rank"] + kw["rope_dim"] == 3 * 64 + 32 == 224
        check_latent_target(smollm2, 1, kw["kv_lora_rank"], kw["rope_dim"], fit="output")
    pairs = cm.MODELS["smollm2"]["pairs"]
    assert ("GTA-3 output-aware", "MLA r=192 d_R=32 output-aware") in pairs


def test_calibration_size_seed_and_shrinkage_rows_are_valid_and_named_by_what_they_change():
    import argparse

    from kvslim.convert.pipeline import check_conversion

    smollm2 = AttentionSpec(kind="gqa", hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64)
    args = argparse.Namespace(calib_samples=16, calib_seq_len=256, model="smollm2")
    new = [v for v in cm.variants_smollm2() if any(k in v[1] for k in (" calib ", " shrink", " seed "))]
    assert len({v[1] for v in new}) == len(new) and new
    for calib, name, to, kw in new:
        assert calib == "mix"
        a, conv_kw = cm.with_calib_size(args, kw)
        assert not set(cm.CALIB_SIZE) & set(conv_kw) and vars(args)["calib_samples"] == 16  # args left alone
        check_conversion(smollm2, to, **{k: v for k, v in conv_kw.items() if k != "calib_pass"},
                         calib_pass=conv_kw.get("calib_pass", "original"))
        n, t, seed = a.calib_samples, a.calib_seq_len, getattr(a, "calib_seed", 0)
        assert (f" calib {n}x{t}" in name) == ((n, t) != (16, 256)), name
        assert (f" seed {seed}" in name) == (seed != 0), name
        assert (" shrink" in name) == bool(conv_kw.get("calib_shrinkage")), name
    a, kw = cm.with_calib_size(args, {"kv_lora_rank": 128})
    assert (a.calib_samples, a.calib_seq_len, getattr(a, "calib_seed", 0), kw) == (16, 256, 0, {"kv_lora_rank": 128})


def test_only_selection_and_windows_stem():
    assert cm.selected("r=128", "mix", "MLA r=128 output-aware calib 64x256")
    assert cm.selected("mix/MLA r=128 output-aware", "mix", "MLA r=128 output-aware")
    assert not cm.selected("mix/MLA r=128 output-aware", "mix", "MLA r=128 output-aware calib 64x256")
    assert not cm.selected("mix/MLA r=128 output-aware", "sotu", "MLA r=128 output-aware")
    main = cm.model_entry(argparse.Namespace(model="smollm2", windows=cm.DEFAULT_WINDOWS))
    more = cm.model_entry(argparse.Namespace(model="qwen2.5-coder-0.5b", windows=16))
    assert main["stem"] == "convert_matrix" and more["stem"] == "convert_matrix_qwen_w16"
    assert more["cmd"] == "run --model qwen2.5-coder-0.5b --windows 16"
