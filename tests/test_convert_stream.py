"""Streaming conversion (kvslim/convert/stream.py) == in-memory conversion, byte for byte.

Both paths calibrate every layer on the source model's activations with the same batches and
the same fp32-per-batch / fp64-across-batches accumulation, convert each layer with the same
converter code and lay the file out as ``save_file`` does, so the outputs must be *identical*
(``model.safetensors`` bytes, ``config.json``, stats and the DeepSeek report), not merely close.
Also: bad input fails before anything is written, a write killed mid-stream leaves no corrupt
``--out`` and the next command cleans up, and the incremental writer's file equals save_file's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvslim.checkpoint import STAMP
from kvslim.convert import convert_checkpoint
from kvslim.convert.tensorio import LazyCheckpoint, SafetensorsWriter
from kvslim.testing import tiny_model, tiny_spec

ENV = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _hf_llama(path: Path, layers: int = 4, shard: str | None = None) -> Path:
    """A tiny random SmolLM2-like (tied embeddings, GQA-3, eps 1e-5) Hugging Face Llama directory
    (``shard``: ``max_shard_size``, for a multi-file source with an index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, max_position_embeddings=128, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-src")
    hf = _hf_llama(root / "hf")
    sharded = _hf_llama(root / "sharded", shard="60KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    qwen = tiny_model(tiny_spec("gqa-2", qkv_bias=True), layers=3, tie=False)
    with torch.no_grad():  # Qwen2-like: non-zero q/k/v biases
        for name, p in qwen.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(0.1 * torch.randn_like(p))
    qwen.save_pretrained(root / "qwen")
    return {"hf": hf, "sharded": sharded, "qwen": root / "qwen"}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".kvslim-" in p.name)


CASES = [  # (source, to, options)
    ("hf", "mla", dict(kv_lora_rank=16, rope_dim=8)),  # DeepSeek export (default format)
    ("hf", "mla", dict(kv_lora_rank=12, rope_dim=8, fit="output", fmt="kvslim", dtype="bfloat16")),
    ("hf", "gla", dict(latent_heads=3, kv_lora_rank=8, rope_dim=8)),
    ("hf", "gla", dict(latent_heads=3, kv_lora_rank=8, rope_dim=8, fmt="deepseek", target="vllm")),
    ("hf", "gta", dict()),
    ("hf", "mla", dict(kv_lora_rank=32, rope_dim=8, fit="output", fmt="kvslim", rank_alloc="energy",
                       calib_shrinkage=0.2, calib_shrink_to="diagonal")),
    ("hf", "gta", dict(fit="output", calib_shrinkage=0.2, calib_pass="sequential")),
    ("hf", "gta", dict(fmt="deepseek", gta_state="key")),
    ("hf", "gqa", dict(kv_heads=1, fmt="hf")),
    ("sharded", "mla", dict(kv_lora_rank=16, rope_dim=8)),
    ("qwen", "mla", dict(kv_lora_rank=16, rope_dim=8, fmt="kvslim")),
    ("qwen", "gqa", dict(kv_heads=1)),
]


@pytest.mark.parametrize("source,to,opts", CASES, ids=[f"{s}-{t}-{o.get('fmt', 'default')}" for s, t, o in CASES])
def test_streaming_is_byte_identical_to_in_memory(sources, tmp_path, source, to, opts):
    src = sources[source]
    calib = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))  # 2 batches of 4, ragged
    res = {}
    for stream in (False, True):
        res[stream] = convert_checkpoint(model_dir=src, out=tmp_path / str(stream), to=to, calib_tokens=calib,
                                         progress=False, stream=stream, **opts)
    a, b = tmp_path / "False", tmp_path / "True"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        if f.name != STAMP:  # the write id
            assert (b / f.name).read_bytes() == f.read_bytes(), f.name
    assert res[True].stats == res[False].stats
    assert res[True].export == res[False].export
    assert res[True].target == res[False].target and res[True].num_layers == res[False].num_layers
    assert len(load_file(b / "model.safetensors")) > 0 and not _hidden(tmp_path)


def test_streaming_reads_one_layer_at_a_time(sources, tmp_path, monkeypatch):
    """No read asks for tensors of two layers, and every layer is read once (the shell per layer)."""
    reads = []
    orig = LazyCheckpoint.tensors

    def spy(self, names, **kw):
        names = list(names)
        reads.append({n.split(".")[2] for n in names if n.startswith("model.layers.")})
        return orig(self, names, **kw)

    monkeypatch.setattr(LazyCheckpoint, "tensors", spy)
    convert_checkpoint(model_dir=sources["hf"], out=tmp_path / "o", to="mla", kv_lora_rank=16, rope_dim=8,
                       calib_tokens=torch.randint(0, 97, (4, 16)), progress=False)
    layer_reads = [r for r in reads if r]
    assert all(len(r) == 1 for r in layer_reads)
    assert [next(iter(r)) for r in layer_reads] == ["0", "1", "2", "3"]


def test_big_tensors_are_cast_and_fp16_checked_in_pieces(sources, tmp_path, monkeypatch):
    """The tensors outside the layers are cast ``END_CHUNK_ROWS`` rows at a time from the stored dtype, and
    ``fp16_error`` checks a large tensor in pieces (an 8B model's embedding would otherwise take several
    whole fp32/fp64 copies): the same values, and with tiny pieces streaming still == in-memory, byte for byte."""
    import kvslim.convert.deepseek as ds
    import kvslim.convert.stream as st

    t = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    whole = {f: t.to(torch.float32).double().mul_(f).to(torch.bfloat16) for f in (0.3, 1.0)}
    f32 = torch.randn(37, 11, generator=torch.Generator().manual_seed(1)) * 3  # (bf16 values are exact in fp16)
    err = ds.fp16_error(f32)
    monkeypatch.setattr(st, "END_CHUNK_ROWS", 5)
    monkeypatch.setattr(ds, "FP16_CHECK_CHUNK", 10)
    for f, w in whole.items():
        assert torch.equal(st._end_tensor(t, f, torch.bfloat16), w)
    assert torch.equal(st._end_tensor(t, None, torch.float32), t.float())
    assert torch.equal(st._end_tensor(t[0], None, torch.float16), t[0].float().half())  # a 1-D norm weight
    assert ds.fp16_error(f32) == pytest.approx(err, rel=1e-5) and err > 0
    big = f32.clone()
    big[-1, -1] = 1e6  # overflows fp16 in the last piece only
    assert ds.fp16_error(big) == float("inf")
    assert ds.fp16_error(torch.zeros(40)) == 0.0

    calib = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    res = {}
    for stream in (False, True):
        res[stream] = convert_checkpoint(model_dir=sources["sharded"], out=tmp_path / str(stream), to="mla",
                                         kv_lora_rank=16, rope_dim=8, dtype="bfloat16", calib_tokens=calib,
                                         progress=False, stream=stream)
    a, b = tmp_path / "False", tmp_path / "True"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert res[True].export == res[False].export and res[True].export["fp16_ok"]
    monkeypatch.undo()  # pieces or not, the same file
    convert_checkpoint(model_dir=sources["sharded"], out=tmp_path / "whole", to="mla", kv_lora_rank=16, rope_dim=8,
                       dtype="bfloat16", calib_tokens=calib, progress=False)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case,match", [
    (dict(to="mla", kv_lora_rank=10_000, rope_dim=8), "larger than possible"),
    (dict(to="mla", kv_lora_rank=16, rope_dim=8, calib_tokens=torch.full((2, 8), 101)), "token ids must be in"),
    (dict(to="mla", kv_lora_rank=16, rope_dim=8, calib_tokens=torch.zeros(2, 8, dtype=torch.int32)), "int64"),
    (dict(to="gqa", kv_heads=2), "must divide"),
    (dict(to="gqa", kv_heads=1, fmt="deepseek"), "format 'deepseek'"),
])
def test_bad_options_fail_before_anything_is_written(sources, tmp_path, case, match):
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(model_dir=sources["hf"], out=tmp_path / "out", progress=False, **case)
    assert not (tmp_path / "out").exists() and not _hidden(tmp_path)


def test_bad_sources_are_named_and_nothing_is_written(sources, tmp_path):
    calib = torch.randint(0, 97, (2, 8))
    # q bias cannot go to DeepSeek-V3: found from the lazily read biases, before calibrating
    with pytest.raises(ValueError, match="layer 0 q_proj has a bias"):
        convert_checkpoint(model_dir=sources["qwen"], out=tmp_path / "o", to="mla", kv_lora_rank=16, rope_dim=8,
                           calib_tokens=calib, progress=False)
    # Llama cannot hold biases: refused while writing (after layer 0), and nothing is left behind
    with pytest.raises(ValueError, match="format 'hf'"):
        convert_checkpoint(model_dir=sources["qwen"], out=tmp_path / "o", to="gqa", kv_heads=1, fmt="hf",
                           progress=False)
    assert not (tmp_path / "o").exists() and not _hidden(tmp_path)
    bad = tmp_path / "bad"
    tiny_model(tiny_spec("gqa-2"), layers=2).save_pretrained(bad)
    sd = load_file(bad / "model.safetensors")
    sd.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match="missing .*layers.1.self_attn.k_proj"):
        convert_checkpoint(model_dir=bad, out=tmp_path / "o", to="gqa", kv_heads=1, progress=False)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        convert_checkpoint(model_dir=bad, out=tmp_path / "o", to="gqa", kv_heads=1, progress=False)
    assert not (tmp_path / "o").exists() and not _hidden(tmp_path)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvslim", "convert", *map(str, args)], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, timeout=300)


def test_killed_streaming_write_leaves_old_or_nothing_and_is_cleaned_up(sources, tmp_path, capfd):
    args = ("--model", sources["hf"], "--to", "gqa")
    out = tmp_path / "out"
    r = _cli(*args, "--kv-heads", "1", "--out", out, env={"KVSLIM_CRASH_AT": "stream-layer-1"})  # 2 of 4 layers
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists() and _hidden(tmp_path)  # only a hidden partial directory
    convert_checkpoint(model_dir=sources["hf"], out=out, to="gqa", kv_heads=1, progress=False)  # the next command
    assert "interrupted write" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    before = (out / "model.safetensors").read_bytes()
    r = _cli(*args, "--kv-heads", "3", "--out", out, "--force", env={"KVSLIM_CRASH_AT": "stream-layer-2"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == before  # the old output, untouched
    assert load_file(out / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"].shape[0] == 16
    LazyCheckpoint(out)  # reading it cleans up too
    assert not _hidden(tmp_path)


def test_writer_matches_save_file_and_checks_its_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    d = {"b.w": torch.randn(3, 2, generator=g), "a.w": torch.randn(5, generator=g).bfloat16(),
         "model.layers.10.x": torch.ones(1), "model.layers.2.x": torch.randn(1, dtype=torch.float64, generator=g),
         "empty": torch.zeros(0), "h": torch.randn(7, generator=g).half(), "i": torch.arange(3),
         "j": torch.arange(4, dtype=torch.int32), "scalar": torch.tensor(3.0)}
    save_file(d, tmp_path / "a.safetensors", metadata={"format": "pt"})
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in d.items()}
    w = SafetensorsWriter(tmp_path / "b.safetensors", layout, {"format": "pt"})
    for k in reversed(list(d)):
        w.write(k, d[k])
    w.close()
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    w = SafetensorsWriter(tmp_path / "c.safetensors", layout)
    for bad, match in ((("b.w", torch.randn(2, 3)), "planned"), (("b.w", torch.randn(3, 2).double()), "planned"),
                       (("nope", torch.ones(1)), "not in the planned layout")):
        with pytest.raises(ValueError, match=match):
            w.write(*bad)
    w.write("b.w", d["b.w"])
    with pytest.raises(ValueError, match="written twice"):
        w.write("b.w", d["b.w"])
    with pytest.raises(ValueError, match="were not written"):
        w.close()
