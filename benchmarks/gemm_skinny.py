"""Skinny decode GEMMs (M = batch) vs weight bytes / copy bandwidth: cuBLAS vs Inductor max-autotune.

A decode step's GEMMs read every weight once; at M = 64-256 they should run at the copy
bandwidth. This times each projection shape of a model shape (``--shape``, kvslim's
random-model shapes) as ``F.linear`` (cuBLAS) and compiled with ``mode="max-autotune-no-cudagraphs"``
(Inductor benchmarks its Triton templates, split-K included, against cuBLAS and keeps the faster),
each replayed in a CUDA graph with an L2 flush (``timing.bench_graph``).

    python benchmarks/gemm_skinny.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import bench_graph


def shapes(shape: str, kv_heads: int) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of one layer's projections (fused q/k/v and gate/up) and the lm_head."""
    from kvslim.engine.source import SHAPES

    s = SHAPES[shape]
    D, H, d, inter, V = s["hidden"], s["heads"], s["head_dim"], s["inter"], s["vocab"]
    return {"qkv": (D, (H + 2 * kv_heads) * d), "o": (H * d, D), "gate_up": (D, 2 * inter),
            "down": (inter, D), "lm_head": (D, V)}


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = bench_graph(lambda: y.copy_(x), n=3)
    return 2 * x.numel() / t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for M in (int(b) for b in args.batch.split(",")):
        for name, (K, N) in shapes(args.shape, args.kv_heads).items():
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            floor = (N * K + M * K + M * N) * 2 / bw
            t_blas = bench_graph(lambda x=x, w=w: F.linear(x, w))
            row = dict(M=M, name=name, K=K, N=N, floor_us=floor * 1e6, cublas_us=t_blas * 1e6)
            if args.autotune:
                f = torch.compile(lambda a, w=w: F.linear(a, w), mode="max-autotune-no-cudagraphs", dynamic=False)
                torch.testing.assert_close(f(x), F.linear(x, w), rtol=2e-2, atol=2e-2)
                row["autotune_us"] = bench_graph(lambda f=f, x=x: f(x)) * 1e6
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gemm_skinny_{gpu.replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, date=date,
                                                         copy_tb_s=bw / 1e12, rows=rows), indent=1))
    lines = [f"# Skinny decode GEMMs ({gpu}, {date})", "",
             f"torch {torch.__version__}, bf16, `{args.shape}` shape; floor = bytes / copy bandwidth "
             f"({bw / 1e12:.2f} TB/s, same run); CUDA-graph replay with an L2 flush.", "",
             "| M | GEMM | K x N | floor us | cuBLAS us | cuBLAS / floor | autotune us | autotune / floor |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        at = r.get("autotune_us")
        lines.append(f"| {r['M']} | {r['name']} | {r['K']} x {r['N']} | {r['floor_us']:.1f} | {r['cublas_us']:.1f} | "
                     f"{r['cublas_us'] / r['floor_us']:.2f}x | {at or float('nan'):.1f} | "
                     f"{(at or float('nan')) / r['floor_us']:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
