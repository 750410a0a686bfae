"""FlashInfer peer: its paged GQA decode and paged MLA decode on ``decode_problem.Problem``.

FlashInfer comes from the stripped carry in ``.whl/flashinfer/`` (made by
``benchmarks/peers/make_flashinfer_carry.sh``: ``flashinfer-*-stripped.tar.xz`` + the
``apache_tvm_ffi`` cp312 wheel), unpacked once into ``KVSLIM_FLASHINFER_SITE``
(default ``/tmp/kvslim_flashinfer/site``) and put first on ``sys.path``; without a carry an
installed ``flashinfer`` is used. Its kernels are JIT-compiled with nvcc at first use
(cache under ``FLASHINFER_WORKSPACE_BASE``, default ``/tmp/kvslim_flashinfer``; ``MAX_JOBS``
defaults to 16; ``FLASHINFER_CUDA_ARCH_LIST`` to the GPU's, e.g. ``9.0a``).

Inputs are views of our cache, not copies:

- GQA: row = ``[K (h_kv*d) | V (h_kv*d)]``, so ``k = cache[..., :kd]`` and ``v = cache[..., kd:]``
  viewed ``[num_pages, page, h_kv, d]`` (NHD) have identical strides, which FlashInfer's
  paged K/V tuple accepts; the page table is our block table flattened (CSR indptr).
- MLA: row = ``[latent 512 | rope 64]`` is FlashInfer's *packed* paged KV
  (``[num_pages, page, 576]``, ckv/kpe split inside), and q ``[B, q_len, h, 576]`` its packed query.

GTA / GLA rows (S state heads + one shared rope key) have no FlashInfer layout.

Every entry point fails soft: ``flashinfer_peers(p)`` returns ``({name: (fn, to_bqhd)}, notes)``
where a refused or broken variant becomes a one-line note "flashinfer-...: could not run: ...".
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import shutil
import sys
import tarfile
import time
import types
import zipfile

import torch

DT = torch.bfloat16
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARRY = os.environ.get("KVSLIM_FLASHINFER_CARRY", os.path.join(_REPO, ".whl", "flashinfer"))
SITE = os.environ.get("KVSLIM_FLASHINFER_SITE", "/tmp/kvslim_flashinfer/site")
WORKSPACE_MB = int(os.environ.get("KVSLIM_FLASHINFER_WORKSPACE_MB", "512"))

# Optional FlashInfer dependencies that the decode / MLA paths never use. If `import
# flashinfer` fails on one of these (a hard import somewhere in its package), an empty
# stand-in module is put in sys.modules and the import retried; each one is reported.
OPTIONAL_DEPS = (  # top-level names (cuda = cuda-python / cuda-bindings / cuda-tile)
    "cuda",
    "cudnn",
    "nccl4py",
    "nccl",
    "nccl_extensions",
    "cutlass",
    "nvidia_cutlass_dsl",
    "pynvml",
    "einops",
    "tabulate",
)

_FI = None
STANDINS: list[str] = []
ENV_NOTES: list[str] = []


def reason(e: BaseException) -> str:
    """One line: exception type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}".rstrip(": ")


def _unpack_carry() -> str | None:
    """Unpack the carry into SITE (once per carry contents); returns SITE or None without a carry."""
    tars = sorted(glob.glob(os.path.join(CARRY, "flashinfer-*-stripped.tar.xz")))
    wheels = sorted(glob.glob(os.path.join(CARRY, "apache_tvm_ffi-*.whl")))
    if not tars:
        return None
    stamp = ";".join(f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in tars + wheels)
    marker = os.path.join(SITE, ".kvslim_carry")
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == stamp:
                return SITE
    shutil.rmtree(SITE, ignore_errors=True)
    os.makedirs(SITE)
    for t in tars:
        with tarfile.open(t) as tf:
            try:
                tf.extractall(SITE, filter="data")
            except TypeError:  # Python without extraction filters
                tf.extractall(SITE)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(SITE)
    with open(marker, "w") as f:
        f.write(stamp)
    return SITE


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the first toolkit with bin/nvcc and include/cuda_runtime.h."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for sp in sys.path:
        cands += sorted(glob.glob(os.path.join(sp, "nvidia", "cu1*")), reverse=True)
    for c in cands:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def _setup_env() -> None:
    """JIT settings: cache in /tmp, the GPU's arch, 16 parallel nvcc jobs, ninja + nvcc found."""
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/kvslim_flashinfer")
    # tvm-ffi JIT-builds a small torch DLPack addon at import when torch lacks the C exchange API
    os.environ.setdefault("TVM_FFI_CACHE_DIR", "/tmp/kvslim_flashinfer/tvm-ffi")
    os.environ.setdefault("MAX_JOBS", "16")
    if "FLASHINFER_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["FLASHINFER_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # FlashInfer adds the suffix: 9.0 -> 90a
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pip package ships the binary

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except Exception:
            pass
    home = _find_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
        lib = os.path.join(home, "lib")
        if not os.path.isdir(os.path.join(home, "lib64")) and os.path.isdir(lib):
            # pip-style toolkits keep libcudart in lib/; FlashInfer links with -L$cuda_home/lib64
            os.environ["FLASHINFER_EXTRA_LDFLAGS"] = (
                os.environ.get("FLASHINFER_EXTRA_LDFLAGS", "") + f" -L{lib}"
            ).strip()
    ENV_NOTES[:] = [
        f"CUDA_HOME={os.environ.get('CUDA_HOME')}",
        f"ninja={shutil.which('ninja')}",
        f"FLASHINFER_CUDA_ARCH_LIST={os.environ.get('FLASHINFER_CUDA_ARCH_LIST')}",
        f"MAX_JOBS={os.environ.get('MAX_JOBS')}",
        f"FLASHINFER_WORKSPACE_BASE={os.environ.get('FLASHINFER_WORKSPACE_BASE')}",
    ]


def load_flashinfer():
    """Import FlashInfer (carry first), with stand-ins only for optional deps that break the import."""
    global _FI
    if _FI is not None:
        return _FI
    site = _unpack_carry()
    if site and site not in sys.path:
        sys.path.insert(0, site)
    _setup_env()
    if site is None and importlib.util.find_spec("flashinfer") is None:
        raise ImportError(f"no FlashInfer carry in {CARRY} and no installed flashinfer")
    for _ in range(32):
        try:
            import flashinfer  # noqa: F401
            import flashinfer.mla  # noqa: F401

            _FI = sys.modules["flashinfer"]
            return _FI
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing.split(".")[0] not in OPTIONAL_DEPS or missing in sys.modules:
                raise
            for m in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
                del sys.modules[m]
            parts = missing.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    mod = types.ModuleType(name)
                    mod.__path__ = []  # a package, so submodule imports resolve to further stand-ins
                    sys.modules[name] = mod
            STANDINS.append(missing)
    raise ImportError("import flashinfer kept failing on optional dependencies: " + ", ".join(STANDINS))


def describe() -> str:
    """Version, file and stand-ins of the loaded FlashInfer (for the run log)."""
    fi = _FI
    if fi is None:
        return "flashinfer not loaded"
    s = f"flashinfer {getattr(fi, '__version__', '?')} from {os.path.dirname(fi.__file__)}"
    if STANDINS:
        s += "; stand-ins for " + ", ".join(STANDINS)
    return s + "; " + " ".join(ENV_NOTES)


def _workspace(device) -> torch.Tensor:
    return torch.zeros(WORKSPACE_MB << 20, dtype=torch.uint8, device=device)


def _csr(p):
    """CSR page table from our block table: (indptr, indices view, last_page_len)."""
    B, npp = p.block_table.shape
    dev = p.cache.device
    indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * npp
    indices = p.block_table.reshape(-1)  # contiguous [B, npp] -> a view
    last = (p.seq_lens - (npp - 1) * p.page).to(torch.int32)
    return indptr, indices, last


def gqa_decode(p, use_tensor_cores: bool = False, backend: str = "fa2"):
    """FlashInfer BatchDecodeWithPagedKVCacheWrapper on views of our [K|V] rows.

    Returns (fn, to_bqhd): fn() runs the planned kernel and returns its output, to_bqhd
    reshapes that to [B, q_len, h_q, d] for the correctness check.
    """
    fi = load_flashinfer()
    if p.tied:
        raise ValueError("not a separate-KV (GQA) problem")
    if p.q_len > 1 and not use_tensor_cores:
        raise ValueError("CUDA-core decode kernel takes q_len = 1 only")
    kd = p.h_kv * p.d
    k = p.cache[..., :kd].unflatten(-1, (p.h_kv, p.d))  # [pages, page, h_kv, d], row stride
    v = p.cache[..., kd : 2 * kd].unflatten(-1, (p.h_kv, p.d))
    assert k.stride() == v.stride() and k.data_ptr() == p.cache.data_ptr()
    indptr, indices, last = _csr(p)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(
        _workspace(p.cache.device), "NHD", use_tensor_cores=use_tensor_cores, backend=backend
    )
    kw = dict(q_data_type=DT, kv_data_type=DT, sm_scale=p.scale)
    if p.q_len > 1:
        kw["q_len_per_req"] = p.q_len
    w.plan(indptr, indices, last, p.h_q, p.h_kv, p.d, p.page, **kw)
    q = p.q.reshape(p.B * p.q_len, p.h_q, p.d)  # view
    out = torch.empty_like(q)

    def fn():
        return w.run(q, (k, v), out=out)

    return fn, lambda o: o.view(p.B, p.q_len, p.h_q, p.d)


def mla_decode(p, backend: str = "fa2"):
    """FlashInfer BatchMLAPagedAttentionWrapper on our packed [latent | rope] rows."""
    fi = load_flashinfer()
    if not p.tied or p.S != 1:
        raise ValueError("GTA/GLA rows (S state heads + a shared rope key) have no FlashInfer layout")
    if p.nope != p.sd or p.dv != p.sd:
        raise ValueError("not an MLA row (key must be the whole latent + rope)")
    B, ql, H = p.B, p.q_len, p.h_q
    dev = p.cache.device
    indptr, indices, _ = _csr(p)
    qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * ql
    kv_len = p.seq_lens.to(torch.int32)
    w = fi.mla.BatchMLAPagedAttentionWrapper(_workspace(dev), backend=backend)
    q = p.q.reshape(B * ql, H, p.dqk)  # packed [latent | rope] query, a view
    out = torch.empty(B * ql, H, p.dv, dtype=DT, device=dev)
    common = dict(
        num_heads=H,
        head_dim_ckv=p.sd,
        head_dim_kpe=p.rope,
        page_size=p.page,
        causal=ql > 1,
        sm_scale=p.scale,
        q_data_type=DT,
        kv_data_type=DT,
    )
    meta_cls = getattr(fi.mla, "MLAPlanMetadata", None)
    if meta_cls is not None:  # canonical form (0.7.x): packed query and packed paged KV
        w.plan(metadata=meta_cls.csr(qo_indptr, indptr, indices, kv_len), **common)

        def fn():
            return w.run(query=q, kv_cache=p.cache, out=out)

    else:  # older FlashInfer: split q_nope / q_pe and ckv / kpe views
        w.plan(qo_indptr, indptr, indices, kv_len, **common)
        q_nope, q_pe = q[..., : p.sd], q[..., p.sd :]
        ckv, kpe = p.cache[..., : p.sd], p.cache[..., p.sd : p.sd + p.rope]

        def fn():
            return w.run(q_nope, q_pe, ckv, kpe, out=out)

    return fn, lambda o: o.view(B, ql, H, p.dv)


def variants(p):
    """[(name, builder)] that apply to this problem (all FlashInfer paths we time)."""
    if not p.tied:
        out = []
        if p.q_len == 1:
            out.append(("flashinfer-decode", lambda: gqa_decode(p, False, "fa2")))
        out.append(("flashinfer-tc-fa2", lambda: gqa_decode(p, True, "fa2")))
        if os.environ.get("KVSLIM_FLASHINFER_FA3_TC") == "1" and p.q_len == 1:
            # FA3 prefill kernels as decode: 10 sm90 sources (cute/cutlass, curand headers)
            out.append(("flashinfer-tc-fa3", lambda: gqa_decode(p, True, "fa3")))
        return out
    if p.S == 1 and p.nope == p.sd:
        out = [("flashinfer-mla-fa2", lambda: mla_decode(p, "fa2"))]
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
            out.append(("flashinfer-mla-fa3", lambda: mla_decode(p, "fa3")))
        return out
    return []


def flashinfer_peers(p, log=print):
    """({name: (fn, to_bqhd)}, [one-line notes]) for this problem; never raises."""
    notes = []
    try:
        load_flashinfer()
    except Exception as e:
        return {}, [f"flashinfer: could not run: {reason(e)}"]
    vs = variants(p)
    if not vs:
        return {}, [
            "flashinfer: could not run: GTA/GLA rows (S state heads + a shared rope key) not expressible"
        ]
    out = {}
    for name, build in vs:
        t0 = time.time()
        try:
            fn, to_bqhd = build()
            fn()
            torch.cuda.synchronize()
            out[name] = (fn, to_bqhd)
            log(f"  {name}: planned (+JIT build if first use) in {time.time() - t0:.1f} s")
        except Exception as e:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            notes.append(f"{name}: could not run: {reason(e)}")
    return out, notes
