"""Training curves: ``train_log.csv`` (one row per logged step) and ``curves.png`` (loss, perplexity)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

LOG_CSV = "train_log.csv"
CURVES_PNG = "curves.png"


def save_curves(history: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``train_log.csv`` (one row per logged step, val columns where evaluated) and ``curves.png``."""
    out = Path(out_dir)
    val = {r["step"]: r for r in history["val"]}
    cols = [
        "step",
        "tokens",
        "lr",
        "loss",
        "grad_norm",
        "tok_per_s",
        "elapsed_s",
        "val_loss",
        "val_ppl",
        "val_kl",
    ]
    rows = {r["step"]: dict(r) for r in history["train"]}
    for s, r in val.items():
        row = rows.setdefault(s, {"step": s, "tokens": r["tokens"]})
        row.update(val_loss=r["loss"], val_ppl=r["ppl"], val_kl=r.get("kl"))
    csv_path = out / LOG_CSV
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for s in sorted(rows):
            w.writerow({k: rows[s].get(k) for k in cols})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    tr = history["train"]
    if tr:
        a1.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], label="train", lw=1)
    if history["val"]:
        v = history["val"]
        a1.plot([r["tokens"] / 1e6 for r in v], [r["loss"] for r in v], "o-", label="validation", ms=3)
        a2.plot([r["tokens"] / 1e6 for r in v], [r["ppl"] for r in v], "o-", ms=3)
        a2.set_yscale("log")
    a1.set(xlabel="tokens (M)", ylabel="loss (nats/token)", title="loss")
    a1.legend()
    a2.set(xlabel="tokens (M)", ylabel="perplexity", title="validation perplexity")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    png = out / CURVES_PNG
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return csv_path, png
