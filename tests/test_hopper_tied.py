"""The Gluon Hopper tied-state decode kernel (kvslim/kernels/hopper_tied.py) vs the fp64 torch oracle.

The GPU tests need an sm_90 CUDA device and Triton's Gluon Hopper API (written for Triton
3.6); they are skipped elsewhere. The CPU tests check that the module imports without Gluon
being touched and that ``impl="hopper"`` refuses clearly where it cannot run.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kvslim.kernels import decode_tied, hopper_tied
from kvslim.kernels.reference import decode_tied_ref

HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
          and hopper_tied.gluon_available())
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU and Triton's Gluon Hopper API")
ATOL = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def make_poisoned(B, q_len, h_q, S, sd, rope, page, lens, dtype, seed, device="cuda"):
    """Shuffled pages, spare block-table columns, ragged lengths; NaN in every cache slot no
    sequence references (unused pages and slots past seq_len)."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lens) + 1
    num_pages = B * max_pages + 3
    row = S * sd + rope
    cache = torch.full((num_pages, page, row), float("nan"))
    perm = torch.randperm(num_pages, generator=g)[: B * max_pages]
    bt = perm.reshape(B, max_pages).to(torch.int32)
    for b, n in enumerate(lens):
        for i in range(-(-n // page)):
            k = min(page, n - i * page)
            cache[bt[b, i], :k] = torch.randn(k, row, generator=g)
    q = torch.randn(B, q_len, h_q, sd + rope, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q.to(dtype), cache.to(dtype), bt, sl)]


def kwargs(S, sd, rope):
    return dict(num_state_heads=S, state_dim=sd, nope_dim=sd, rope_dim=rope, v_dim=sd, softmax_scale=(sd + rope) ** -0.5)


def check(o, lse, q, cache, bt, sl, kw):
    """Max errors vs the fp64 oracle; each within a few output ulps (P is rounded to 16 bits)."""
    ro, rl = decode_tied_ref(q.double(), cache.double(), bt, sl, **kw)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    eo = (o.double() - ro).abs().max().item()
    el = (lse.double() - rl).abs().max().item()
    scale = ro.abs().max().item()
    assert eo <= 4 * ATOL[q.dtype] * max(scale, 1.0), f"o max error {eo:.3g} (|o| max {scale:.3g})"
    assert el <= 1e-2, f"lse max error {el:.3g}"
    return eo, el


# (B, q_len, h_q, S, state_dim, rope, page, lens, splits, dtype)
CASES = [
    (3, 1, 128, 1, 512, 64, 64, [1, 700, 1500], 1, torch.bfloat16),  # MLA h_q 128
    (3, 2, 128, 1, 512, 64, 16, [2, 333, 1025], 2, torch.bfloat16),
    (2, 4, 128, 1, 512, 64, 48, [900, 4], 3, torch.bfloat16),  # page not a power of two
    (2, 1, 64, 1, 512, 64, 64, [65, 2000], 4, torch.float16),  # MLA h_q 64
    (3, 1, 128, 2, 256, 64, 64, [64, 1, 999], 1, torch.bfloat16),  # GLA-2
    (2, 2, 128, 2, 256, 64, 16, [130, 1600], 2, torch.float16),
    (2, 2, 64, 4, 256, 64, 48, [77, 640], 3, torch.bfloat16),  # GLA-4: group 16 < 64/q_len = 32 rows
    (2, 4, 128, 2, 256, 64, 64, [4, 3000], 2, torch.float16),  # GLA-2 q_len 4 (seq_len >= q_len)
    (2, 1, 128, 4, 256, 64, 64, [4096, 31], None, torch.bfloat16),  # heuristic splits
]


@needs_hopper
@pytest.mark.parametrize("case", CASES)
def test_hopper_matches_fp64_oracle(case):
    B, q_len, h_q, S, sd, rope, page, lens, splits, dtype = case
    q, cache, bt, sl = make_poisoned(B, q_len, h_q, S, sd, rope, page, lens, dtype, zlib.crc32(str(case).encode()))
    kw = kwargs(S, sd, rope)
    o, lse = decode_tied(q, cache, bt, sl, num_splits=splits, impl="hopper", **kw)
    assert o.shape == (B, q_len, h_q, sd)
    check(o, lse, q, cache, bt, sl, kw)


# the other configs: (B, q_len, h_q, S, state_dim, page, lens, splits, config)
CONFIGS = [
    (3, 1, 128, 1, 512, 64, [1, 700, 1500], 1, {"BLOCK_N": 32, "STAGES": 3}),
    (3, 2, 128, 1, 512, 48, [2, 333, 1025], 2, {"BLOCK_N": 32, "STAGES": 4, "PIPE": True}),
    (2, 1, 128, 1, 512, 64, [31, 2000], 1, {"BLOCK_N": 32, "STAGES": 3, "PIPE": True}),
    (3, 1, 128, 2, 256, 64, [64, 1, 999], 1, {"BLOCK_N": 64, "STAGES": 4, "PIPE": True}),
    (2, 4, 64, 4, 256, 16, [130, 1600], 3, {"BLOCK_N": 64, "STAGES": 3, "PIPE": True}),
    (2, 2, 128, 2, 256, 64, [2, 64], 4, {"BLOCK_N": 64, "STAGES": 2}),  # empty splits (seq_len >= q_len)
    (2, 1, 128, 2, 256, 64, [1, 64], 4, {"BLOCK_N": 64, "STAGES": 3, "PIPE": True}),
]


@needs_hopper
@pytest.mark.parametrize("case", CONFIGS)
def test_hopper_configs_match_fp64_oracle(case):
    B, q_len, h_q, S, sd, page, lens, splits, config = case
    q, cache, bt, sl = make_poisoned(B, q_len, h_q, S, sd, 64, page, lens, torch.bfloat16,
                                     zlib.crc32(str(case).encode()))
    kw = kwargs(S, sd, 64)
    o, lse = hopper_tied.decode_tied_hopper(q, cache, bt, sl, num_splits=splits, config=config, **kw)
    check(o, lse, q, cache, bt, sl, kw)


@needs_hopper
def test_hopper_split_invariance_and_tl_agreement():
    q, cache, bt, sl = make_poisoned(2, 2, 128, 1, 512, 64, 64, [1000, 257], torch.bfloat16, 5)
    kw = kwargs(1, 512, 64)
    a = decode_tied(q, cache, bt, sl, num_splits=1, impl="hopper", **kw)
    b = decode_tied(q, cache, bt, sl, num_splits=4, impl="hopper", **kw)
    c = decode_tied(q, cache, bt, sl, num_splits=1, impl="triton", **kw)
    for x in (b, c):
        torch.testing.assert_close(a[0].float(), x[0].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a[1], x[1], atol=1e-3, rtol=1e-3)


@needs_hopper
def test_hopper_cuda_graph_capture():
    q, cache, bt, sl = make_poisoned(2, 1, 128, 1, 512, 64, 64, [300, 1200], torch.bfloat16, 6)
    kw = kwargs(1, 512, 64)
    o, lse = decode_tied(q, cache, bt, sl, num_splits=2, impl="hopper", **kw)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        go, gl = decode_tied(q, cache, bt, sl, num_splits=2, impl="hopper", **kw)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    check(go, gl, q, cache, bt, sl, kw)


@needs_hopper
def test_hopper_auto_choice(monkeypatch):
    """auto: the Hopper kernel for 512-wide latents with >= 64 query rows per state head (where it measured
    faster), not for fewer rows; KVSLIM_HOPPER=0 never, =1 for every shape it takes."""
    from kvslim.kernels import hopper_tied as ht

    calls = []
    real = ht.decode_tied_hopper
    monkeypatch.setattr(ht, "decode_tied_hopper", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = kwargs(1, 512, 64)
    q, cache, bt, sl = make_poisoned(1, 1, 128, 1, 512, 64, 64, [100], torch.bfloat16, 7)
    small = make_poisoned(1, 1, 16, 1, 512, 64, 64, [100], torch.bfloat16, 9)
    monkeypatch.delenv("KVSLIM_HOPPER", raising=False)
    decode_tied(q, cache, bt, sl, **kw)
    assert len(calls) == 1
    decode_tied(*small, **kw)  # 16 rows per state head: the tl kernel
    assert len(calls) == 1
    monkeypatch.setenv("KVSLIM_HOPPER", "0")
    decode_tied(q, cache, bt, sl, **kw)
    assert len(calls) == 1
    monkeypatch.setenv("KVSLIM_HOPPER", "1")
    decode_tied(*small, **kw)
    assert len(calls) == 2
    # a shape it does not take (fp32) stays on the tl kernel under auto, and raises when explicit
    q32, c32 = q.float(), cache.float()
    decode_tied(q32, c32, bt, sl, **kw)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="impl='hopper'.*bfloat16 or float16"):
        decode_tied(q32, c32, bt, sl, impl="hopper", **kw)


@needs_hopper
def test_hopper_rejects_shapes_it_does_not_take():
    q, cache, bt, sl = make_poisoned(1, 1, 16, 1, 128, 64, 16, [40], torch.bfloat16, 8)
    with pytest.raises(ValueError, match="state_dim must be one of"):
        decode_tied(q, cache, bt, sl, impl="hopper", **kwargs(1, 128, 64))
    q, cache, bt, sl = make_poisoned(1, 1, 16, 2, 64, 0, 16, [40], torch.bfloat16, 9)
    q2, c2, bt2, sl2 = make_poisoned(1, 1, 16, 1, 512, 64, 16, [40], torch.bfloat16, 11)
    for bad in ({"BLOCK_N": 16}, {"STAGES": 3}, {"PIPE": True}):  # MLA: 3 x 64-token slots do not fit
        with pytest.raises(ValueError, match="impl='hopper': config"):
            hopper_tied.decode_tied_hopper(q2, c2, bt2, sl2, config=bad, **kwargs(1, 512, 64))
    with pytest.raises(ValueError, match="impl='hopper'"):  # GTA: nope_dim = d_h/2
        decode_tied(q[..., :64], cache, bt, sl, impl="hopper", num_state_heads=2, state_dim=64, nope_dim=64,
                    rope_dim=0, v_dim=64, softmax_scale=0.125)


def test_cpu_module_imports_and_hopper_refuses_cpu():
    """No Gluon import at module load; impl='hopper' on CPU tensors is a clear ValueError."""
    import sys

    assert "kvslim.kernels.hopper_gluon" not in sys.modules or HOPPER
    q, cache, bt, sl = make_poisoned(1, 1, 16, 1, 512, 64, 16, [20], torch.bfloat16, 10, device="cpu")
    with pytest.raises(ValueError, match="impl='hopper': needs CUDA tensors"):
        decode_tied(q, cache, bt, sl, impl="hopper", **kwargs(1, 512, 64))
    with pytest.raises(ValueError, match="decode_tied"):
        from kvslim.kernels import decode_separate

        decode_separate(q, cache, bt, sl, num_kv_heads=1, head_dim=288, impl="hopper")
    # the shape checks are device-independent
    assert hopper_tied.shape_problem(q, cache, **{k: v for k, v in kwargs(1, 512, 64).items()
                                                  if k != "softmax_scale"}) is None
    assert "fp8" in hopper_tied.shape_problem(q, cache.view(torch.uint8), num_state_heads=1, state_dim=512,
                                              nope_dim=512, rope_dim=64, v_dim=512)
    assert hopper_tied.hopper_config(512, 64) == {"BLOCK_N": 64, "STAGES": 2, "PIPE": False}
    assert hopper_tied.hopper_config(256, 64) == {"BLOCK_N": 64, "STAGES": 3, "PIPE": False}
