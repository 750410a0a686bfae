"""Decode kernels vs their torch oracles (kvslim/kernels/reference.py).

On a machine without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` at small
shapes (head dims 16-64, sequences < 100 tokens) so the suite stays fast on 2 CPU cores.
With CUDA the same tests run at realistic shapes (d_h = 128, MLA 512+64, thousands of
tokens). Tolerance (STYLE.md §5): kernel error vs the fp32 reference must be at most
2 x the error of a plain torch computation in the same precision, plus a small atol.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kvslim.kernels import decode_separate, decode_tied  # noqa: E402
from kvslim.kernels.reference import decode_separate_ref, decode_tied_ref, gather_rows  # noqa: E402
from kvslim.kernels.separate import decode_separate_triton  # noqa: E402
from kvslim.kernels.tied import decode_tied_triton  # noqa: E402
from kvslim.testing import assert_close  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# atol = one unit in the last place of the output dtype, relative to the output's scale:
# flash-style kernels round the *unnormalised* probabilities to the input dtype, which the
# torch baseline (normalised p) does not, so a lone element may differ by one ulp more.
ATOL = {torch.float32: 2**-17, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def make_inputs(B, q_len, h_q, d_qk, row, page, lens, dtype, seed):
    """Random paged cache with shuffled pages, spare block-table columns and ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lens) + 1
    num_pages = B * max_pages + 3
    cache = torch.randn(num_pages, page, row, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)[: B * max_pages]
    block_table = perm.reshape(B, max_pages).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(B, q_len, h_q, d_qk, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, cache, block_table, seq_lens)]


def lowp_attention(q, k, v, scale):
    """Same maths as the oracle but in the input precision (fp32 softmax): the error baseline."""
    q_len, L = q.shape[0], k.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k).float() * scale
    pos = torch.arange(L - q_len, L, device=q.device)
    s = s.masked_fill(torch.arange(L, device=q.device)[None, :] > pos[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", p, v).to(q.dtype), lse.transpose(0, 1)


def lowp_separate(q, cache, bt, lens, h_kv, d, scale):
    g = q.shape[2] // h_kv
    outs = []
    for b in range(q.shape[0]):
        L = int(lens[b])
        rows = gather_rows(cache, bt, L, b)
        k = rows[:, : h_kv * d].reshape(L, h_kv, d).repeat_interleave(g, 1)
        v = rows[:, h_kv * d :].reshape(L, h_kv, d).repeat_interleave(g, 1)
        outs.append(lowp_attention(q[b], k, v, scale))
    return torch.stack([o for o, _ in outs]), torch.stack([s for _, s in outs])


def lowp_tied(q, cache, bt, lens, S, sd, nope, rope, dv, scale):
    g = q.shape[2] // S
    outs = []
    for b in range(q.shape[0]):
        L = int(lens[b])
        rows = gather_rows(cache, bt, L, b)
        st = rows[:, : S * sd].reshape(L, S, sd)
        kr = rows[:, S * sd : S * sd + rope][:, None, :].expand(L, S, rope)
        k = torch.cat([st[..., :nope], kr], -1).repeat_interleave(g, 1)
        v = st[..., :dv].repeat_interleave(g, 1)
        outs.append(lowp_attention(q[b], k, v, scale))
    return torch.stack([o for o, _ in outs]), torch.stack([s for _, s in outs])


def nan_out(B, q_len, h_q, dv, dtype):
    return (
        torch.full((B, q_len, h_q, dv), float("nan"), dtype=dtype, device=DEVICE),
        torch.full((B, q_len, h_q), float("nan"), dtype=torch.float32, device=DEVICE),
    )


# (B, q_len, h_q, h_kv, d_h, page, lens, splits, dtype, config)
SEPARATE_CPU = [
    (3, 1, 6, 2, 32, 16, [5, 70, 33], None, torch.bfloat16, None),
    (3, 3, 6, 2, 32, 1, [3, 41, 20], 3, torch.bfloat16, None),
    (2, 2, 3, 3, 16, 64, [2, 90], 2, torch.bfloat16, None),  # MHA, page > length
    (2, 4, 5, 1, 48, 16, [4, 37], 1, torch.float16, None),  # MQA, d_h not a power of 2
    (2, 2, 6, 2, 32, 16, [17, 50], 2, torch.float32, None),
    (2, 2, 6, 2, 32, 16, [9, 63], 1, torch.bfloat16, {"BLOCK_H": 2}),  # 2 head blocks per group
]
SEPARATE_GPU = [
    (4, 1, 32, 8, 128, 16, [1, 3000, 777, 4096], None, torch.bfloat16, None),
    (4, 4, 32, 8, 128, 1, [4, 2049, 1500, 64], 7, torch.bfloat16, None),
    (3, 2, 28, 4, 128, 64, [900, 2, 4000], 1, torch.float16, None),
    (2, 8, 16, 16, 64, 16, [300, 1111], 3, torch.bfloat16, None),
    (2, 3, 24, 3, 96, 64, [513, 128], 2, torch.float32, None),
]


@pytest.mark.parametrize("case", SEPARATE_GPU if GPU else SEPARATE_CPU)
def test_separate_matches_reference(case):
    B, q_len, h_q, h_kv, d, page, lens, splits, dtype, config = case
    q, cache, bt, sl = make_inputs(
        B, q_len, h_q, d, 2 * h_kv * d, page, lens, dtype, seed=zlib.crc32(str(case).encode())
    )
    scale = d**-0.5
    out = nan_out(B, q_len, h_q, d, dtype)
    o, lse = decode_separate_triton(
        q,
        cache,
        bt,
        sl,
        num_kv_heads=h_kv,
        head_dim=d,
        softmax_scale=scale,
        num_splits=splits,
        out=out,
        config=config,
    )
    ro, rl = decode_separate_ref(
        q.float(), cache.float(), bt, sl, num_kv_heads=h_kv, head_dim=d, softmax_scale=scale
    )
    bo, bl = lowp_separate(q, cache, bt, sl, h_kv, d, scale)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, ro, baseline=bo, atol=ATOL[dtype], msg="o:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[dtype], msg="lse:")


# (B, q_len, h_q, S, state_dim, nope, rope, v_dim, page, lens, splits, dtype, config)
TIED_CPU = [
    (3, 1, 6, 2, 32, 16, 16, 32, 16, [5, 70, 33], None, torch.bfloat16, None),  # GTA-2
    (3, 3, 6, 2, 32, 16, 16, 32, 1, [3, 41, 20], 3, torch.bfloat16, None),  # GTA, q_len 3, page 1
    (2, 2, 5, 1, 64, 64, 16, 64, 64, [2, 90], 2, torch.bfloat16, None),  # MLA, odd h_q
    (2, 4, 6, 2, 32, 32, 16, 32, 16, [4, 37], 4, torch.float16, None),  # GLA-2
    (2, 2, 4, 1, 64, 64, 0, 48, 16, [17, 50], 2, torch.float32, None),  # no rope, v_dim < state
    (2, 2, 6, 1, 32, 32, 16, 32, 16, [9, 63], 1, torch.bfloat16, {"BLOCK_H": 4}),  # 2 head blocks
    (2, 2, 6, 3, 32, 16, 16, 32, 16, [30, 11], 2, torch.bfloat16, None),  # GTA-3: one state head a program
    (
        2,
        1,
        8,
        4,
        32,
        16,
        16,
        32,
        16,
        [30, 11],
        2,
        torch.bfloat16,
        {"SPG": 4, "BLOCK_H": 2},
    ),  # 4 heads/program
]
TIED_GPU = [
    (4, 1, 32, 8, 128, 64, 64, 128, 16, [1, 3000, 777, 4096], None, torch.bfloat16, None),  # GTA-8
    (3, 2, 16, 1, 512, 512, 64, 512, 64, [2, 2500, 900], None, torch.bfloat16, None),  # MLA
    (2, 1, 128, 1, 512, 512, 64, 512, 64, [1800, 333], 3, torch.bfloat16, None),  # MLA h_q 128
    (3, 4, 32, 2, 256, 256, 64, 256, 1, [4, 1025, 2000], 5, torch.bfloat16, None),  # GLA-2
    (2, 8, 16, 4, 256, 256, 64, 256, 16, [700, 8], 1, torch.float16, None),  # GLA-4
    (2, 2, 12, 3, 64, 32, 32, 64, 16, [300, 45], 2, torch.float32, None),  # GTA-3
]


@pytest.mark.parametrize("case", TIED_GPU if GPU else TIED_CPU)
def test_tied_matches_reference(case):
    B, q_len, h_q, S, sd, nope, rope, dv, page, lens, splits, dtype, config = case
    q, cache, bt, sl = make_inputs(
        B, q_len, h_q, nope + rope, S * sd + rope, page, lens, dtype, seed=zlib.crc32(str(case).encode())
    )
    scale = (nope + rope) ** -0.5
    kw = dict(num_state_heads=S, state_dim=sd, nope_dim=nope, rope_dim=rope, v_dim=dv, softmax_scale=scale)
    out = nan_out(B, q_len, h_q, dv, dtype)
    o, lse = decode_tied_triton(q, cache, bt, sl, num_splits=splits, out=out, config=config, **kw)
    ro, rl = decode_tied_ref(q.float(), cache.float(), bt, sl, **kw)
    bo, bl = lowp_tied(q, cache, bt, sl, S, sd, nope, rope, dv, scale)
    assert o.shape == (B, q_len, h_q, dv) and lse.dtype == torch.float32
    assert_close(o, ro, baseline=bo, atol=ATOL[dtype], msg="o:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[dtype], msg="lse:")


def test_public_api_triton_and_split_invariance():
    """impl='triton' through the public entry points; the result does not depend on splits."""
    q, cache, bt, sl = make_inputs(2, 2, 4, 16, 2 * 2 * 16, 16, [6, 45], torch.bfloat16, seed=7)
    a = decode_separate(q, cache, bt, sl, num_kv_heads=2, head_dim=16, num_splits=1, impl="triton")
    b = decode_separate(q, cache, bt, sl, num_kv_heads=2, head_dim=16, num_splits=3, impl="triton")
    torch.testing.assert_close(a[0].float(), b[0].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)
    q, cache, bt, sl = make_inputs(2, 1, 4, 32 + 16, 32 + 16, 16, [6, 45], torch.bfloat16, seed=8)
    kw = dict(num_state_heads=1, state_dim=32, nope_dim=32, rope_dim=16, v_dim=32, softmax_scale=0.15)
    o, lse = decode_tied(q, cache, bt, sl, impl="triton", **kw)
    ro, rl = decode_tied_ref(q.float(), cache.float(), bt, sl, **kw)
    assert o.dtype == torch.bfloat16 and lse.shape == (2, 1, 4)
    torch.testing.assert_close(o.float(), ro, atol=2e-2, rtol=2e-2)


def _sep_args():
    return make_inputs(2, 1, 4, 16, 2 * 2 * 16, 16, [6, 20], torch.bfloat16, seed=3)


def test_bad_inputs_raise_clear_errors():
    q, cache, bt, sl = _sep_args()
    kw = dict(num_kv_heads=2, head_dim=16, impl="triton")
    with pytest.raises(TypeError, match="dtype"):
        decode_separate(q, cache.half(), bt, sl, **kw)
    with pytest.raises(ValueError, match="block_table"):
        decode_separate(q, cache, bt.long(), sl, **kw)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_separate(q, cache, bt, sl.long(), **kw)
    with pytest.raises(ValueError, match="contiguous"):
        decode_separate(q, cache.transpose(0, 1).contiguous().transpose(0, 1), bt, sl, **kw)
    with pytest.raises(ValueError, match="divide"):
        decode_separate(q, cache, bt, sl, num_kv_heads=3, head_dim=16, impl="triton")
    with pytest.raises(ValueError, match="q_len"):
        decode_separate(q.expand(2, 9, 4, 16), cache, bt, sl, **kw)
    with pytest.raises(ValueError, match="num_splits"):
        decode_separate(q, cache, bt, sl, num_splits=0, **kw)
    with pytest.raises(ValueError, match="impl"):
        decode_separate(q, cache, bt, sl, num_kv_heads=2, head_dim=16, impl="cuda")


@pytest.mark.skipif(GPU, reason="value checks on seq_lens need a host sync; they run for CPU tensors")
def test_seq_len_past_block_table_raises():
    q, cache, bt, sl = _sep_args()
    too_long = torch.tensor([6, bt.shape[1] * cache.shape[1] + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table capacity"):
        decode_separate(q, cache, bt, too_long, num_kv_heads=2, head_dim=16, impl="triton")
    short = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_len"):
        decode_separate(q, cache, bt, short, num_kv_heads=2, head_dim=16, impl="triton")
    qt = torch.randn(2, 1, 4, 48).bfloat16()
    with pytest.raises(ValueError, match="nope_dim"):
        decode_tied(
            qt,
            cache,
            bt,
            sl,
            num_state_heads=1,
            state_dim=16,
            nope_dim=32,
            rope_dim=16,
            v_dim=16,
            softmax_scale=0.1,
            impl="triton",
        )


def test_seq_len_past_block_table_never_reads_out_of_bounds():
    """The kernel clamps seq_len to the block table's capacity (no host check on CUDA)."""
    q, cache, bt, sl = _sep_args()
    cap = bt.shape[1] * cache.shape[1]
    big = torch.tensor([6, cap + 1000], dtype=torch.int32, device=q.device)
    clamped = torch.tensor([6, cap], dtype=torch.int32, device=q.device)
    kw = dict(num_kv_heads=2, head_dim=16, softmax_scale=0.25, num_splits=2)
    o1, _ = decode_separate_triton(q, cache, bt, big, **kw)
    o2, _ = decode_separate_triton(q, cache, bt, clamped, **kw)
    assert not torch.isnan(o1.float()).any()
    torch.testing.assert_close(o1, o2)


def test_heuristics_pick_splits_from_shapes_only():
    """Splits fill one wave of resident programs; capped by length; never below 1."""
    from kvslim.kernels.heuristics import pick_num_splits, separate_config, tied_config

    assert pick_num_splits(512, 8192, 132, 4) == 1  # GQA-8 B=64: grid already full
    assert pick_num_splits(64, 8192, 132, 4) == 4  # MLA h_q=16 B=64
    assert pick_num_splits(8, 8192, 132, 4) == 32  # B=1 GQA-8: 32 splits of 256 tokens
    assert pick_num_splits(8, 1024, 132, 4) == 4  # capped at >= 256 tokens per split
    assert pick_num_splits(1, 100, 132, 8) == 1
    # more programs than one wave of the compiled kernel: split to cut the partial last wave
    assert pick_num_splits(512, 8192, 132, 4, per_sm=3) == 3  # GLA-8 h_q=128: 1.29 waves unsplit
    assert pick_num_splits(512, 8192, 132, 4, per_sm=5) == 1  # GQA-8: 0.78 waves, one split
    assert pick_num_splits(264, 8192, 132, 4, per_sm=2) == 1  # exactly one full wave
    assert pick_num_splits(512, 512, 132, 4, per_sm=3) == 2  # capped by tokens per split
    cfg = separate_config(group=4, q_len=2, head_dim=128, dtype=torch.bfloat16)
    assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_H"] == 4
    mla = tied_config(group=128, q_len=1, state_block=512, num_state_heads=1, dtype=torch.bfloat16)
    assert mla["BLOCK_H"] == 64 and mla["BLOCK_M"] == 64  # [64, 512] fp32 accumulator cap
    gta = tied_config(group=4, q_len=1, state_block=128, num_state_heads=8, dtype=torch.bfloat16)
    assert gta["SPG"] == 2 and gta["BLOCK_M"] == 16


@pytest.mark.skipif(not GPU, reason="occupancy is read from a kernel compiled for a GPU")
def test_programs_per_sm_from_compiled_kernel():
    from kvslim.kernels.heuristics import _PER_SM

    q = torch.randn(64, 1, 128, 256 + 64, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(64 * 4, 64, 8 * 256 + 64, device="cuda", dtype=torch.bfloat16)
    bt = torch.arange(64 * 4, device="cuda", dtype=torch.int32).view(64, 4)
    sl = torch.full((64,), 256, device="cuda", dtype=torch.int32)
    kw = dict(num_state_heads=8, state_dim=256, nope_dim=256, rope_dim=64, v_dim=256, softmax_scale=0.05)
    _PER_SM.clear()
    o, lse = decode_tied(q, cache, bt, sl, impl="triton", **kw)  # GLA-8 h_q=128: more programs than SMs
    assert len(_PER_SM) == 1 and 1 <= next(iter(_PER_SM.values())) <= 32
    o_ref, lse_ref = decode_tied(q, cache, bt, sl, impl="torch", **kw)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-2, rtol=2e-2)


def test_offline_compile_reports_resources_and_names_missing_constexprs():
    """benchmarks/offline_compile.py: sm_90a cubin on a CPU machine, resource usage read back."""
    import json
    import re
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    cx = dict(H_Q=32, H_KV=8, G=4, Q_LEN=1, HEAD_DIM=64, BLOCK_D=64, PAGE=16, ROW=1024, BLOCK_H=4, BLOCK_M=16,
              BLOCK_N=16, HB_PER_KV=1, NUM_SPLITS=1, STAGES=2, DOT_PREC="tf32", UPCAST=False, FP8=False,
              SCALES=0, TILE=1, F16=True, FP8_PATH=2, GATHER=1, num_warps=4, num_stages=2)

    def run(c):  # its own process: the script compiles real (not interpreted) kernels
        return subprocess.run([sys.executable, "-m", "benchmarks.offline_compile", "separate", json.dumps(c)],
                              cwd=root, capture_output=True, text=True, timeout=300)

    r = run(cx)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"shared (\d+) B \| REG:(\d+)", r.stdout)
    assert m and int(m.group(1)) > 0 and 1 <= int(m.group(2)) <= 255, r.stdout
    bad = run({k: v for k, v in cx.items() if k != "HEAD_DIM"})
    assert bad.returncode != 0 and "constexprs missing: ['HEAD_DIM']" in bad.stderr


@pytest.mark.parametrize("splits,dv,dtype", [(2, 16, torch.bfloat16), (5, 48, torch.float32), (3, 64, torch.float16)])
def test_combine_splits_matches_its_oracle(splits, dv, dtype):
    """The split-KV merge alone vs ``combine_splits_ref``: empty splits (-inf) weigh nothing and
    a row whose splits are all empty gets o = 0, lse = -inf."""
    from kvslim.kernels.combine import combine_splits
    from kvslim.kernels.reference import combine_splits_ref

    g = torch.Generator().manual_seed(splits * 100 + dv)
    B, q_len, h_q = 3, 2, 5
    o_part = torch.randn(B, q_len, h_q, splits, dv, generator=g)
    lse_part = 4 * torch.randn(B, q_len, h_q, splits, generator=g)
    lse_part[0, 0, 0, 1:] = float("-inf")  # one non-empty split
    lse_part[1, 1, 2, :] = float("-inf")  # all empty
    lse_part[2, :, :, -1] = float("-inf")  # the last split empty (short sequence)
    o_part[2, :, :, -1] = 0.0  # what the kernels store for an empty split
    ro, rl = combine_splits_ref(o_part, lse_part)
    o_part, lse_part = o_part.to(DEVICE), lse_part.to(DEVICE)
    o = torch.full((B, q_len, h_q, dv), float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((B, q_len, h_q), float("nan"), device=DEVICE)
    combine_splits(o_part, lse_part, o, lse)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert_close(o.cpu(), ro, atol=tol, rtol=tol, msg="o:")
    assert torch.isneginf(lse[1, 1, 2]) and (o[1, 1, 2] == 0).all()
    finite = torch.isfinite(rl)
    assert_close(lse.cpu()[finite], rl[finite], atol=1e-5, rtol=1e-5, msg="lse:")


def test_combine_oracle_is_exact_for_one_split():
    from kvslim.kernels.reference import combine_splits_ref

    o_part, lse_part = torch.randn(2, 1, 3, 1, 8), torch.randn(2, 1, 3, 1)
    o, lse = combine_splits_ref(o_part, lse_part)
    assert torch.equal(o, o_part[..., 0, :]) and torch.allclose(lse, lse_part[..., 0])


def test_kernel_outputs_are_nan_poisoned_by_the_fixture():
    """The conftest fixture really poisons the launcher's allocations (partials included)."""
    from kvslim.kernels import launch

    q = torch.zeros(2, 1, 4, 8)
    o, lse, o_part, lse_part = launch.alloc_outputs(q, 8, 3)
    assert torch.isnan(o).all() and torch.isnan(o_part).all() and torch.isnan(lse_part).all()


def _fp8_cache(B, page, lens, fmt, seed, poison=True):
    """A packed fp8 paged cache (random rows with outliers), shuffled pages; every byte no sequence
    owns (spare pages, slots past each length) is 0xFF, i.e. NaN as e4m3 and as an fp32 scale."""
    from kvslim.rows import quantize_rows

    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lens) + 1
    num_pages = B * max_pages + 3
    rows = torch.randn(num_pages, page, fmt.row_dim, generator=g)
    rows[..., 0] *= 30  # an outlier channel per token: its tile gets a large scale
    cache = quantize_rows(rows, fmt)
    perm = torch.randperm(num_pages, generator=g)[: B * max_pages]
    bt = perm.reshape(B, max_pages).to(torch.int32)
    if poison:
        owned = torch.zeros(num_pages, page, dtype=torch.bool)
        for b, n in enumerate(lens):
            for t in range(n):
                owned[bt[b, t // page], t % page] = True
        cache[~owned] = 0xFF
    return cache.to(DEVICE), bt.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


# (kind, B, q_len, h_q, S, width, page, lens, splits, dtype): width = d_h (separate) or state dim (tied);
# "gta" is tied with half the state as the key (nope = width / 2) and a RoPE key of width / 2
FP8_CPU = [
    ("separate", 3, 1, 6, 2, 32, 16, [5, 70, 33], None, torch.bfloat16),
    ("separate", 2, 3, 4, 4, 48, 1, [3, 41], 3, torch.float16),  # MHA, d_h 48 (tile 48), page 1
    ("separate", 2, 2, 5, 1, 64, 64, [2, 90], 2, torch.float32),  # MQA, page > length
    ("tied", 3, 1, 8, 1, 64, 16, [7, 66, 30], None, torch.bfloat16),  # MLA-like: one latent
    ("tied", 2, 2, 8, 2, 32, 16, [9, 50], 2, torch.bfloat16),  # GLA-like: 2 latent heads
    ("gta", 2, 4, 4, 2, 32, 1, [4, 37], 1, torch.float16),  # GTA rows, page 1, q_len 4
]
FP8_GPU = [
    ("separate", 4, 1, 32, 8, 128, 16, [1, 3000, 777, 4096], None, torch.bfloat16),  # GQA-8
    ("separate", 3, 4, 28, 4, 128, 1, [4, 2049, 1500], 7, torch.float16),
    ("tied", 4, 1, 16, 1, 512, 64, [5, 4000, 2048, 8192], None, torch.bfloat16),  # MLA h_q=16
    ("tied", 2, 2, 128, 1, 512, 64, [3000, 900], None, torch.bfloat16),  # MLA h_q=128, q_len 2
    ("tied", 3, 1, 128, 8, 256, 16, [100, 2500, 4096], None, torch.bfloat16),  # GLA-8 h_q=128, page 16
    ("tied", 2, 2, 32, 2, 256, 48, [777, 2000], 3, torch.float16),  # GLA-2, page 48
    ("gta", 3, 1, 32, 8, 128, 16, [1, 1234, 4096], None, torch.bfloat16),  # GTA-8
]


@pytest.mark.parametrize("case", FP8_GPU if GPU else FP8_CPU)
def test_fp8_cache_matches_reference(case):
    """Both kernels on packed fp8 rows vs the fp32 oracle on the dequantized rows (kvslim.rows)."""
    from types import SimpleNamespace

    from kvslim.rows import RowFormat

    kind, B, q_len, h_q, S, width, page, lens, splits, dtype = case
    seed = zlib.crc32(str(case).encode())
    g = torch.Generator().manual_seed(seed)
    if kind == "separate":
        spec = SimpleNamespace(is_tied=False, head_dim=width, rope_dim=0, row_dim_per_rank=lambda tp: 2 * S * width)
        fmt = RowFormat.for_spec(spec, "fp8")
        d_qk, d_v = width, width
        kw = dict(num_kv_heads=S, head_dim=width, softmax_scale=width**-0.5)
    else:
        rope = width // 2 if kind == "gta" else (64 if GPU else 16)
        nope = width // 2 if kind == "gta" else width
        spec = SimpleNamespace(is_tied=True, state_dim=width, rope_dim=rope,
                               row_dim_per_rank=lambda tp: S * width + rope)
        fmt = RowFormat.for_spec(spec, "fp8")
        d_qk, d_v = nope + rope, width
        kw = dict(num_state_heads=S, state_dim=width, nope_dim=nope, rope_dim=rope, v_dim=width,
                  softmax_scale=(nope + rope) ** -0.5)
    cache, bt, sl = _fp8_cache(B, page, lens, fmt, seed)
    q = torch.randn(B, q_len, h_q, d_qk, generator=g).to(dtype).to(DEVICE)
    fn, ref = (decode_separate, decode_separate_ref) if kind == "separate" else (decode_tied, decode_tied_ref)
    o, lse = fn(q, cache, bt, sl, num_splits=splits, impl="triton", kv_format=fmt, **kw)
    ro, rl = ref(q.float(), cache, bt, sl, kv_format=fmt, **kw)
    # baseline: the same maths in the kernel's precision on the dequantized rows
    from kvslim.rows import dequantize_rows

    deq = dequantize_rows(cache, fmt, dtype)
    bo, bl = ref(q, deq, bt, sl, **kw)
    assert o.shape == (B, q_len, h_q, d_v) and o.dtype == dtype
    assert_close(o, ro, baseline=bo, atol=ATOL[dtype], msg="fp8 o:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[dtype], msg="fp8 lse:")


def test_fp8_cache_inputs_are_validated():
    from kvslim.rows import RowFormat

    fmt = RowFormat("fp8", 32 + 16, quant=32, plain=16, tile=32)
    q = torch.randn(1, 1, 4, 48).bfloat16()
    bt = torch.zeros(1, 2, dtype=torch.int32)
    sl = torch.tensor([3], dtype=torch.int32)
    cache = torch.zeros(2, 4, fmt.row_bytes, dtype=torch.uint8)
    kw = dict(num_state_heads=1, state_dim=32, nope_dim=32, rope_dim=16, v_dim=32, softmax_scale=0.1)
    with pytest.raises(TypeError, match="kv_format"):
        decode_tied(q, cache, bt, sl, **kw)
    with pytest.raises(ValueError, match="bytes"):
        decode_tied(q, cache[..., :-2].contiguous(), bt, sl, kv_format=fmt, **kw)
    with pytest.raises(TypeError, match="uint8"):
        decode_tied(q, cache.bfloat16(), bt, sl, kv_format=fmt, **kw)
    with pytest.raises(ValueError, match="tile"):
        RowFormat("fp8", 48, quant=32, plain=16, tile=24)
    two = dict(kw, num_state_heads=2, state_dim=16, nope_dim=16, v_dim=16)  # a 32-wide tile crosses heads
    with pytest.raises(ValueError, match="does not fit"):
        decode_tied(q[..., :32].contiguous(), cache, bt, sl, kv_format=fmt, **two)


@pytest.mark.parametrize("kind,page,dtype", [("fp8-tied", 4, torch.float32), ("fp8-separate", 1, torch.bfloat16),
                                             ("fp8-tied", 16, torch.float16), ("plain", 4, torch.float32)])
def test_row_write_kernel_matches_the_torch_write_bit_for_bit(kind, page, dtype):
    """kernels/write.py (scatter + quantize in one launch) == LayerCache.write's torch path, byte for
    byte: same e4m3 rounding (half to even), same scales, same bf16 RoPE key; ragged starts."""
    from types import SimpleNamespace

    from kvslim.cache import LayerCache
    from kvslim.rows import RowFormat, dequantize_rows

    g = torch.Generator().manual_seed(page)
    if kind == "fp8-tied":
        spec = SimpleNamespace(is_tied=True, state_dim=64, rope_dim=16, row_dim_per_rank=lambda tp: 2 * 64 + 16)
    else:
        spec = SimpleNamespace(is_tied=False, head_dim=48, rope_dim=0, row_dim_per_rank=lambda tp: 2 * 2 * 48)
    fmt = RowFormat.for_spec(spec, "fp8") if kind != "plain" else None
    B, T = 3, 6
    R = spec.row_dim_per_rank(1)
    rows = (torch.randn(B, T, R, generator=g) * 4).to(dtype)
    rows[0, 0, :48] = 0  # an all-zero tile: scale 1
    rows[1, 2, 5] = 1e4  # an outlier
    width, store = (fmt.row_bytes, torch.uint8) if fmt else (R, torch.bfloat16)
    per_seq = -(-(T + 9) // page)
    pools = [torch.zeros(B * per_seq + 5, page, width, dtype=store) for _ in range(2)]
    bt = torch.randperm(B * per_seq + 5, generator=g)[: B * per_seq].view(B, per_seq).to(torch.int32)
    start = torch.tensor([0, 3, 9], dtype=torch.int32)
    pools, rows, bt, start = [p.to(DEVICE) for p in pools], rows.to(DEVICE), bt.to(DEVICE), start.to(DEVICE)
    LayerCache(pools[0], bt, start, fmt=fmt).write(rows, impl="torch")
    LayerCache(pools[1], bt, start, fmt=fmt).write(rows, impl="triton")
    a, b = pools[0].view(torch.uint8), pools[1].view(torch.uint8)
    if fmt is not None:  # e4m3 +0 (0x00) and -0 (0x80) are the same value: compare them as equal
        zero = lambda t: torch.where(t[..., : fmt.quant] == 0x80, torch.zeros_like(t[..., : fmt.quant]),  # noqa: E731
                                     t[..., : fmt.quant])
        a, b = torch.cat([zero(a), a[..., fmt.quant :]], -1), torch.cat([zero(b), b[..., fmt.quant :]], -1)
    if fmt is not None and not torch.equal(a, b):  # name the part of the row that differs
        where = sorted({("values" if c < fmt.quant else "scales" if c < fmt.plain_offset else "rope/pad")
                        for c in (a != b).nonzero()[:, -1].tolist()})
        deq = (dequantize_rows(a, fmt) - dequantize_rows(b, fmt)).abs().max().item()
        raise AssertionError(f"{(a != b).sum().item()} bytes differ, in {where}; dequantized max diff {deq:.3e}")
    assert torch.equal(a, b)
    assert pools[0].view(torch.uint8).any()


def _tied_fp8_problem(S, width, nope, rope, tile, h_q, q_len, page, lens, dtype, seed):
    """A packed fp8 tied-state cache (tiles of ``tile`` channels, NaN-poisoned bytes outside the
    sequences) and a query, plus the kernel kwargs."""
    from kvslim.rows import RowFormat

    fmt = RowFormat("fp8", S * width + rope, quant=S * width, plain=rope, tile=tile)
    cache, bt, sl = _fp8_cache(len(lens), page, lens, fmt, seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), q_len, h_q, nope + rope, generator=g).to(dtype).to(DEVICE)
    kw = dict(num_state_heads=S, state_dim=width, nope_dim=nope, rope_dim=rope, v_dim=width,
              softmax_scale=(nope + rope) ** -0.5, kv_format=fmt)
    return q, cache, bt, sl, kw


def _check_fp8_tied(q, cache, bt, sl, kw, config=None, splits=None):
    from kvslim.rows import dequantize_rows

    fmt = kw["kv_format"]
    o, lse = decode_tied_triton(q, cache, bt, sl, num_splits=splits, config=config, **kw)
    ro, rl = decode_tied_ref(q.float(), cache, bt, sl, **kw)
    plain = {k: v for k, v in kw.items() if k != "kv_format"}
    bo, bl = decode_tied_ref(q, dequantize_rows(cache, fmt, q.dtype), bt, sl, **plain)
    assert_close(o, ro, baseline=bo, atol=ATOL[q.dtype], msg=f"fp8 o {config}:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[q.dtype], msg=f"fp8 lse {config}:")


# (name, S, width, nope, rope, tile, h_q, q_len, page, lens, FP8_PATH, GATHER, BLOCK_N): several 128-channel
# scale tiles per state head scaled down (tile 32): MLA-like 4 tiles, GLA-like 2 latents x 2 tiles, GTA rows
# (nope = width / 2, two state heads per program: 2 tiles); pages 16 (per-page gathers) and 5 (BLOCK_N not a
# multiple: the per-row gather)
FP8_PATHS = [
    ("mla", 1, 128, 128, 16, 32, 16, 1, 16, [7, 70], 2, 1, None),
    ("mla", 1, 128, 128, 16, 32, 16, 1, 16, [7, 70], 1, 0, None),
    ("mla", 1, 128, 128, 16, 32, 8, 2, 5, [3, 61], 2, 1, 32),
    ("mla", 1, 128, 128, 16, 32, 16, 3, 16, [40, 9], 0, 1, 32),
    ("gla", 2, 64, 64, 16, 32, 16, 1, 16, [33, 66], 2, 1, 32),
    ("gla", 2, 64, 64, 16, 32, 32, 2, 5, [66, 12], 2, 0, None),
    ("gta", 4, 32, 16, 16, 32, 8, 2, 16, [50, 17], 2, 1, None),
    ("gta", 4, 32, 16, 16, 32, 8, 4, 1, [5, 29], 1, 1, None),
]


@pytest.mark.parametrize("case", FP8_PATHS, ids=lambda c: "-".join(map(str, c[:1] + c[6:9] + c[10:])))
def test_fp8_tied_paths_match_reference(case):
    """Each fp8 code path of the tied kernel (FP8_PATH 0 element-wise dequantization, 1 scales folded into
    scores and probabilities, 2 folded with each tile converted once where loaded: under the interpreter
    its conversion is a plain cast, on a GPU an inline asm) and each gather of tiles spanning pages, vs
    the fp32 oracle."""
    name, S, width, nope, rope, tile, h_q, q_len, page, lens, path, gather, block_n = case
    seed = zlib.crc32(str(case).encode())
    q, cache, bt, sl, kw = _tied_fp8_problem(S, width, nope, rope, tile, h_q, q_len, page, lens, torch.bfloat16,
                                             seed)
    config = {"FP8_PATH": path, "GATHER": gather}
    if block_n:
        config["BLOCK_N"] = block_n
    _check_fp8_tied(q, cache, bt, sl, kw, config, splits=2 if q_len == 3 else None)


@pytest.mark.parametrize("group,q_len", [(8, 1), (8, 3), (16, 1), (16, 2)])
def test_small_groups_use_small_blocks(group, q_len):
    """Per-rank head counts (8 or 16 query heads per state head, as under TP=8/16): no program computes
    more than next_pow2(G * q_len) rows (>= 16, tl.dot's minimum), and the kernels are exact there."""
    from kvslim.kernels.heuristics import next_pow2, separate_config, tied_config

    want = max(16, next_pow2(group * q_len))
    assert separate_config(group=group, q_len=q_len, head_dim=128, dtype=torch.bfloat16)["BLOCK_M"] <= want
    for sb, fp8 in ((512, True), (256, True), (256, False), (128, False)):
        cfg = tied_config(group=group, q_len=q_len, state_block=sb, num_state_heads=2, dtype=torch.bfloat16,
                          fp8=fp8)
        assert cfg["BLOCK_M"] <= max(want, cfg["SPG"] * want), (sb, fp8, cfg)
    seed = zlib.crc32(f"small{group}{q_len}".encode())
    lens = [19, 45]
    # GLA-2-like latents with `group` query heads each, fp8 (2 tiles per latent) and bf16
    q, cache, bt, sl, kw = _tied_fp8_problem(2, 64, 64, 16, 32, 2 * group, q_len, 16, lens, torch.bfloat16, seed)
    _check_fp8_tied(q, cache, bt, sl, kw)
    h_kv, d = 2, 32
    q, cache, bt, sl = make_inputs(2, q_len, h_kv * group, d, 2 * h_kv * d, 16, lens, torch.bfloat16, seed)
    o, lse = decode_separate_triton(q, cache, bt, sl, num_kv_heads=h_kv, head_dim=d, softmax_scale=d**-0.5)
    ro, rl = decode_separate_ref(q.float(), cache, bt, sl, num_kv_heads=h_kv, head_dim=d, softmax_scale=d**-0.5)
    bo, bl = lowp_separate(q, cache, bt, sl, h_kv, d, d**-0.5)
    assert_close(o, ro, baseline=bo, atol=ATOL[torch.bfloat16], msg="separate o:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[torch.bfloat16], msg="separate lse:")


def test_kernel_config_keys_are_checked():
    q, cache, bt, sl, kw = _tied_fp8_problem(1, 32, 32, 16, 32, 4, 1, 4, [5], torch.bfloat16, 1)
    with pytest.raises(ValueError, match="unknown keys"):
        decode_tied_triton(q, cache, bt, sl, config={"BLOCK_Q": 16}, **kw)
    with pytest.raises(ValueError, match="FP8_PATH"):
        decode_tied_triton(q, cache, bt, sl, config={"FP8_PATH": 3}, **kw)
    qs, cs, bts, sls = make_inputs(1, 1, 4, 16, 64, 4, [5], torch.bfloat16, 1)
    with pytest.raises(ValueError, match="GATHER"):
        decode_separate_triton(qs, cs, bts, sls, num_kv_heads=2, head_dim=16, softmax_scale=0.25,
                               config={"GATHER": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        decode_separate_triton(qs, cs, bts, sls, num_kv_heads=2, head_dim=16, softmax_scale=0.25,
                               config={"SPG": 2})


@pytest.mark.parametrize("path,gather,page", [(1, 0, 16), (2, 1, 16), (0, 1, 5), (2, 1, 1)])
def test_fp8_separate_paths_match_reference(path, gather, page):
    """The separate-KV kernel's fp8 paths and gathers (GQA, 32-wide heads: one scale per head) vs the oracle."""
    from types import SimpleNamespace

    from kvslim.rows import RowFormat, dequantize_rows

    h_kv, d, lens = 2, 32, [9, 70, 41]
    spec = SimpleNamespace(is_tied=False, head_dim=d, rope_dim=0, row_dim_per_rank=lambda tp: 2 * h_kv * d)
    fmt = RowFormat.for_spec(spec, "fp8")
    seed = zlib.crc32(f"sep{path}{gather}{page}".encode())
    cache, bt, sl = _fp8_cache(len(lens), page, lens, fmt, seed)
    q = torch.randn(len(lens), 2, 8, d, generator=torch.Generator().manual_seed(seed)).bfloat16().to(DEVICE)
    kw = dict(num_kv_heads=h_kv, head_dim=d, softmax_scale=d**-0.5)
    o, lse = decode_separate_triton(q, cache, bt, sl, kv_format=fmt, config={"FP8_PATH": path, "GATHER": gather,
                                                                             "BLOCK_N": 32}, **kw)
    ro, rl = decode_separate_ref(q.float(), cache, bt, sl, kv_format=fmt, **kw)
    bo, bl = decode_separate_ref(q, dequantize_rows(cache, fmt, q.dtype), bt, sl, **kw)
    assert_close(o, ro, baseline=bo, atol=ATOL[q.dtype], msg="fp8 separate o:")
    assert_close(lse, rl, baseline=bl, atol=ATOL[q.dtype], msg="fp8 separate lse:")


def test_fp8_tiles_are_pipelined_and_converted_once_offline():
    """sm_90a compile of the default fp8 tied kernel (MLA h_q=16 shape): the e4m3 tiles are cp.async stages
    (async copies of 8-bit tensors in the TTGIR), never gathered byte by byte from shared memory (LDS.U8,
    what FP8_PATH=1 compiles to) and nothing spills. Guards the issue-15 finding on a machine without a GPU."""
    import json
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    cx = dict(H_Q=16, S=1, G=16, Q_LEN=1, STATE_DIM=512, NOPE=512, ROPE=64, DV=512, BLOCK_DS=512, BLOCK_R=64,
              PAGE=64, ROW=656, BLOCK_H=16, BLOCK_M=16, BLOCK_N=64, HB_PER_S=1, SPG=1, NUM_SPLITS=1, STAGES=3,
              DOT_PREC="tf32", UPCAST=False, FP8=True, SCALES=512, PLAIN=528, TILE=128, F16=True, FP8_PATH=2,
              GATHER=1, num_warps=8, num_stages=3)
    code = (
        "import json, os, subprocess, sys, tempfile\n"
        "import benchmarks.offline_compile as oc\n"
        "from kvslim.kernels.tied import _tied_kernel\n"
        "import triton\n"
        "c = oc.compile_kernel(_tied_kernel, json.loads(sys.argv[1]))\n"
        "tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')\n"
        "f = tempfile.NamedTemporaryFile(suffix='.cubin', delete=False); f.write(c.asm['cubin']); f.close()\n"
        "sass = subprocess.run([tool, '-sass', f.name], capture_output=True, text=True).stdout\n"
        "ir = c.asm['ttgir']\n"
        "n8 = sum('async_copy_global_to_local' in l and 'f8E4M3' in l for l in ir.splitlines())\n"
        "print(json.dumps(dict(async8=n8, u8=sass.count('LDS.U8'), stl=sass.count('STL'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cx)], cwd=root, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["async8"] > 0 and got["u8"] == 0 and got["stl"] == 0, got
