"""One decode-attention shape for bench_decode: the problem, the ceilings, one timed row per kernel.

``Problem`` holds a spec's paged cache (shuffled block table), queries and byte/FLOP counts;
``run_shape`` times our kernel and the chosen peers (``benchmarks.peers``) at one shape and
checks every output against the fp32 torch oracle; ``measure_ceilings`` gives the copy
bandwidth and bf16 GEMM peak the rows are a fraction of. ``parse_peers`` and
``shape_filter`` read the ``--peers`` and ``--only`` flags.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.peers import flashinfer_peer
from benchmarks.peers.sglang_peer import sglang_peer
from benchmarks.peers.torch_peers import naive_absorbed, sdpa_peers
from benchmarks.timing import bench, bench_graph
from kvslim.kernels.separate import decode_separate_triton
from kvslim.kernels.tied import decode_tied_triton
from kvslim.spec import AttentionSpec

DT = torch.bfloat16
PEERS = ("ours", "torch", "sdpa", "sglang", "flashinfer")
DEFAULT_PEERS = "ours,torch,sdpa,sglang"


def measure_ceilings():
    """(copy bandwidth in bytes/s, read + write over 1 GiB; bf16 GEMM FLOP/s at 8192^3), measured here."""
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=DT)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 2 / t
    src = dst = None
    x = torch.randn(8192, 8192, device="cuda", dtype=DT)
    y = torch.randn(8192, 8192, device="cuda", dtype=DT)
    t = bench(lambda: x @ y)
    return copy_bw, 2 * 8192**3 / t


class Problem:
    """One decode shape: a spec, batch, length, q_len, page size; paged + contiguous views.

    ``kv_dtype="fp8"``: the same random rows packed into kvslim's fp8 row (``kvslim.rows``);
    ``cache`` is then the uint8 pool and ``bytes`` counts its packed rows.
    """

    def __init__(self, spec: AttentionSpec, B: int, L: int, q_len: int, page: int, seed: int = 0,
                 kv_dtype: str = "bf16"):
        self.spec, self.B, self.L, self.q_len, self.page = spec, B, L, q_len, page
        self.fmt = spec.row_format(kv_dtype)
        self.kw = {"kv_format": self.fmt} if self.fmt.is_fp8 else {}
        torch.manual_seed(seed)
        self.tied = spec.is_tied
        if self.tied:
            self.S, self.sd, self.nope, self.rope = (
                spec.num_state_heads,
                spec.state_dim,
                spec.nope_dim,
                spec.rope_dim,
            )
            self.dv = spec.state_dim
            self.dqk = self.nope + self.rope
            self.scale = spec.softmax_scale
        else:
            self.h_kv, self.d = spec.num_kv_heads, spec.head_dim
            self.dqk = self.dv = self.d
            self.scale = self.d**-0.5
        self.h_q = spec.num_heads
        self.row = spec.row_dim
        pages_per_seq = -(-L // page)
        n_pages = B * pages_per_seq
        # Contiguous per-sequence storage, paged view with a shuffled block table: the pages
        # of a sequence are scattered, as after a real allocator has run for a while.
        self.cache = torch.randn(n_pages, page, self.row, device="cuda", dtype=DT).mul_(0.5)
        if self.fmt.is_fp8:
            from kvslim.rows import quantize_rows

            self.cache = quantize_rows(self.cache, self.fmt)
        perm = torch.randperm(n_pages, device="cuda").to(torch.int32)
        self.block_table = perm.view(B, pages_per_seq).contiguous()
        self.seq_lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        self.q = torch.randn(B, q_len, self.h_q, self.dqk, device="cuda", dtype=DT)

    def contiguous_rows(self):
        """[B, L, row] rows in sequence order (what contiguous-cache peers read)."""
        rows = self.cache[self.block_table.long()].reshape(self.B, -1, self.row)
        return rows[:, : self.L].contiguous()

    @property
    def bytes(self):
        return (
            self.B * self.L * self.fmt.row_bytes + self.q.numel() * 2 + self.B * self.q_len * self.h_q * self.dv * 2
        )

    @property
    def flops(self):
        return 2 * self.B * self.q_len * self.h_q * self.L * (self.dqk + self.dv)

    def ours(self, num_splits=None, config=None):
        if self.tied:
            return lambda: decode_tied_triton(
                self.q,
                self.cache,
                self.block_table,
                self.seq_lens,
                num_state_heads=self.S,
                state_dim=self.sd,
                nope_dim=self.nope,
                rope_dim=self.rope,
                v_dim=self.dv,
                softmax_scale=self.scale,
                num_splits=num_splits,
                config=config,
                **self.kw,
            )
        return lambda: decode_separate_triton(
            self.q,
            self.cache,
            self.block_table,
            self.seq_lens,
            num_kv_heads=self.h_kv,
            head_dim=self.d,
            softmax_scale=self.scale,
            num_splits=num_splits,
            config=config,
            **self.kw,
        )


def spec_for(name: str, h_q: int) -> AttentionSpec:
    return AttentionSpec.preset(name, num_heads=h_q, head_dim=128)


def check(p: Problem, o) -> str:
    """Our output vs the fp32 torch oracle on the first two sequences (cheap, independent)."""
    from kvslim.kernels.reference import decode_separate_ref, decode_tied_ref

    n = min(2, p.B)
    args = (p.q[:n].float(), p.cache, p.block_table[:n], p.seq_lens[:n])
    if p.tied:
        ref, _ = decode_tied_ref(
            *args,
            num_state_heads=p.S,
            state_dim=p.sd,
            nope_dim=p.nope,
            rope_dim=p.rope,
            v_dim=p.dv,
            softmax_scale=p.scale,
            **p.kw,
        )
    else:
        ref, _ = decode_separate_ref(*args, num_kv_heads=p.h_kv, head_dim=p.d, softmax_scale=p.scale, **p.kw)
    err = ((o[:n].float() - ref.float()).norm() / ref.float().norm()).item()
    return f"{err:.1e}" + ("" if err < 2e-2 else " FAIL")


def row(kernel, p, t, copy_bw, gemm, note=""):
    tbs = p.bytes / t / 1e12
    tfl = p.flops / t / 1e12
    return dict(
        variant=p.spec.name + ("+fp8" if p.fmt.is_fp8 else ""),
        h_q=p.h_q,
        B=p.B,
        L=p.L,
        q_len=p.q_len,
        page=p.page,
        kernel=kernel,
        us=round(t * 1e6, 1),
        TBps=round(tbs, 3),
        TFLOPs=round(tfl, 1),
        pct_copy=round(100 * tbs * 1e12 / copy_bw, 1),
        pct_gemm=round(100 * tfl * 1e12 / gemm, 1),
        note=note,
    )


def parse_peers(text: str) -> set[str]:
    """``--peers`` value -> set of names (``all`` = every peer, FlashInfer included)."""
    names = {x.strip() for x in text.split(",") if x.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(PEERS)
    bad = names - set(PEERS)
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown peer(s) {sorted(bad)}; choose from {', '.join(PEERS)}, all"
        )
    return names


def run_shape(name, h_q, B, L, q_len, page, copy_bw, gemm, peers=True, results=None, log=print):
    """Time our kernel and the chosen peers at one shape; returns (and appends to results) the rows.

    ``peers``: a set of names from PEERS; True = the default set, False = ours only.
    """
    if peers is True:
        peers = parse_peers(DEFAULT_PEERS)
    elif peers is False:
        peers = {"ours"}
    spec = spec_for(name, h_q)
    p = Problem(spec, B, L, q_len, page)
    out = []
    if "ours" in peers:
        fn = p.ours()
        o, _ = fn()
        ok = check(p, o)
        t = bench_graph(fn)
        out.append(row("kvslim", p, t, copy_bw, gemm, f"err {ok}"))
    if "torch" in peers and p.tied:
        try:
            out.append(row("torch-absorbed", p, bench_graph(naive_absorbed(p)), copy_bw, gemm))
        except torch.cuda.OutOfMemoryError:
            out.append(row("torch-absorbed", p, float("nan"), copy_bw, gemm, "OOM"))
    if "sdpa" in peers:
        sd, why = sdpa_peers(p)
        for k, f in sd.items():
            if k != "_errors":
                out.append(row(k, p, bench_graph(f), copy_bw, gemm))
        if why:
            log(f"  sdpa: {why}")
        for e in sd.get("_errors", []):
            log(f"  sdpa refused: {e}")
        del sd
    if "sglang" in peers:
        try:
            best, why = sglang_peer(p, bench_graph)
            if best is not None:
                out.append(row("sglang-triton", p, best[0], copy_bw, gemm, f"page 1, {best[2]} splits"))
            else:
                log(f"  sglang: {why}")
        except Exception as e:
            log(f"  sglang failed: {type(e).__name__}: {e}")
    if "flashinfer" in peers:
        fis, notes = flashinfer_peer.flashinfer_peers(p, log=log)
        for note in notes:
            log(f"  {note}")
        for k, (f, to_bqhd) in fis.items():
            try:
                ok = check(p, to_bqhd(f()))
                out.append(row(k, p, bench_graph(f), copy_bw, gemm, f"err {ok}"))
            except Exception as e:
                log(f"  {k}: could not run: {flashinfer_peer.reason(e)}")
        del fis
    for r in out:
        log("  " + " ".join(f"{k}={v}" for k, v in r.items()))
    if results is not None:
        results.extend(out)
    del p
    torch.cuda.empty_cache()
    return out


def shape_filter(filters):
    """``--only`` filters -> predicate on (variant, h_q, B, L, q_len, page).

    Each filter is ``VARIANT[:key=value...]`` (VARIANT may be ``*``; keys h_q, B, L, q_len,
    page), e.g. ``gqa-8:page=64`` or ``mla:h_q=128:q_len=1``; a shape runs if any filter matches.
    """
    keys = ("h_q", "B", "L", "q_len", "page")
    parsed = []
    for f in filters or []:
        variant, *conds = f.split(":")
        want = {}
        for c in conds:
            k, _, v = c.partition("=")
            if k not in keys or not v.isdigit():
                raise SystemExit(f"--only {f!r}: expected VARIANT[:key=value...] with keys {', '.join(keys)}")
            want[k] = int(v)
        parsed.append((variant.lower(), want))

    def match(shape):
        if not parsed:
            return True
        name, vals = shape[0], dict(zip(keys, shape[1:]))
        return any(v in ("*", name) and all(vals[k] == x for k, x in w.items()) for v, w in parsed)

    return match
