"""SGLang's Triton decode kernel, loaded from its source file with stand-ins for its imports.

Its ``srt/layers/attention/triton_ops/decode_attention.py`` only needs ``is_hip`` (and, in
some versions, ``get_device_core_count`` / ``envs``) from sglang; the file is carried in
``.whl/peers/`` (see benchmarks/NOTES.md, "Peers") or named by ``KVSLIM_SGLANG_DECODE``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

DT = torch.bfloat16
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SGLANG_SRC = os.environ.get("KVSLIM_SGLANG_DECODE", ".whl/peers/sgl_decode_attention.py")

_SGL = None


def _src_path() -> str:
    if os.path.isabs(SGLANG_SRC) or os.path.exists(SGLANG_SRC):
        return SGLANG_SRC
    return os.path.join(_REPO, SGLANG_SRC)  # relative to the repo root, whatever the cwd


def load_sglang():
    """SGLang's decode_attention.py from its source file, with stand-ins for its imports."""
    global _SGL
    if _SGL is not None:
        return _SGL
    src = _src_path()
    if not os.path.exists(src):
        raise FileNotFoundError(f"{SGLANG_SRC} not found (unzip sglang's wheel there)")
    for name in ("sglang", "sglang.srt"):
        sys.modules.setdefault(name, types.ModuleType(name))
    utils = types.ModuleType("sglang.srt.utils")
    utils.is_hip = lambda: False
    utils.get_device_core_count = lambda *a: torch.cuda.get_device_properties(0).multi_processor_count
    sys.modules["sglang.srt.utils"] = utils
    envs = types.ModuleType("sglang.srt.environ")
    envs.envs = types.SimpleNamespace()
    sys.modules["sglang.srt.environ"] = envs
    spec = importlib.util.spec_from_file_location("sgl_decode_attention", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _SGL = mod
    return mod


def sglang_peer(p, timer):
    """SGLang Triton decode (page size 1 token pool), best of 4-32 splits timed by ``timer(fn)``.

    Returns ``((seconds, fn, splits), None)`` or ``(None, why)``.
    """
    if p.q_len != 1:
        return None, "q_len > 1 not supported by its decode kernel"
    if p.tied and p.S != 1:
        return None, "GTA/GLA rows (shared rope key after S state heads) not expressible"
    mod = load_sglang()
    n_tok = p.B * p.L
    if p.tied:
        buf = torch.randn(n_tok, 1, p.row, device="cuda", dtype=DT).mul_(0.5)
        kbuf, vbuf = buf, buf[..., : p.dv]
    else:
        buf = torch.randn(n_tok, 2 * p.h_kv, p.d, device="cuda", dtype=DT).mul_(0.5)
        kbuf, vbuf = buf[:, : p.h_kv], buf[:, p.h_kv :]
    kv_indices = torch.randperm(n_tok, device="cuda").to(torch.int32)
    kv_indptr = torch.arange(0, n_tok + 1, p.L, device="cuda", dtype=torch.int32)
    q = p.q[:, 0].contiguous()
    o = torch.empty(p.B, p.h_q, p.dv, device="cuda", dtype=DT)
    best = None
    for splits in (4, 8, 16, 32):
        logits = torch.empty(p.B, p.h_q, splits, p.dv, device="cuda", dtype=torch.float32)
        lse = torch.empty(p.B, p.h_q, splits, device="cuda", dtype=torch.float32)
        nsp = torch.full((p.B,), splits, device="cuda", dtype=torch.int32)

        def fn(logits=logits, lse=lse, nsp=nsp, splits=splits):
            mod.decode_attention_fwd(
                q, kbuf, vbuf, o, kv_indptr, kv_indices, logits, lse, nsp, splits, p.scale, 1.0, 1.0
            )
            return o

        t = timer(fn)
        if best is None or t < best[0]:
            best = (t, fn, splits)
    return best, None
