"""Argument parsing of the GPU-only benchmark tools (their runs need a device; their inputs are checked here)."""

from __future__ import annotations

import pytest

from benchmarks.ncu_decode import parse_case


def test_ncu_decode_case_parsing():
    assert parse_case("mla:16:64:8192:64:fp8") == ("mla", 16, 64, 8192, 64, "fp8")
    with pytest.raises(SystemExit, match="variant:h_q:B:L:page:kv"):
        parse_case("mla:16:64")
    with pytest.raises(SystemExit, match="must be integers"):
        parse_case("mla:x:64:8192:64:bf16")
    with pytest.raises(SystemExit, match="kv must be bf16 or fp8"):
        parse_case("mla:16:64:8192:64:int4")


def test_convert_memory_llama8b_writer_tiny(tmp_path):
    """``convert_memory --llama8b``'s checkpoint at a tiny width: HF Llama shards + index that transformers and
    kvslim load alike, streamed to MLA (the case's target, smaller rank), and the output checker."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    from benchmarks.convert_memory import LLAMA3_8B, LLAMA8B_TARGET, verify_output, write_random_llama
    from kvslim.convert import convert_checkpoint
    from kvslim.convert.tensorio import LazyCheckpoint
    from kvslim.model import Transformer

    shape = dict(LLAMA3_8B, num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=96, vocab_size=211)
    src = tmp_path / "src"
    info = write_random_llama(src, shape, shard_bytes=40_000)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in src.glob("*.safetensors"))
    assert info["shards"] == len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == info["bytes"]
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["rope_theta"] == 500000.0 and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16 and cfg["torch_dtype"] == "bfloat16"
    ck = LazyCheckpoint(src)
    assert ck.num_params * 2 == info["bytes"] and len(ck.shapes) == info["tensors"]
    assert all(ck.get(f"model.layers.{i}.input_layernorm.weight").eq(1).all() for i in range(3))
    assert float(ck.get("lm_head.weight").std()) == pytest.approx(0.02, rel=0.1)
    ids = torch.randint(0, 211, (1, 12), generator=torch.Generator().manual_seed(0))
    hf = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)

    out = tmp_path / "out"
    res = convert_checkpoint(model_dir=src, out=out, calib_tokens=torch.randint(0, 211, (2, 16)), progress=False,
                             **dict(LLAMA8B_TARGET, kv_lora_rank=16, rope_dim=8))
    assert res.target.kind == "mla" and res.target.latent_dim == 16 and res.export["fp16_ok"]
    v = verify_output(out)
    assert v["layers"] == v["config_layers"] == 3 and v["kind"] == "mla" and v["files"] == 1
    assert v["tensors"] == len(load_file(out / "model.safetensors"))
    sd = load_file(out / "model.safetensors")  # a non-finite or missing tensor is named
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, out / "model.safetensors")
    with pytest.raises(ValueError, match="non-finite tensors.*layers.1.mlp.up_proj"):
        verify_output(out)
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, out / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.2.mlp.up_proj"):
        verify_output(out)


def test_engine_roofline_page_sizes():
    from benchmarks.engine_roofline import page_sizes

    assert page_sizes("auto") == ["auto"]
    assert page_sizes("16,64,auto") == [16, 64, "auto"]
    for bad in ("0", "-16", "sixteen", "16,", "16.0"):
        with pytest.raises(SystemExit, match="--page-size"):
            page_sizes(bad)
