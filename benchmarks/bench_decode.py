"""Decode-attention benchmark: kvslim's two Triton kernels vs peers, on one GPU.

For each (variant, B, L, q_len): correctness vs a torch peer first, then the median
time (CUDA-graph replays, L2 flushed between calls), achieved TB/s and TFLOP/s,
and their fraction of the copy bandwidth / bf16 GEMM peak measured in the same run.

Timing: each kernel is replayed from a CUDA graph (10 calls, each after a 256 MB L2
flush; the flush-only graph's time subtracted), as decode runs under CUDA graphs; this
also checks that our launchers are capturable.

Bytes and FLOPs (DESIGN.md §6): bytes = KV bytes read (B·L·row_dim·2) + q + o;
FLOPs = 2·B·q_len·h_q·L·(d_qk + d_v). Every TB/s column uses these *compressed-cache*
bytes, also for peers that read a bigger, expanded K/V: it is then a speed, comparable
across rows, not that peer's own memory traffic.

Peers (in benchmarks/peers/): torch SDPA (cuDNN / flash / efficient backends; GQA-native
where the backend takes ``enable_gqa``, else on contiguous expanded K/V), the naive
absorbed torch path for MLA/GLA/GTA (matmuls over the latent), SGLang's Triton decode
kernel (loaded from its source file with stand-in modules; q_len = 1, page size 1, best of
4-32 splits), FlashInfer's paged GQA decode and paged MLA wrappers (opt-in, from the
stripped carry in .whl/flashinfer/; JIT-built at first use).

Usage (on the GPU):  python benchmarks/bench_decode.py --mode key|sweep|tune --out DIR
    [--peers ours,torch,sdpa,sglang,flashinfer | all] [--only gqa-8:page=64 mla:q_len=1 ...]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

import torch
import triton
import triton.testing

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))  # kvslim from this checkout
sys.path.insert(0, _HERE)  # peers/ as a top-level package (no benchmarks/__init__.py to rely on)

from peers import flashinfer_peer  # noqa: E402
from peers.sglang_peer import sglang_peer  # noqa: E402
from peers.torch_peers import naive_absorbed, sdpa_peers  # noqa: E402
from timing import bench, bench_graph  # noqa: E402

from kvslim.kernels.separate import decode_separate_triton  # noqa: E402
from kvslim.kernels.tied import decode_tied_triton  # noqa: E402
from kvslim.spec import AttentionSpec  # noqa: E402

DT = torch.bfloat16
PEERS = ("ours", "torch", "sdpa", "sglang", "flashinfer")
DEFAULT_PEERS = "ours,torch,sdpa,sglang"


# ---------------------------------------------------------------------------- ceilings
def measure_ceilings():
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


# ---------------------------------------------------------------------------- problem
class Problem:
    """One decode shape: a spec, batch, length, q_len, page size; paged + contiguous views."""

    def __init__(self, spec: AttentionSpec, B: int, L: int, q_len: int, page: int, seed: int = 0):
        self.spec, self.B, self.L, self.q_len, self.page = spec, B, L, q_len, page
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
            self.B * self.L * self.row * 2 + self.q.numel() * 2 + self.B * self.q_len * self.h_q * self.dv * 2
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
        )


# ---------------------------------------------------------------------------- runs
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
        )
    else:
        ref, _ = decode_separate_ref(*args, num_kv_heads=p.h_kv, head_dim=p.d, softmax_scale=p.scale)
    err = ((o[:n].float() - ref.float()).norm() / ref.float().norm()).item()
    return f"{err:.1e}" + ("" if err < 2e-2 else " FAIL")


def row(kernel, p, t, copy_bw, gemm, note=""):
    tbs = p.bytes / t / 1e12
    tfl = p.flops / t / 1e12
    return dict(
        variant=p.spec.name,
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


KEY_SHAPES = [
    # (variant, h_q, B, L, q_len, page)
    ("gqa-8", 32, 64, 8192, 1, 64),
    ("gqa-8", 32, 64, 8192, 1, 16),
    ("gqa-8", 32, 64, 8192, 1, 1),
    ("gqa-4", 32, 64, 8192, 1, 64),
    ("gta-8", 32, 64, 8192, 1, 64),
    ("gta-4", 32, 64, 8192, 1, 64),
    ("mla", 16, 64, 8192, 1, 64),
    ("mla", 16, 64, 8192, 1, 1),
    ("mla", 16, 64, 8192, 2, 64),
    ("mla", 16, 64, 8192, 4, 64),
    ("mla", 128, 64, 8192, 1, 64),
    ("mla", 128, 64, 8192, 2, 64),
    ("mla", 128, 64, 8192, 4, 64),
    ("gla-2", 128, 64, 8192, 1, 64),
    ("gla-2", 128, 64, 8192, 2, 64),
    ("gla-4", 128, 64, 8192, 1, 64),
    ("gla-8", 128, 64, 8192, 1, 64),
    ("gla-8", 128, 64, 8192, 1, 16),
    ("gla-2", 32, 64, 8192, 1, 64),
]


def sweep_shapes():
    out = []
    for name, h_q in (("gqa-8", 32), ("gta-8", 32), ("mla", 16), ("gla-2", 32)):
        for B in (1, 8, 64, 128):
            for L in (1024, 8192, 32768):
                for q_len in (1, 2, 4):
                    if q_len > 1 and (L != 8192 or B not in (8, 64)):
                        continue
                    out.append((name, h_q, B, L, q_len, 64))
    return out


def tune(copy_bw, gemm, log=print):
    """Config sweep for our kernels at the key shapes (used to pick heuristics.py's numbers)."""

    def cfgs(hs, ns, ws, ss):
        return [
            dict(BLOCK_H=h, BLOCK_N=n, num_warps=w, num_stages=s)
            for h in hs
            for n in ns
            for w in ws
            for s in ss
        ]

    grid = [
        # (variant, h_q, q_len, page, configs, splits)
        (
            "gqa-8",
            32,
            1,
            64,
            cfgs([4], [64], [4], [3, 4]) + cfgs([4], [32], [4], [4]) + cfgs([4], [128], [4], [3]),
            [None],
        ),
        (
            "gta-8",
            32,
            1,
            64,
            [dict(c, SPG=g) for g in (1, 2) for c in cfgs([4], [64], [2, 4], [2, 3])],
            [None, 2],
        ),
        ("mla", 16, 1, 64, cfgs([16], [32, 64], [4], [2, 3, 4]), [None, 8]),
        ("mla", 16, 1, 1, cfgs([16], [32, 64], [4], [2, 3]), [None]),
        ("mla", 128, 1, 64, cfgs([64], [32, 64], [8], [2, 3]), [None, 4]),
        ("mla", 128, 2, 64, cfgs([32], [64], [8], [2, 3]) + cfgs([32], [32], [8], [3]), [None]),
    ]
    for name, h_q, q_len, page, cfg_list, split_list in grid:
        p = Problem(spec_for(name, h_q), 64, 8192, q_len, page)
        res = []
        for cfg in cfg_list:
            for splits in split_list:
                try:
                    t = bench(p.ours(num_splits=splits, config=cfg), rep=25)
                except Exception as e:  # out of resources
                    log(f"  {name} {cfg} failed: {type(e).__name__}")
                    break
                res.append((t, cfg, splits))
        res.sort(key=lambda x: x[0])
        for t, cfg, splits in res[:4] + res[-1:]:
            log(
                f"TUNE {name} h_q={h_q} q_len={q_len} page={page} {t * 1e6:.1f}us {p.bytes / t / 1e12:.2f}TB/s "
                f"{p.flops / t / 1e12:.0f}TF splits={splits} {cfg}"
            )
        del p
        torch.cuda.empty_cache()


def write_results(results, out_dir, meta):
    os.makedirs(out_dir, exist_ok=True)
    stamp = meta["date"]
    with open(os.path.join(out_dir, "decode.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0].keys()))
        w.writeheader()
        w.writerows(results)
    cols = [
        "variant",
        "h_q",
        "B",
        "L",
        "q_len",
        "page",
        "kernel",
        "us",
        "TBps",
        "TFLOPs",
        "pct_copy",
        "pct_gemm",
        "note",
    ]
    lines = [
        f"# Decode attention benchmark ({stamp})",
        "",
        f"GPU: {meta['gpu']}; torch {meta['torch']}; triton {meta['triton']}; bf16.",
        f"Measured in this run: copy bandwidth {meta['copy_bw'] / 1e12:.2f} TB/s (read + write), "
        f"bf16 GEMM {meta['gemm'] / 1e12:.0f} TFLOP/s (8192^3).",
        "",
        "TB/s counts the compressed cache's bytes (B*L*row*2 + q + o) for every kernel, so it is a speed "
        "comparable across rows; FLOPs = 2*B*q_len*h_q*L*(d_qk + d_v). Times: median of CUDA-graph replays "
        "(10 calls per replay, each after a 256 MB L2 flush, flush time subtracted); `err` = relative L2 error "
        "of our output vs the fp32 torch oracle on two sequences.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in results:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    lines += ["", *targets(results), "", *meta.get("notes", [])]
    with open(os.path.join(out_dir, "decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, out_dir, meta)


SHAPE_KEYS = ("variant", "h_q", "B", "L", "q_len", "page")


def same_shape(results, r, kernel: str) -> list:
    """The rows of ``kernel`` measured at the shape of row ``r``."""
    return [x for x in results if x["kernel"] == kernel and all(x[k] == r[k] for k in SHAPE_KEYS)]


def targets(results):
    """Issue-4 targets, as ratios taken from this run's rows (B=64, L=8192, page 64)."""

    def t(variant, h_q, q_len=1, kernel="kvslim", page=64):
        rs = [
            r
            for r in results
            if (r["variant"], r["h_q"], r["q_len"], r["kernel"], r["page"], r["B"], r["L"])
            == (variant, h_q, q_len, kernel, page, 64, 8192)
        ]
        return rs[0] if rs else None

    out = ["## Targets (B=64, L=8192, page 64 unless said)", ""]
    g8 = t("gqa-8", 32)
    sdpa = [
        r
        for r in results
        if r["variant"] == "gqa-8"
        and r["h_q"] == 32
        and r["q_len"] == 1
        and r["page"] == 64
        and r["B"] == 64
        and r["L"] == 8192
        and r["kernel"].startswith("sdpa")
    ]
    if g8 and sdpa:
        best = min(sdpa, key=lambda r: r["us"])
        out.append(
            f"- separate-KV GQA-8 h_q=32: {g8['us']} us = {g8['pct_copy']}% of copy bw; best SDPA "
            f"{best['kernel']} {best['us']} us -> ours/SDPA time = {g8['us'] / best['us']:.3f} "
            f"(target <= 1, >= 90% copy)"
        )
    gt8 = t("gta-8", 32)
    if g8 and gt8:
        out.append(
            f"- GTA-8 / GQA-8 time = {gt8['us']} / {g8['us']} = {gt8['us'] / g8['us']:.3f} (target <= 0.55; "
            f"bytes ratio 1088/2048 = 0.531)"
        )
    for v, h in (("mla", 16), ("gla-2", 32), ("gla-4", 128), ("gla-8", 128), ("mla", 128), ("gla-2", 128)):
        r = t(v, h)
        if r:
            out.append(
                f"- {v} h_q={h} q_len=1: {r['pct_copy']}% of copy bw, {r['pct_gemm']}% of GEMM "
                f"(target >= 85% copy)"
            )
    for v, h, q in (("mla", 128, 2), ("mla", 128, 4), ("gla-2", 128, 2), ("mla", 16, 2), ("mla", 16, 4)):
        r = t(v, h, q)
        if r:
            out.append(
                f"- {v} h_q={h} q_len={q}: {r['TFLOPs']} TFLOP/s = {r['pct_gemm']}% of GEMM (target >= 50%)"
            )
    for r in [r for r in results if r["kernel"] == "kvslim" and r["variant"][:3] in ("mla", "gla", "gta")]:
        n = same_shape(results, r, "torch-absorbed")
        if n:
            out.append(
                f"- {r['variant']} h_q={r['h_q']} q_len={r['q_len']}: {n[0]['us'] / r['us']:.1f}x the naive "
                "torch absorbed path (target >= 3x)"
            )
    for r in [r for r in results if r["kernel"] == "sglang-triton"]:
        o = same_shape(results, r, "kvslim")
        if o:
            out.append(
                f"- vs SGLang Triton, {r['variant']} h_q={r['h_q']} page={r['page']}: SGLang/ours time = "
                f"{r['us'] / o[0]['us']:.2f} (target > 1)"
            )
    for r in [r for r in results if r["kernel"].startswith("flashinfer")]:
        o = same_shape(results, r, "kvslim")
        if o:
            out.append(
                f"- vs FlashInfer {r['kernel']}, {r['variant']} h_q={r['h_q']} q_len={r['q_len']} "
                f"page={r['page']}: FlashInfer/ours time = {r['us'] / o[0]['us']:.2f} (> 1: ours faster)"
            )
    m, g = t("mla", 128), t("gla-2", 128)
    if m and g:
        out.append(f"- GLA-2 vs MLA at h_q=128, q_len=1: {g['us']} us vs {m['us']} us (target GLA-2 <= MLA)")
    return out


def plot(results, out_dir, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = [r for r in results if r["B"] == 64 and r["L"] == 8192 and r["page"] in (64, 1)]
    shapes = []
    for r in key:
        s = (r["variant"], r["h_q"], r["q_len"])
        if s not in shapes:
            shapes.append(s)
    kernels = sorted({r["kernel"] for r in key}, key=lambda k: (k != "kvslim", k))
    fig, ax = plt.subplots(figsize=(max(8, len(shapes) * 0.9), 4.5))
    w = 0.8 / max(1, len(kernels))
    for i, k in enumerate(kernels):
        xs, ys = [], []
        for j, s in enumerate(shapes):
            rs = [r for r in key if (r["variant"], r["h_q"], r["q_len"]) == s and r["kernel"] == k]
            if rs:
                xs.append(j + i * w)
                ys.append(min(r["us"] for r in rs))
        ax.bar(xs, ys, w, label=k)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{v}\nh_q={h}\nq={q}" for v, h, q in shapes], fontsize=7)
    ax.set_ylabel("time (µs), lower is better")
    ax.set_yscale("log")
    ax.set_title(f"decode B=64 L=8192 bf16 — {meta['gpu']} ({meta['date']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "decode_key.png"), dpi=120)
    plt.close(fig)

    ours = [r for r in results if r["kernel"] == "kvslim" and r["q_len"] == 1 and r["page"] == 64]
    if ours:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for v in sorted({(r["variant"], r["h_q"]) for r in ours}):
            for B in (1, 8, 64, 128):
                rs = sorted(
                    [r for r in ours if (r["variant"], r["h_q"]) == v and r["B"] == B], key=lambda r: r["L"]
                )
                if len(rs) > 1:
                    ax[0].plot(
                        [r["L"] for r in rs],
                        [r["pct_copy"] for r in rs],
                        marker="o",
                        label=f"{v[0]} h_q={v[1]} B={B}",
                    )
        ax[0].set_xscale("log", base=2)
        ax[0].set_xlabel("L")
        ax[0].set_ylabel("% of measured copy bandwidth")
        ax[0].legend(fontsize=5, ncol=2)
        mla = [
            r
            for r in results
            if r["kernel"] == "kvslim" and r["h_q"] == 128 and r["L"] == 8192 and r["B"] == 64
        ]
        for v in sorted({r["variant"] for r in mla}):
            rs = sorted([r for r in mla if r["variant"] == v], key=lambda r: r["q_len"])
            ax[1].plot([r["q_len"] for r in rs], [r["pct_gemm"] for r in rs], marker="o", label=v)
        ax[1].set_xlabel("q_len (h_q = 128, B = 64, L = 8192)")
        ax[1].set_ylabel("% of measured bf16 GEMM peak")
        ax[1].legend(fontsize=7)
        fig.suptitle(f"kvslim decode kernels — {meta['gpu']} ({meta['date']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "decode_sweep.png"), dpi=120)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("key", "sweep", "tune", "all"), default="key")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-peers", action="store_true", help="time our kernels only (= --peers ours)")
    ap.add_argument(
        "--peers",
        type=parse_peers,
        default=None,
        help=f"comma list of {', '.join(PEERS)} or 'all' (default {DEFAULT_PEERS}; FlashInfer needs "
        "the carry in .whl/flashinfer, see NOTES.md). Sweep-only shapes always run ours alone.",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="VARIANT[:key=value]",
        help="run only the shapes matching any filter, e.g. gqa-8:page=64 mla:q_len=1:page=64 "
        "(keys h_q, B, L, q_len, page; VARIANT may be *)",
    )
    ap.add_argument(
        "--max-seconds", type=float, default=None, help="skip the remaining shapes after this long"
    )
    args = ap.parse_args()
    peers = {"ours"} if args.no_peers else (args.peers or parse_peers(DEFAULT_PEERS))
    wanted = shape_filter(args.only)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    copy_bw, gemm = measure_ceilings()
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        copy_bw=copy_bw,
        gemm=gemm,
    )
    print(
        f"# {meta['gpu']} torch {meta['torch']} triton {meta['triton']}: copy {copy_bw / 1e12:.2f} TB/s, "
        f"GEMM {gemm / 1e12:.0f} TFLOP/s; peers {','.join(p for p in PEERS if p in peers)}",
        flush=True,
    )
    logs = []

    def log(s):
        print(s, flush=True)
        logs.append(s)

    if args.mode in ("tune",):
        tune(copy_bw, gemm, log)
        return
    fi_desc = None
    if "flashinfer" in peers:
        try:
            flashinfer_peer.load_flashinfer()
            fi_desc = flashinfer_peer.describe()
        except Exception as e:
            fi_desc = f"flashinfer: could not run: {flashinfer_peer.reason(e)}"
        log(f"# {fi_desc}")
    results = []
    shapes = []
    if args.mode in ("key", "all"):
        shapes += [(s, True) for s in KEY_SHAPES]
    if args.mode in ("sweep", "all"):
        shapes += [(s, False) for s in sweep_shapes() if s not in KEY_SHAPES]
    shapes = [(s, w) for s, w in shapes if wanted(s)]
    if not shapes:
        raise SystemExit("no shape matches --only")
    t0 = time.time()
    for (name, h_q, B, L, q_len, page), with_peers in shapes:
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            log(f"time budget spent: skipped {name} h_q={h_q} B={B} L={L} q_len={q_len} and the rest")
            break
        log(f"{name} h_q={h_q} B={B} L={L} q_len={q_len} page={page}")
        try:
            run_shape(
                name,
                h_q,
                B,
                L,
                q_len,
                page,
                copy_bw,
                gemm,
                peers=peers if with_peers else {"ours"} & peers,
                results=results,
                log=log,
            )
        except torch.cuda.OutOfMemoryError:
            log("  OOM")
            torch.cuda.empty_cache()
    if not results:
        raise SystemExit("no rows measured")
    why = [
        x.strip()
        for x in logs
        if x.strip().startswith(("sdpa refused", "sglang:", "sglang failed", "time budget", "flashinfer"))
    ]
    meta["notes"] = [
        "Peers: `sdpa-*(gqa)` = torch SDPA with `enable_gqa=True` on contiguous [B, h_kv, L, d] K/V; "
        "`(expanded)` = on K/V materialised to h_q heads (the backend refuses GQA); for GTA the key "
        "`concat(state[:64], rope)` is materialised first (not timed). SDPA rows with q_len > 1 run without "
        "the causal mask among new tokens (its is_causal is top-left aligned), which only helps them. "
        "`torch-absorbed` = bf16 matmuls over the latent/state + fp32 softmax. `sglang-triton` = SGLang "
        "0.5.10.post1 `decode_attention_fwd` loaded from its source file (token pool = page size 1, random "
        "token order, best of 4/8/16/32 splits); it has no q_len > 1 path and its MLA layout cannot express "
        "GTA/GLA rows (a shared rope key after S state heads). Its rows carry the shape's page column but "
        "always run page size 1.",
        "",
    ]
    if "flashinfer" in peers:
        meta["notes"] += [
            f"FlashInfer ({fi_desc}): JIT-built from a stripped wheel carried to the device (benchmarks/NOTES.md, "
            "Peers), reading views of the same paged cache (no copies): `flashinfer-decode` = "
            "BatchDecodeWithPagedKVCacheWrapper, CUDA-core kernel (fa2, q_len 1); `flashinfer-tc-fa2` = the same "
            "wrapper with use_tensor_cores=True (FA2 prefill kernel); K and V are strided views of our [K|V] "
            "rows (NHD). `flashinfer-mla-fa2` / `-fa3` = BatchMLAPagedAttentionWrapper with our [latent|rope] "
            "rows as its packed paged KV, causal for q_len > 1. Each is planned once outside the timed region; "
            "`err` as for ours.",
            "",
        ]
    else:
        meta["notes"] += [
            "FlashInfer was not run in this table (`--peers ...,flashinfer` with the stripped carry in "
            ".whl/flashinfer; see benchmarks/NOTES.md, Peers).",
            "",
        ]
    meta["notes"] += [
        "Peers that refused a shape (from the run log):",
        "",
        *[f"    {x}" for x in dict.fromkeys(why)],
    ]
    write_results(results, args.out, meta)


if __name__ == "__main__":
    main()
