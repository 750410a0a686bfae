"""Plots of the engine results (PNG beside the markdown): decode step vs roofline per page size
(``engine_roofline_*.json``) and the prefill step's fraction of the GEMM peak (``prefill_step_*.json``).

    python -m benchmarks.plot_engine benchmarks/results/engine_roofline_NVIDIA_H100_80GB_HBM3.json \
        benchmarks/results/prefill_step_NVIDIA_H100_80GB_HBM3.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows_of(path: Path) -> tuple[list[dict], dict]:
    d = json.loads(path.read_text())
    runs = d.get("runs", [d])
    return [dict(r, run=i) for i, run in enumerate(runs) for r in run["rows"]], runs[0]["meta"]


def plot_roofline(path: Path) -> Path:
    rows, meta = rows_of(path)
    labels, vals, colors = [], [], []
    for r in rows:
        labels.append(f"{r['variant']}\nB={r['batch']} p{r['page_size']}")
        vals.append(r["ratio"] if "ratio" in r else r["step_ms"] / r["roofline_ms"])
        colors.append("tab:blue" if r["page_size"] == 16 else "tab:orange")
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 3.6))
    ax.bar(range(len(vals)), vals, color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel("decode step / roofline")
    ax.set_title(f"engine decode step vs roofline, {meta['gpu']} {meta['date']} (blue: page 16, orange: page 64)",
                 fontsize=9)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_prefill(path: Path) -> Path:
    rows, meta = rows_of(path)
    rows = [r for r in rows if r.get("rel_err_vs_eager") is not None or not r["compile"]]
    labels = [f"{r['variant']}{' (old)' if r['run'] else ''}\n{'comp' if r['compile'] else 'eager'} h{r['start']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.75), 3.8))
    ax.bar(range(len(rows)), [100 * r["peak_frac"] for r in rows],
           color=["tab:green" if r["compile"] else "tab:gray" for r in rows])
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("% of bf16 GEMM peak (model FLOPs)")
    ax.set_title(f"prefill step, 4 x 2048 new tokens after h cached ones, {meta['gpu']} {meta['date']} "
                 "(old: latent history on the absorbed kernel)", fontsize=9)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> None:
    for p in map(Path, argv if argv is not None else sys.argv[1:]):
        print("wrote", plot_prefill(p) if p.name.startswith("prefill_step") else plot_roofline(p))


if __name__ == "__main__":
    main()
