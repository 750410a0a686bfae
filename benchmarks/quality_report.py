"""The quality study's report: ``quality.csv``, ``quality.png`` and the markdown table, from a run's JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.quality_setup import EVAL_SETS, SHAPE, VARIANTS, spec_for


def _stats(xs):
    m = statistics.mean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0), min(xs), max(xs)


def report(a) -> None:
    """quality.csv + quality.png from the run's JSON (and the CUDA-graph decode JSON); prints the table."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(a.results).read_text())
    info, cfgs = res["info"], res["configs"]
    eager = {d["variant"]: d for d in res["decode"] if "error" not in d}
    graph = json.loads(Path(a.decode).read_text()) if a.decode else {"rows": [], "info": {}}
    gctx = sorted({r["context"] for r in graph["rows"]})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in res["runs"])]
    rows = []
    for v in variants:
        rs = [r for r in res["runs"] if r["variant"] == v]
        name = spec_for(v).name
        row = {
            "variant": v,
            "seeds": len(rs),
            "params": cfgs[v]["params"],
            "params_rel_mha": cfgs[v]["rel_diff"],
            "ff": cfgs[v]["ff"],
            "kv_elems_layer": cfgs[v]["kv_elems_layer"],
            "kv_bytes_token": cfgs[v]["kv_bytes_token"],
            "tokens": rs[0]["tokens"],
            "steps": rs[0]["steps"],
            "train_tok_s": statistics.mean(r["tok_per_s"] for r in rs),
        }
        for ev in EVAL_SETS:
            m, sd, lo, hi = _stats([r["final"][ev]["ppl"] for r in rs])
            row[f"{ev}_ppl"], row[f"{ev}_sd"], row[f"{ev}_min"], row[f"{ev}_max"] = m, sd, lo, hi
            row[f"{ev}_seeds"] = " ".join(
                f"{r['final'][ev]['ppl']:.2f}" for r in sorted(rs, key=lambda r: r["seed"])
            )
        d = eager.get(name)
        if d:
            for ctx, us in d["step_us"].items():
                row[f"eager_us_{ctx}"] = us
            row["generate_tok_s_b1"] = d["generate_tok_s_b1"]
        for g in graph["rows"]:
            if g["variant"] == name and "graph_us" in g:
                row[f"graph_us_{g['context']}"] = g["graph_us"]
        if len(gctx) >= 2 and all(f"graph_us_{c}" in row for c in gctx[:1] + gctx[-1:]):
            lo_c, hi_c = gctx[0], gctx[-1]
            extra = spec_for(v).bytes_per_token(2) * SHAPE["layers"] * 64 * (hi_c - lo_c)
            row["marginal_kv_tb_s"] = (
                extra / ((row[f"graph_us_{hi_c}"] - row[f"graph_us_{lo_c}"]) * 1e-6) / 1e12
            )
        rows.append(row)

    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for r in rows:
        c = colors[r["variant"]]
        ax.errorbar(
            r["kv_bytes_token"],
            r["sotu_ppl"],
            yerr=[[r["sotu_ppl"] - r["sotu_min"]], [r["sotu_max"] - r["sotu_ppl"]]],
            fmt="o",
            capsize=4,
            color=c,
        )
        for p in r["sotu_seeds"].split():
            ax.plot(r["kv_bytes_token"], float(p), "x", color=c, ms=5)
        ax.annotate(
            r["variant"].upper(),
            (r["kv_bytes_token"], r["sotu_ppl"]),
            textcoords="offset points",
            xytext=(7, 3),
            color=c,
        )
    ax.set(
        xscale="log",
        xlabel=f"KV cache bytes / token (bf16, {SHAPE['layers']} layers)",
        ylabel="SOTU held-out perplexity",
        title="quality vs KV size (o mean, x seeds, bars min..max)",
    )
    ax.grid(alpha=0.3)
    ax = axes[1]
    for v in variants:
        rs = [r for r in res["runs"] if r["variant"] == v]
        mean = [statistics.mean(r["val"][i]["ppl"] for r in rs) for i in range(len(rs[0]["val"]))]
        ax.plot(
            [p["tokens"] / 1e6 for p in rs[0]["val"]][1:],
            mean[1:],
            "o-",
            ms=2.5,
            label=v.upper(),
            color=colors[v],
        )
    ax.set(
        yscale="log",
        xlabel="training tokens (M)",
        ylabel="validation ppl (first 32K SOTU-eval tokens)",
        title="validation curves (mean over seeds)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    if gctx:
        width = 0.8 / len(gctx)
        for i, c in enumerate(gctx):
            ax.bar(
                [j + i * width for j in range(len(rows))],
                [r.get(f"graph_us_{c}", float("nan")) for r in rows],
                width,
                label=f"context {c}",
                alpha=0.55 + 0.45 * i / max(1, len(gctx) - 1),
                color=[colors[r["variant"]] for r in rows],
                edgecolor="k",
            )
            for j, r in enumerate(rows):
                ax.annotate(
                    f"{c // 1024}K",
                    (j + i * width, r.get(f"graph_us_{c}", 0)),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(
            [j + width * (len(gctx) - 1) / 2 for j in range(len(rows))], [r["variant"].upper() for r in rows]
        )
        ax.set(
            ylabel="µs per decode step (whole model, CUDA graph)",
            title="decode step, B=64, bf16, Triton (kvslim.kernels)",
        )
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"kvslim quality study: {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
        f"{info['date'][:10]}; {rows[0]['tokens'] / 1e6:.1f}M tokens/run, "
        f"{rows[0]['params'] / 1e6:.1f}M params (±0.3 %), {max(r['seeds'] for r in rows)} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)

    hdr = (
        "| variant | params | MLP width | KV elems/token/layer | KV bytes/token (all layers) | SOTU ppl mean ± sd "
        "(seeds) | moby-dick ppl | shakespeare ppl | "
        + " | ".join(f"decode µs, graph, ctx {c}" for c in gctx)
        + " | marginal KV TB/s | decode µs eager, ctx 8192 | generate tok/s (B=1, eager) |"
    )
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['variant'].upper()} | {r['params'] / 1e6:.2f}M ({r['params_rel_mha']:+.2%}) | {r['ff']} "
            f"| {r['kv_elems_layer']} | {r['kv_bytes_token']:,} "
            f"| **{r['sotu_ppl']:.1f}** ± {r['sotu_sd']:.1f} ({r['sotu_seeds'].replace(' ', ', ')}) "
            f"| {r['moby-dick_ppl']:.0f} ± {r['moby-dick_sd']:.0f} | {r['shakespeare_ppl']:.0f} ± {r['shakespeare_sd']:.0f} | "
            + " | ".join(f"{r.get(f'graph_us_{c}', float('nan')):,.0f}" for c in gctx)
            + f" | {r.get('marginal_kv_tb_s', float('nan')):.2f} | {r.get('eager_us_8192', float('nan')):,.0f} "
            f"| {r.get('generate_tok_s_b1', float('nan')):.0f} |"
        )
    print("\n".join(lines))
    print(
        f"\ncopy bandwidth measured with the graph decode run: {graph['info'].get('copy_tb_s', float('nan')):.2f} TB/s"
    )
