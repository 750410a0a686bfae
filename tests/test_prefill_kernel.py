"""Prefill ("extend") kernels (kvslim/kernels/prefill.py) vs an fp64 torch oracle, and their wiring.

Every row layout (separate MHA/GQA/MQA; tied GTA, MLA with one latent head, GLA with two),
ragged lengths (chunks that are the whole sequence next to long cached histories), chunk
lengths 1 … 200, page sizes 5, 16, 64, fp16/bf16/fp32 and packed fp8 rows. Every cache slot
the kernel must not read (pages no sequence owns, slots past a sequence's length, block-table
entries past its last page) is NaN, and so is every output buffer (conftest fixture), so a
stray read or a missed write fails. Tolerance (STYLE.md §5): error vs the fp64 oracle at most
2 x that of the same maths in torch at the input precision, plus one output ulp.
"""

from __future__ import annotations

import os
import zlib
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kvslim.kernels import decode_separate, decode_tied, prefill_separate, prefill_tied  # noqa: E402
from kvslim.kernels.prefill import prefill_separate_triton, prefill_tied_triton  # noqa: E402
from kvslim.kernels.reference import prefill_separate_ref, prefill_tied_ref  # noqa: E402
from kvslim.rows import RowFormat, dequantize_rows, quantize_rows  # noqa: E402
from kvslim.testing import TINY_PRESETS, assert_close, tiny_model, tiny_spec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 2**-17, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def paged(B, lens, page, row, dtype, seed, fmt=None):
    """A paged cache with shuffled pages, two spare block-table columns and unreferenced pages.

    Every slot no sequence owns is poisoned: NaN for a float cache, 0xFF bytes (NaN as e4m3 and as
    an fp32 scale) for a packed fp8 one; spare block-table entries point at such pages."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lens) + 2
    num_pages = B * max_pages + 3
    rows = torch.randn(num_pages, page, fmt.row_dim if fmt else row, generator=g)
    if fmt is not None:
        rows[..., 0] *= 30  # an outlier channel: its tile gets a large scale
    cache = quantize_rows(rows, fmt) if fmt is not None else rows.to(dtype)
    bt = torch.randperm(num_pages, generator=g)[: B * max_pages].reshape(B, max_pages).to(torch.int32)
    owned = torch.zeros(num_pages, page, dtype=torch.bool)
    for b, n in enumerate(lens):
        for t in range(n):
            owned[bt[b, t // page], t % page] = True
    cache[~owned] = 0xFF if fmt is not None else float("nan")
    sl = torch.tensor(lens, dtype=torch.int32)
    return cache.to(DEVICE), bt.to(DEVICE), sl.to(DEVICE), g


def check(o, lse, ref, kw, q, cache, bt, sl, fmt, dtype):
    """Kernel ``(o, lse)`` vs the fp64 oracle, bounded by the same maths in ``dtype`` (the baseline)."""
    ro, rl = ref(q.double(), cache, bt, sl, kv_format=fmt, acc_dtype=torch.float64, **kw)
    deq = dequantize_rows(cache, fmt, dtype) if fmt is not None else cache
    bo, bl = ref(q, deq, bt, sl, acc_dtype=dtype, **kw)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and o.shape == ro.shape
    assert_close(o, ro, baseline=bo, atol=ATOL[dtype], msg="o:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[dtype], msg="lse:")


GPU = torch.cuda.is_available()

# (B, T, h_q, h_kv, d_h, page, lens, dtype, config)
SEPARATE_CPU = [
    (2, 9, 3, 3, 16, 16, [9, 40], torch.bfloat16, None),  # MHA; row 0's chunk is its whole sequence
    (3, 17, 6, 2, 32, 5, [17, 90, 30], torch.float16, None),  # GQA-3, page 5 (not a power of two)
    (2, 70, 5, 1, 16, 64, [70, 100], torch.float32, None),  # MQA, 5 heads, page 64 > tile
    (3, 1, 4, 2, 16, 16, [1, 33, 64], torch.bfloat16, None),  # T = 1
    (2, 130, 4, 2, 16, 16, [130, 171], torch.bfloat16, None),  # long chunk
    (2, 20, 6, 3, 24, 5, [20, 47], torch.float16, {"BLOCK_M": 16, "BLOCK_N": 16}),  # d_h 24, unmasked tiles
    (2, 33, 8, 1, 16, 16, [33, 97], torch.float32, {"BLOCK_H": 4, "BLOCK_M": 16, "BLOCK_N": 16}),  # head blocks
    (2, 9, 4, 2, 16, 1, [9, 20], torch.bfloat16, None),  # page size 1
]
SEPARATE_GPU = [
    (4, 512, 32, 8, 128, 16, [512, 3000, 777, 4096], torch.bfloat16, None),  # GQA g_q 4
    (2, 1000, 28, 4, 128, 64, [1000, 2500], torch.float16, None),
    (3, 77, 16, 16, 64, 1, [77, 300, 1111], torch.bfloat16, None),  # MHA, page 1
    (2, 300, 24, 3, 96, 48, [300, 513], torch.float32, None),
]
SEPARATE = SEPARATE_GPU if GPU else SEPARATE_CPU


@pytest.mark.parametrize("case", SEPARATE)
def test_prefill_separate_matches_oracle(case):
    B, T, h_q, h_kv, d, page, lens, dtype, config = case
    cache, bt, sl, g = paged(B, lens, page, 2 * h_kv * d, dtype, zlib.crc32(str(case).encode()))
    q = torch.randn(B, T, h_q, d, generator=g).to(dtype).to(DEVICE)
    kw = dict(num_kv_heads=h_kv, head_dim=d, softmax_scale=d**-0.5)
    o, lse = prefill_separate_triton(q, cache, bt, sl, config=config, **kw)
    check(o, lse, prefill_separate_ref, kw, q, cache, bt, sl, None, dtype)


# (B, T, h_q, S, state_dim, nope, rope, v_dim, page, lens, dtype, config)
TIED_CPU = [
    (2, 17, 4, 2, 32, 16, 16, 32, 5, [17, 60], torch.bfloat16, None),  # GTA-2 (separate key tile)
    (2, 70, 8, 1, 32, 32, 16, 32, 16, [70, 110], torch.float16, None),  # MLA: one latent head
    (2, 9, 8, 2, 32, 32, 16, 32, 64, [9, 75], torch.float32, None),  # GLA-2
    (3, 1, 4, 2, 16, 8, 8, 16, 16, [1, 30, 7], torch.bfloat16, None),  # T = 1
    (1, 200, 4, 1, 32, 32, 16, 32, 16, [260], torch.bfloat16, None),  # long chunk over a history
    (2, 21, 8, 1, 32, 32, 16, 32, 5, [21, 66], torch.float16, {"BLOCK_H": 4, "BLOCK_M": 16, "BLOCK_N": 16}),
    (2, 19, 8, 1, 32, 32, 16, 32, 16, [19, 50], torch.bfloat16, {"DV_SPLIT": 2}),  # MLA, value columns split
    (2, 12, 8, 2, 64, 64, 16, 48, 5, [12, 40], torch.float32, {"DV_SPLIT": 4}),  # GLA-like, d_v < state
    (2, 10, 4, 2, 32, 16, 16, 32, 16, [10, 33], torch.float16, {"DV_SPLIT": 2}),  # GTA + split
]
TIED_GPU = [
    (3, 300, 32, 8, 128, 64, 64, 128, 16, [300, 1234, 4096], torch.bfloat16, None),  # GTA-8
    (2, 700, 16, 1, 512, 512, 64, 512, 64, [700, 3000], torch.bfloat16, None),  # MLA h_q 16
    (1, 257, 128, 1, 512, 512, 64, 512, 64, [2000], torch.bfloat16, None),  # MLA h_q 128 (2 head blocks)
    (2, 400, 32, 2, 256, 256, 64, 256, 16, [400, 1500], torch.float16, None),  # GLA-2
    (1, 333, 128, 1, 512, 512, 64, 512, 64, [1500], torch.bfloat16, {"DV_SPLIT": 2}),  # MLA h_q 128, split d_v
]
TIED = TIED_GPU if GPU else TIED_CPU


@pytest.mark.parametrize("case", TIED)
def test_prefill_tied_matches_oracle(case):
    B, T, h_q, S, sd, nope, rope, dv, page, lens, dtype, config = case
    cache, bt, sl, g = paged(B, lens, page, S * sd + rope, dtype, zlib.crc32(str(case).encode()))
    q = torch.randn(B, T, h_q, nope + rope, generator=g).to(dtype).to(DEVICE)
    kw = dict(num_state_heads=S, state_dim=sd, nope_dim=nope, rope_dim=rope, v_dim=dv,
              softmax_scale=(nope + rope) ** -0.5)
    o, lse = prefill_tied_triton(q, cache, bt, sl, config=config, **kw)
    check(o, lse, prefill_tied_ref, kw, q, cache, bt, sl, None, dtype)


# (kind, B, T, h_q, S, width, page, lens, dtype, tile): width = d_h (separate) or the state (tied);
# "gta": key = half the state + a RoPE key of width / 2; tile None = RowFormat.for_spec's
FP8 = [
    ("separate", 2, 17, 4, 2, 32, 5, [17, 50], torch.bfloat16, None),
    ("separate", 2, 40, 3, 3, 48, 16, [40, 41], torch.float16, None),  # MHA, tile 48 (not a power of two)
    ("tied", 2, 40, 4, 1, 32, 16, [40, 90], torch.float16, None),  # MLA-like
    ("tied", 2, 12, 8, 2, 32, 64, [12, 70], torch.float32, None),  # GLA-like
    ("gta", 2, 9, 4, 2, 32, 64, [9, 70], torch.bfloat16, None),  # key narrower than a tile: no key tile
    ("gta", 2, 11, 4, 2, 48, 5, [11, 30], torch.float16, None),  # separate key tile, tile 48
    ("gta", 2, 10, 4, 2, 32, 16, [10, 45], torch.bfloat16, 16),  # separate key tile of one 16-wide scale tile
    ("tied", 2, 14, 4, 1, 64, 16, [14, 40], torch.bfloat16, 16),  # + DV_SPLIT 2 (config below)
    ("tied", 2, 14, 4, 2, 48, 5, [14, 29], torch.float16, None),  # + DV_SPLIT 2, tile 48 (per-column scales)
]
FP8_CONFIG = {7: {"DV_SPLIT": 2}, 8: {"DV_SPLIT": 2}}  # FP8 index -> launcher config


@pytest.mark.parametrize("i", range(len(FP8)))
def test_prefill_fp8_rows_match_oracle(i):
    case = FP8[i]
    kind, B, T, h_q, S, width, page, lens, dtype, tile = case
    if kind == "separate":
        spec = SimpleNamespace(is_tied=False, head_dim=width, rope_dim=0, row_dim_per_rank=lambda tp: 2 * S * width)
        d_qk = width
        kw = dict(num_kv_heads=S, head_dim=width, softmax_scale=width**-0.5)
        fn, ref = prefill_separate, prefill_separate_ref
    else:
        rope = width // 2 if kind == "gta" else 16
        nope = width // 2 if kind == "gta" else width
        spec = SimpleNamespace(is_tied=True, state_dim=width, rope_dim=rope, row_dim_per_rank=lambda tp: S * width + rope)
        d_qk = nope + rope
        kw = dict(num_state_heads=S, state_dim=width, nope_dim=nope, rope_dim=rope, v_dim=width,
                  softmax_scale=d_qk**-0.5)
        fn, ref = prefill_tied, prefill_tied_ref
    fmt = RowFormat.for_spec(spec, "fp8")
    if tile is not None:
        fmt = RowFormat("fp8", fmt.row_dim, quant=fmt.quant, plain=fmt.plain, tile=tile)
    cache, bt, sl, g = paged(B, lens, page, None, None, zlib.crc32(str(case).encode()), fmt)
    q = torch.randn(B, T, h_q, d_qk, generator=g).to(dtype).to(DEVICE)
    if i in FP8_CONFIG:
        o, lse = prefill_tied_triton(q, cache, bt, sl, kv_format=fmt, config=FP8_CONFIG[i], **kw)
    else:
        o, lse = fn(q, cache, bt, sl, impl="triton", kv_format=fmt, **kw)
    check(o, lse, ref, kw, q, cache, bt, sl, fmt, dtype)


@pytest.mark.parametrize("q_len", [1, 3, 8])
def test_prefill_kernel_equals_decode_kernel(q_len):
    """For q_len <= 8 both kernels compute the same attention (different tiling)."""
    B, lens = 3, [q_len, 40, 77]
    cache, bt, sl, g = paged(B, lens, 16, 2 * 2 * 16, torch.float32, q_len)
    q = torch.randn(B, q_len, 6, 16, generator=g).to(DEVICE)
    kw = dict(num_kv_heads=2, head_dim=16, impl="triton")
    for a, b in zip(prefill_separate(q, cache, bt, sl, **kw), decode_separate(q, cache, bt, sl, **kw)):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    tc, bt, sl, g = paged(B, lens, 5, 2 * 32 + 16, torch.float32, q_len + 1)
    q = torch.randn(B, q_len, 8, 48, generator=g).to(DEVICE)
    kw = dict(num_state_heads=2, state_dim=32, nope_dim=32, rope_dim=16, v_dim=32, softmax_scale=0.1,
              impl="triton")
    for a, b in zip(prefill_tied(q, tc, bt, sl, **kw), decode_tied(q, tc, bt, sl, **kw)):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefill_public_api_torch_equals_triton_and_auto_is_torch_on_cpu():
    cache, bt, sl, g = paged(2, [12, 30], 5, 2 * 16, torch.float32, 7)
    q = torch.randn(2, 12, 2, 16, generator=g).to(DEVICE)
    kw = dict(num_kv_heads=1, head_dim=16)
    ot, lt = prefill_separate(q, cache, bt, sl, impl="triton", **kw)
    orf, lrf = prefill_separate(q, cache, bt, sl, impl="torch", **kw)
    assert_close(ot, orf, atol=1e-5, rtol=1e-5)
    assert_close(lt, lrf, atol=1e-5, rtol=1e-5)
    if DEVICE == "cpu":
        oa, _ = prefill_separate(q, cache, bt, sl, impl="auto", **kw)
        assert torch.equal(oa, orf)


def test_prefill_bad_inputs_raise_clear_errors():
    cache, bt, sl, g = paged(2, [12, 30], 16, 2 * 16, torch.float32, 3)
    q = torch.randn(2, 12, 2, 16, generator=g).to(DEVICE)
    kw = dict(num_kv_heads=1, head_dim=16, impl="triton")
    host = dict(kw, impl="torch")  # the length checks need the lengths on the host (not on the CUDA path)
    with pytest.raises(ValueError, match="q must be a 4-D"):
        prefill_separate(q[0], cache, bt, sl, **kw)
    with pytest.raises(ValueError, match="q_len .* >= 1"):
        prefill_separate(q[:, :0], cache, bt, sl, **kw)
    with pytest.raises(ValueError, match="every seq_len must be >= q_len=12"):
        prefill_separate(q, cache, bt, torch.tensor([11, 30], dtype=torch.int32, device=DEVICE), **host)
    with pytest.raises(ValueError, match="exceeds block_table capacity"):
        prefill_separate(q, cache, bt, torch.tensor([12, 16 * bt.shape[1] + 1], dtype=torch.int32, device=DEVICE),
                         **host)
    with pytest.raises(ValueError, match="block_table must be int32"):
        prefill_separate(q, cache, bt.long(), sl, **kw)
    with pytest.raises(ValueError, match="impl must be one of"):
        prefill_separate(q, cache, bt, sl, num_kv_heads=1, head_dim=16, impl="cuda")
    with pytest.raises(TypeError, match="cache dtype"):
        prefill_separate(q.half(), cache, bt, sl, **kw)
    with pytest.raises(ValueError, match="num_state_heads=3 must divide h_q=2"):
        prefill_tied(q, cache, bt, sl, num_state_heads=3, state_dim=8, nope_dim=8, rope_dim=8, v_dim=8,
                     softmax_scale=0.1, impl="triton")
    with pytest.raises(ValueError, match="nope_dim=24 and v_dim=8 must be <= state_dim=16"):
        prefill_tied(q, cache, bt, sl, num_state_heads=1, state_dim=16, nope_dim=24, rope_dim=16, v_dim=8,
                     softmax_scale=0.1, impl="triton")
    with pytest.raises(ValueError, match="DV_SPLIT=3 must be a power of two"):
        prefill_tied_triton(q, cache, bt, sl, num_state_heads=1, state_dim=16, nope_dim=8, rope_dim=16, v_dim=16,
                            softmax_scale=0.1, config={"DV_SPLIT": 3})
    with pytest.raises(ValueError, match="BLOCK_H=3 must be a power of two"):
        prefill_separate_triton(q, cache, bt, sl, num_kv_heads=1, head_dim=16, softmax_scale=0.25,
                                config={"BLOCK_H": 3})
    with pytest.raises(ValueError, match=r"q_len must be in \[1, 8\] \(longer chunks"):
        decode_separate(q, cache, bt, sl, **kw)


def test_prefill_clamps_seq_len_to_the_block_table_without_reading_past_it():
    """The kernel path never reads the lengths on the host: a seq_len past the block table is clamped."""
    cache, bt, sl, g = paged(1, [20], 16, 2 * 16, torch.float32, 5)
    q = torch.randn(1, 9, 2, 16, generator=g).to(DEVICE)
    big = torch.tensor([10_000], dtype=torch.int32, device=DEVICE)
    cap = torch.tensor([16 * bt.shape[1]], dtype=torch.int32, device=DEVICE)
    o, lse = prefill_separate_triton(q, cache.nan_to_num(0.0), bt, big, num_kv_heads=1, head_dim=16,
                                     softmax_scale=0.25)
    ro, rl = prefill_separate_ref(q, cache.nan_to_num(0.0), bt, cap, num_kv_heads=1, head_dim=16, softmax_scale=0.25)
    assert_close(o, ro, atol=1e-5, rtol=1e-5)
    assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def _no_fallback(*args, **kwargs):
    raise AssertionError("the kernel path fell back to SDPA")


@pytest.mark.parametrize("kind,kv_dtype,page", [(k, None, 16) for k in TINY_PRESETS]
                         + [("gqa-2", "fp8", 5), ("mla", "fp8", 16)])
def test_model_prefill_chunk_on_kernel_matches_cpu_path(kind, kv_dtype, page, monkeypatch):
    """A 40-token chunk on top of 30 / 23 cached tokens: impl='triton' (the prefill kernel) gives the
    logits of the CPU path (SDPA over the gathered cache) and never takes that path itself."""
    from kvslim.attention.base import AttentionBase

    model = tiny_model(tiny_spec(kind)).to(DEVICE)
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    prompt = torch.randint(0, 97, (2, 30), generator=g).to(DEVICE)
    chunk = torch.randint(0, 97, (2, 40), generator=g).to(DEVICE)
    cpu_path = "torch" if GPU else "auto"  # SDPA over fresh / gathered rows (on CUDA 'auto' is the kernel)
    logits = {}
    for impl in (cpu_path, "triton"):
        model.set_attention_options(impl=cpu_path)
        cache = model.new_cache(2, 80, page_size=page, kv_dtype=kv_dtype)
        with torch.no_grad():
            model(prompt, cache)
            cache.seq_lens[1] = 23  # ragged: row 1 drops its last 7 tokens (stale rows, overwritten)
            model.set_attention_options(impl=impl)
            with monkeypatch.context() as m:
                if impl == "triton":
                    m.setattr(AttentionBase, "_attend_gathered", _no_fallback)
                    m.setattr(AttentionBase, "_attend_fresh", _no_fallback)
                logits[impl] = model(chunk, cache)
        assert cache.seq_lens.tolist() == [70, 63]
    assert_close(logits["triton"], logits[cpu_path], atol=2e-4, rtol=2e-4, msg=kind)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need CUDA")
def test_prefill_is_cuda_graph_capturable():
    """No host sync in the launch: capture it, change the lengths in place, replay."""
    cache, bt, sl, g = paged(2, [100, 300], 16, 2 * 8 * 128, torch.bfloat16, 11)
    q = torch.randn(2, 64, 32, 128, generator=g).to(torch.bfloat16).to(DEVICE)
    kw = dict(num_kv_heads=8, head_dim=128, impl="triton")
    prefill_separate(q, cache, bt, sl, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = prefill_separate(q, cache, bt, sl, **kw)
    sl.copy_(torch.tensor([64, 250], dtype=torch.int32))
    graph.replay()
    ro, rl = prefill_separate(q, cache, bt, sl, **kw)
    assert torch.equal(o, ro) and torch.equal(lse, rl)


@pytest.mark.parametrize("kind", TINY_PRESETS)
def test_runner_first_chunk_path(kind, monkeypatch):
    """A first prefill chunk (every start 0, known on the host): latent attention runs SDPA on its own
    expanded rows (``fresh_prefill_sdpa``), the others the prefill kernel; logits equal the cacheless forward."""
    from kvslim.attention.base import AttentionBase
    from kvslim.engine.runner import ModelRunner

    model = tiny_model(tiny_spec(kind)).to(DEVICE)
    model.set_attention_options(impl="triton")
    latent = type(model.model.layers[0].self_attn).fresh_prefill_sdpa
    runner = ModelRunner(model, num_pages=16, page_size=16, max_pages_per_seq=4, max_batch=2, cuda_graphs=False)
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    prompts = torch.randint(0, 97, (2, 20), generator=g)
    with monkeypatch.context() as m:
        if latent:
            m.setattr(type(model.model.layers[0].self_attn), "decode", _no_fallback)
        else:
            m.setattr(AttentionBase, "_attend_fresh", _no_fallback)
        got = runner.prefill(prompts.tolist(), [0, 0], [[1, 2], [3, 4]])
    with torch.no_grad():
        want = model(prompts.to(DEVICE))[:, -1].float()
    assert_close(got, want, atol=2e-4, rtol=2e-4, msg=kind)
