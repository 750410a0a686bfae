"""Prefill ("extend") attention benchmark: kvslim's paged prefill kernels vs torch SDPA, on one GPU.

For each (variant, case, page size): a correctness check of the kernel against the torch oracle
(first sequence, fp32), then the median time (``triton.testing.do_bench``, L2 flushed between
calls) and the achieved TFLOP/s as a fraction of the bf16 GEMM peak measured in the same run
(an 8192^3 ``torch.matmul``).

MLA/GLA run twice: the default blocks and ``DV_SPLIT=2`` (two programs per head block, each
with half the value columns and the whole ``QKᵀ``; counted at the FLOPs of the maths, not the
recomputation). Cases: ``fresh`` = B x T new prompts (no cached history; T = L), ``chunk`` = B x T new tokens
on top of ``L - T`` cached ones. FLOPs count only the unmasked (causal) part:
``2 * B * h_q * (d_qk + d_v) * sum_t (L - T + t + 1)``. For MLA/GLA the kernel runs the exact
absorbed form over the latent (``d_qk = d_c + d_R``, ``d_v = d_c``); the ``model TFLOP/s`` column
counts the expanded per-head form instead (``d_qk = d_h + d_R``, ``d_v = d_h``), i.e. the useful
work a non-absorbed kernel would do, so the two forms can be compared by time.

Peers (fresh case only, contiguous K/V, excluded setup): torch SDPA on the *same* maths (the
kernel's q / K / V, K/V repeated to every query head), with the first of the flash / cuDNN /
efficient backends that accepts the shape (named in the table); for MLA/GLA also SDPA on the
expanded per-head K/V (``d_qk = d_h + d_R``, ``d_v = d_h``), what the module's CPU path runs.

    export PYTHONPATH=$PWD; python3 benchmarks/bench_prefill.py [--out DIR] [--only gqa,"h_q 128"]
        [--config '{"BLOCK_N": 64, "num_warps": 4}'] [--no-sdpa]

Writes ``prefill_<date>_<GPU>.{md,json}`` into ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import bench, gemm_peak  # noqa: E402
from kvslim.kernels import prefill_separate, prefill_tied  # noqa: E402
from kvslim.kernels.prefill import prefill_separate_triton, prefill_tied_triton  # noqa: E402
from kvslim.kernels.reference import prefill_separate_ref, prefill_tied_ref  # noqa: E402
from kvslim.spec import AttentionSpec  # noqa: E402

DT = torch.bfloat16
# (label, preset, h_q): GQA with g_q = 4 (h_q 32, h_kv 8, d_h 128), GTA-4 at h_q 32, MLA (d_c 512 +
# d_R 64) at h_q 16 and 128, GLA-2 at the 1b engine shape (h_q 16, d_h 128: d_c 256 + d_R 64)
VARIANTS = [
    ("gqa-8 (h_q 32, g_q 4)", "gqa-8", 32),
    ("gta-4 (h_q 32)", "gta-4", 32),
    ("mla (h_q 16)", "mla", 16),
    ("mla (h_q 128)", "mla", 128),
    ("gla-2 (h_q 16, 1b)", "gla-2", 16),
]
CASES = [("fresh", 8, 2048, 2048), ("chunk", 8, 512, 2048)]  # (name, B, T, L)
PAGES = (16, 64)


class Problem:
    """One shape: random bf16 rows in a paged pool (shuffled pages), queries for the last T tokens."""

    def __init__(self, spec: AttentionSpec, B: int, T: int, L: int, page: int, seed: int = 0,
                 config: dict | None = None):
        self.spec, self.B, self.T, self.L, self.page, self.config = spec, B, T, L, page, config
        g = torch.Generator(device="cuda").manual_seed(seed)
        row = spec.row_dim_per_rank(1)
        pages_per_seq = -(-L // page)
        self.cache = torch.randn(B * pages_per_seq, page, row, device="cuda", dtype=DT, generator=g)
        perm = torch.randperm(B * pages_per_seq, device="cuda", generator=g)
        self.bt = perm.view(B, pages_per_seq).to(torch.int32)
        self.sl = torch.full((B,), L, dtype=torch.int32, device="cuda")
        self.tied = spec.is_tied
        if self.tied:
            self.kw = dict(num_state_heads=spec.num_state_heads, state_dim=spec.state_dim, nope_dim=spec.nope_dim,
                           rope_dim=spec.rope_dim, v_dim=spec.state_dim, softmax_scale=spec.softmax_scale)
            self.dqk, self.dv = spec.nope_dim + spec.rope_dim, spec.state_dim
        else:
            self.kw = dict(num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, softmax_scale=spec.softmax_scale)
            self.dqk = self.dv = spec.head_dim
        self.q = torch.randn(B, T, spec.num_heads, self.dqk, device="cuda", dtype=DT, generator=g) * 0.5

    def run(self):
        if self.config:  # the launcher itself, with block overrides (tuning)
            fn = prefill_tied_triton if self.tied else prefill_separate_triton
            return fn(self.q, self.cache, self.bt, self.sl, config=self.config, **self.kw)
        fn = prefill_tied if self.tied else prefill_separate
        return fn(self.q, self.cache, self.bt, self.sl, impl="triton", **self.kw)

    def check(self) -> float:
        """Max |kernel - oracle| / max |oracle| over the first sequence (fp32 oracle)."""
        o, _ = self.run()
        ref = prefill_tied_ref if self.tied else prefill_separate_ref
        ro, _ = ref(self.q[:1].float(), self.cache.float(), self.bt[:1], self.sl[:1], **self.kw)
        err = ((o[:1].float() - ro).abs().max() / ro.abs().max()).item()
        if not err < 2e-2:
            raise AssertionError(f"{self.spec.name} B={self.B} T={self.T} L={self.L} page={self.page}: rel err {err}")
        return err

    def visible_keys(self) -> int:
        """sum over the new tokens of the keys each one sees (causal: the unmasked part only)."""
        start = self.L - self.T
        return self.B * (self.T * start + self.T * (self.T + 1) // 2)

    def flops(self, dqk: int, dv: int) -> float:
        return 2.0 * self.spec.num_heads * (dqk + dv) * self.visible_keys()

    def contiguous_kv(self):
        """The kernel's K / V of every query head, contiguous ``[B, h_q, L, d]`` (fresh case: L = T)."""
        s, B, L = self.spec, self.B, self.L
        rows = self.cache[self.bt.long()].reshape(B, -1, self.cache.shape[-1])[:, :L].float()
        g = s.group_size
        if self.tied:
            S, sd = s.num_state_heads, s.state_dim
            st = rows[..., : S * sd].view(B, L, S, sd)
            rope = rows[..., S * sd :][:, :, None, :].expand(B, L, S, s.rope_dim)
            k = torch.cat([st[..., : s.nope_dim], rope], -1)
            v = st
        else:
            h, d = s.num_kv_heads, s.head_dim
            k, v = rows[..., : h * d].view(B, L, h, d), rows[..., h * d :].view(B, L, h, d)
        k = k.repeat_interleave(g, 2).transpose(1, 2).contiguous().to(DT)
        v = v.repeat_interleave(g, 2).transpose(1, 2).contiguous().to(DT)
        return k, v


def sdpa_time(q, k, v, scale):
    """(seconds, backend) of causal SDPA on contiguous ``[B, H, T, d]`` inputs, first backend that runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kernel not used because ..." for each refused backend
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
                torch.cuda.synchronize()

                def fn():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

                return bench(fn), backend.name.lower()
        except RuntimeError:
            continue
    return float("nan"), "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--only", default="", help="comma-separated substrings of variant labels")
    ap.add_argument("--config", default="", help='block overrides for every variant, JSON, e.g. '
                    '\'{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}\'')
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA peers")
    args = ap.parse_args()
    config = json.loads(args.config) if args.config else None
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill needs a CUDA GPU")
    t_start = time.time()
    peak = gemm_peak()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               gemm_peak_tflops=peak / 1e12, config=config)
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    rows = []
    only = [s for s in args.only.split(",") if s]
    for label, preset, h_q in VARIANTS:
        if only and not any(s in label for s in only):
            continue
        spec = AttentionSpec.preset(preset, num_heads=h_q)
        for case, B, T, L in CASES:
            # MLA/GLA also with the value columns split over 2 programs (no register spills in the
            # offline sm_90a compile of MLA h_q 128, at 1.5x the FLOPs): the A/B for the default
            splits = [None, {"DV_SPLIT": 2}] if spec.is_latent else [None]
            for page in PAGES:
                for split in splits:
                    cfg = {**(config or {}), **(split or {})} or None
                    p = Problem(spec, B, T, L, page, config=cfg)
                    err = p.check()
                    t = bench(p.run)
                    kflops = p.flops(p.dqk, p.dv)
                    mflops = p.flops(spec.qk_head_dim, spec.out_head_dim)
                    impl = "kvslim prefill" + (" DV_SPLIT=2" if split else "")
                    r = dict(variant=label, case=case, B=B, T=T, L=L, page=page, impl=impl, ms=t * 1e3,
                             tflops=kflops / t / 1e12, frac_peak=kflops / t / peak, model_tflops=mflops / t / 1e12,
                             rel_err=err)
                    rows.append(r)
                    print(f"{label:24s} {case:5s} B={B} T={T} L={L} page={page:2d} {impl}: {t * 1e3:8.3f} ms "
                          f"{r['tflops']:6.1f} TFLOP/s ({100 * r['frac_peak']:4.1f} % of peak)", flush=True)
            if case != "fresh" or args.no_sdpa:
                continue
            k, v = p.contiguous_kv()
            q = p.q.transpose(1, 2).contiguous()
            t, backend = sdpa_time(q, k, v, p.kw["softmax_scale"])
            kflops = p.flops(p.dqk, p.dv)
            rows.append(dict(variant=label, case=case, B=B, T=T, L=L, page=0, impl=f"sdpa same maths ({backend})",
                             ms=t * 1e3, tflops=kflops / t / 1e12, frac_peak=kflops / t / peak,
                             model_tflops=p.flops(spec.qk_head_dim, spec.out_head_dim) / t / 1e12, rel_err=None))
            print(f"{label:24s} {case:5s} sdpa same maths ({backend}): {t * 1e3:8.3f} ms", flush=True)
            del k, v
            if spec.is_latent:  # the expanded per-head form: q [B, H, T, d_h + d_R], v [B, H, T, d_h]
                qe = torch.randn(B, h_q, T, spec.qk_head_dim, device="cuda", dtype=DT)
                ke = torch.randn_like(qe)
                ve = torch.randn(B, h_q, T, spec.out_head_dim, device="cuda", dtype=DT)
                t, backend = sdpa_time(qe, ke, ve, spec.softmax_scale)
                mflops = p.flops(spec.qk_head_dim, spec.out_head_dim)
                rows.append(dict(variant=label, case=case, B=B, T=T, L=L, page=0,
                                 impl=f"sdpa expanded K/V ({backend})", ms=t * 1e3, tflops=mflops / t / 1e12,
                                 frac_peak=mflops / t / peak, model_tflops=mflops / t / 1e12, rel_err=None))
                print(f"{label:24s} {case:5s} sdpa expanded ({backend}): {t * 1e3:8.3f} ms", flush=True)
                del qe, ke, ve
            del p
            torch.cuda.empty_cache()
    env["seconds"] = round(time.time() - t_start, 1)
    write(rows, env, Path(args.out))


def write(rows: list[dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gpu = env["gpu"].replace(" ", "_")
    stem = out / f"prefill_{env['date'][:10]}_{gpu}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, rows=rows), indent=2) + "\n")
    lines = [
        f"# Prefill attention, {env['gpu']} ({env['date']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}; bf16 GEMM peak measured in this run: "
        f"{env['gemm_peak_tflops']:.0f} TFLOP/s. Causal FLOPs (unmasked part only); `TFLOP/s` counts the maths "
        "each row runs (absorbed over the latent for kvslim MLA/GLA), `model TFLOP/s` the expanded per-head form.",
        "",
        "| variant | case | B x T (L) | page | impl | ms | TFLOP/s | % of GEMM peak | model TFLOP/s | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {r['variant']} | {r['case']} | {r['B']} x {r['T']} ({r['L']}) | {r['page'] or '-'} | "
                     f"{r['impl']} | {r['ms']:.3f} | {r['tflops']:.1f} | {100 * r['frac_peak']:.1f} | "
                     f"{r['model_tflops']:.1f} | {err} |")
    lines.append(f"\n{env['seconds']} s in all.\n")
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {stem}.md / .json")


if __name__ == "__main__":
    main()
