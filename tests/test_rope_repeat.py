"""RoPE budget beyond one head (issue 16): ``AttentionSpec.rope_repeat`` keeps several RoRoPE components per
frequency in the shared RoPE key. A real GQA model (2 KV heads, no rank-1 trick) converts exactly at full rank
with ``d_R = 2r, rope_repeat = 2``, which one head's worth of RoPE cannot do."""

import json

import pytest
import torch

from kvslim.convert import (
    convert_checkpoint,
    gqa_to_latent,
    gqa_to_mla,
    max_latent_dim,
    rorope_rotation,
    save_kvslim,
)
from kvslim.convert.rorope import rope_pairs_apply
from kvslim.model import Transformer
from kvslim.rope import Rotary, apply_rope, inv_frequencies
from kvslim.spec import AttentionSpec
from kvslim.testing import assert_close
from tests.test_convert import VOCAB, _cached, _model, _moments, _spec, _tokens


def test_rotary_repeats_each_frequency_on_adjacent_slots():
    rot = Rotary(32, 1e4, repeat=2)
    assert_close(rot.inv_freq, inv_frequencies(16, 1e4).repeat_interleave(2), atol=0)
    cos, sin = rot(torch.arange(5)[None])
    assert cos.shape == (1, 5, 32)
    assert_close(cos[..., 0], cos[..., 1], atol=0)  # slots 0 and 1 share frequency 0
    assert not torch.allclose(cos[0, 1:, 1], cos[0, 1:, 2])
    with pytest.raises(ValueError, match="multiple of 2 \\* repeat"):
        Rotary(30, 1e4, repeat=2)


def test_spec_rope_repeat_is_checked_and_round_trips():
    s = AttentionSpec(kind="mla", hidden_size=64, num_heads=4, head_dim=16, latent_dim=32, rope_dim=32, rope_repeat=2)
    assert AttentionSpec.from_dict(s.to_dict()) == s and s.rope_repeat == 2
    assert AttentionSpec.from_dict({k: v for k, v in s.to_dict().items() if k != "rope_repeat"}).rope_repeat == 1
    with pytest.raises(ValueError, match="rope_repeat > 1 is only supported for kind mla/gla"):
        AttentionSpec(kind="gqa", hidden_size=64, num_heads=4, head_dim=16, num_kv_heads=2, rope_repeat=2)
    with pytest.raises(ValueError, match="multiple of 2 \\* rope_repeat"):
        s.replace(rope_dim=36, rope_repeat=4)
    with pytest.raises(ValueError, match="rope_repeat must be a positive int"):
        s.replace(rope_repeat=0)


@pytest.mark.parametrize("h_kv,target,repeat,fold", [(2, 32, 2, 1), (3, 32, 2, 1), (3, 16, 2, 2), (3, 48, 3, 1),
                                                      (3, 32, 2, 2), (3, 8, 2, 4)])
def test_rorope_repeat_is_orthogonal_and_leaves_scores_unchanged(h_kv, target, repeat, fold):
    torch.manual_seed(0)
    d = r = 16
    h_q, n = 2 * h_kv, h_kv * 16
    keys = torch.randn(500, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
    rot = rorope_rotation(keys.T @ keys / 500, num_kv_heads=h_kv, head_dim=d, rope_dim=r, target_rope_dim=target,
                          freqfold=fold, repeat=repeat)
    R = rot.R
    assert rot.rope_dim == target
    assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    slots = Rotary(target, 1e4, repeat=repeat).inv_freq.double()
    src = inv_frequencies(r, 1e4).double()
    for m, (a, b, f) in enumerate(rot.pairs[: target // 2]):  # each kept slot rotates at its key slot's frequency
        assert (a, b) == (m, m + target // 2)
        assert_close(src[f], slots[m], atol=1e-12)
    if fold > 1:
        return  # a FreqFold group mixes frequencies: only the layout is exact
    inv = src
    q, k = torch.randn(h_q, d, dtype=torch.float64), torch.randn(h_kv, d, dtype=torch.float64)
    for t, s in [(7, 3), (100, 0)]:
        def rope(x, p):
            c = torch.cat([p * inv, p * inv])[None, None]
            return apply_rope(x[None, None], c.cos(), c.sin())[0, 0]

        ref = torch.stack([rope(q[h], t) @ rope(k[h // 2], s) for h in range(h_q)])
        k_rot = rope_pairs_apply(R @ k.reshape(-1), rot, inv, torch.tensor(float(s)))
        got = []
        for h in range(h_q):
            j = h // 2
            q_pad = torch.zeros(n, dtype=torch.float64)
            q_pad[j * d : (j + 1) * d] = q[h]
            got.append(rope_pairs_apply(R @ q_pad, rot, inv, torch.tensor(float(t))) @ k_rot)
        assert_close(torch.stack(got), ref, atol=1e-10)


def test_rorope_repeat_keeps_more_energy_and_all_of_it_at_h_kv():
    torch.manual_seed(0)
    n = 3 * 16
    X = torch.randn(400, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
    kept = [rorope_rotation(X.T @ X, num_kv_heads=3, head_dim=16, rope_dim=16, target_rope_dim=16 * k,
                            repeat=k).kept_energy for k in (1, 2, 3)]
    assert kept[0] < kept[1] < kept[2] and abs(kept[2] - 1) < 1e-12, kept
    with pytest.raises(ValueError, match="more components per frequency than the source has"):
        rorope_rotation(X.T @ X, num_kv_heads=3, head_dim=16, rope_dim=16, target_rope_dim=64, repeat=4)


@pytest.mark.parametrize("fit", ["bkv", "output"])
def test_two_heads_of_rope_make_real_gqa_exact_at_full_rank(fit):
    m = _model(_spec(h_kv=2))  # real GQA keys: one head's worth of RoPE is not exact (test_convert.py)
    mom, tok = _moments(m), _tokens()
    full = max_latent_dim(m.spec, 1, 32)
    out = gqa_to_mla(m, mom, kv_lora_rank=full, rope_dim=32, rope_repeat=2, fit=fit, progress=False)
    assert out.spec.rope_repeat == 2 and out.spec.rope_dim == 32
    one = gqa_to_mla(m, mom, kv_lora_rank=max_latent_dim(m.spec, 1, 16), rope_dim=16, fit=fit, progress=False)
    with torch.no_grad():
        ref = m(tok)
        assert_close(out(tok), ref, atol=1e-8)
        assert float((one(tok) - ref).abs().max()) > 1e-4
    assert_close(_cached(out, tok, 5), ref, atol=1e-4)  # absorbed decode over the latent cache


def test_gla_with_rope_repeat_full_rank_exact():
    m = _model(_spec(h_kv=2))
    cap = max_latent_dim(m.spec, 2, 32)
    out = gqa_to_latent(m, _moments(m), latent_heads=2, latent_dim=cap, rope_dim=32, rope_repeat=2, progress=False)
    tok = _tokens()
    with torch.no_grad():
        assert_close(out(tok), m(tok), atol=1e-8)


def test_bad_rope_repeat_is_named():
    m = _model(_spec(h_kv=2))
    mom = _moments(m)
    with pytest.raises(ValueError, match="more components per frequency"):
        gqa_to_mla(m, mom, kv_lora_rank=8, rope_dim=48, rope_repeat=3, progress=False)
    with pytest.raises(ValueError, match="needs rope_repeat=1"):
        gqa_to_mla(m, mom, kv_lora_rank=8, rope_dim=32, rope_repeat=2, method="mha2mla", progress=False)
    with pytest.raises(ValueError, match="must divide the source's rotary dims"):
        gqa_to_mla(m, mom, kv_lora_rank=8, rope_dim=24, rope_repeat=1, progress=False)


def test_checkpoint_kvslim_by_default_and_deepseek_refused(tmp_path):
    m = _model(_spec(h_kv=2)).float()
    src = tmp_path / "src"
    save_kvslim(m, src)
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(model_dir=src, to="mla", kv_lora_rank=24, rope_dim=32, rope_repeat=2, calib_tokens=calib,
              progress=False)
    with pytest.raises(ValueError, match="format 'deepseek' cannot hold rope_repeat=2"):
        convert_checkpoint(out=tmp_path / "ds", fmt="deepseek", **kw)
    assert not (tmp_path / "ds").exists()
    with pytest.raises(ValueError, match="rope_repeat applies to mla and gla"):
        convert_checkpoint(out=tmp_path / "gta", **dict(kw, to="gta", kv_lora_rank=None))
    res = convert_checkpoint(out=tmp_path / "out", **kw)
    assert res.target.rope_repeat == 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention"]["rope_repeat"] == 2
    back = Transformer.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert back.spec.rope_repeat == 2
    mem = convert_checkpoint(out=tmp_path / "mem", stream=False, **kw)
    tok = _tokens()
    with torch.no_grad():
        assert_close(back(tok), Transformer.from_pretrained(tmp_path / "mem", dtype=torch.float32)(tok), atol=1e-5)
    assert mem.target.rope_repeat == 2


def test_freqfold_auto_keeps_the_candidate_with_the_lowest_selection_nll():
    from kvslim.convert import convert_model
    from kvslim.convert.select import freqfold_candidates, window_nll

    m = _model(_spec(h_kv=3, h_q=6)).float()
    calib = torch.randint(0, VOCAB, (6, 20), generator=torch.Generator().manual_seed(5))
    select = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(6))
    kw = dict(kv_lora_rank=20, rope_dim=16, fit="output", progress=False)
    assert freqfold_candidates(16, 16) == [1, 2, 4] and freqfold_candidates(16, 8) == [2, 4, 8]
    out, stats = convert_model(m, "mla", calib=calib, freqfold="auto", select_calib=select, **kw)
    sel = stats["freqfold_select"]
    assert sorted(sel["ppl"]) == [1, 2, 4] and sel["windows"] == [3, 20]
    assert sel["ppl"][sel["chosen"]] == min(sel["ppl"].values())
    for f, ppl in sel["ppl"].items():  # each score is that candidate's own conversion, scored again here
        ref, _ = convert_model(m, "mla", calib=calib, freqfold=f, **kw)
        assert abs(torch.tensor(window_nll(ref, select)).exp().item() - ppl) < 1e-4 * ppl
        if f == sel["chosen"]:
            tok = _tokens()
            with torch.no_grad():
                assert_close(out(tok), ref(tok), atol=1e-6)
    gta, st = convert_model(m, "gta", calib=calib, freqfold="auto", select_calib=select, fit="output", progress=False)
    assert sorted(st["freqfold_select"]["ppl"]) == [2, 4, 8]


def test_freqfold_auto_bad_input_is_named(tmp_path):
    from kvslim.convert import convert_model

    m = _model(_spec(h_kv=2)).float()
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="select_calib"):
        convert_model(m, "mla", calib=calib, kv_lora_rank=8, rope_dim=16, freqfold="auto", progress=False)
    with pytest.raises(ValueError, match="not --to gqa"):
        convert_model(m, "gqa", kv_heads=1, freqfold="auto", progress=False)
    with pytest.raises(ValueError, match="method 'mha2mla'"):
        convert_model(m, "mla", calib=calib, kv_lora_rank=8, rope_dim=16, freqfold="auto", method="mha2mla",
                      select_calib=calib, progress=False)
    src = tmp_path / "src"
    save_kvslim(m, src)
    with pytest.raises(ValueError, match="calib_pass='sequential' or per-layer ranks use stream=False"):
        convert_checkpoint(model_dir=src, out=tmp_path / "o", to="mla", kv_lora_rank=8, rope_dim=16, freqfold="auto",
                           calib_tokens=calib, select_tokens=calib, calib_pass="sequential", progress=False)
    with pytest.raises(ValueError, match="select_tokens"):
        convert_checkpoint(model_dir=src, out=tmp_path / "o", to="mla", kv_lora_rank=8, rope_dim=16, freqfold="auto",
                           calib_tokens=calib, stream=False, progress=False)
    assert not (tmp_path / "o").exists()
    res = convert_checkpoint(model_dir=src, out=tmp_path / "o", to="mla", kv_lora_rank=8, rope_dim=16, freqfold="auto",
                             fmt="kvslim", calib_tokens=calib, select_tokens=calib[:2], stream=False, progress=False)
    assert res.stats["freqfold_select"]["chosen"] in (1, 2, 4)


def test_cli_freqfold_and_rope_repeat_reach_the_converter(tmp_path, capsys, convert_kwargs):
    from kvslim.cli import main

    args = ["convert", "--model", str(tmp_path), "--to", "mla", "--kv-lora-rank", "16", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--freqfold", "two"])
    assert e.value.code == 2 and "--freqfold" in capsys.readouterr().err
    for flags, want in (([], ("auto", 1)), (["--freqfold", "auto", "--rope-repeat", "2"], ("auto", 2)),
                        (["--freqfold", "4"], (4, 1)), (["--calib-pass", "sequential"], (None, 1)),
                        (["--calib-pass", "sequential", "--in-memory"], ("auto", 1)),
                        (["--rank-alloc", "energy"], (None, 1)), (["--method", "mha2mla"], (None, 1)),
                        (["--to", "gqa", "--kv-heads", "1"], (None, 1))):
        assert main([*args, *flags]) == 2
        assert (convert_kwargs["freqfold"], convert_kwargs["rope_repeat"]) == want, flags


@pytest.mark.parametrize("to,kw", [("mla", dict(kv_lora_rank=20, rope_dim=16)), ("gta", {})])
def test_streaming_freqfold_auto_scores_and_chooses_as_in_memory(tmp_path, to, kw):
    from safetensors.torch import load_file

    m = _model(_spec(h_kv=3, h_q=6)).float()
    src = tmp_path / "src"
    save_kvslim(m, src)
    calib = torch.randint(0, VOCAB, (6, 20), generator=torch.Generator().manual_seed(5))
    select = torch.randint(0, VOCAB, (5, 20), generator=torch.Generator().manual_seed(6))
    base = dict(model_dir=src, to=to, fit="output", fmt="kvslim", calib_tokens=calib, progress=False, **kw)
    st = convert_checkpoint(out=tmp_path / "st", freqfold="auto", select_tokens=select, **base)
    mem = convert_checkpoint(out=tmp_path / "mem", freqfold="auto", select_tokens=select, stream=False, **base)
    a, b = st.stats["freqfold_select"], mem.stats["freqfold_select"]
    assert a["chosen"] == b["chosen"] and sorted(a["ppl"]) == sorted(b["ppl"])
    for f in a["ppl"]:
        assert abs(a["ppl"][f] / b["ppl"][f] - 1) < 1e-5, (f, a["ppl"][f], b["ppl"][f])
    convert_checkpoint(out=tmp_path / "fixed", freqfold=a["chosen"], **base)  # the written model is the choice's
    x, y = load_file(tmp_path / "st" / "model.safetensors"), load_file(tmp_path / "fixed" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
