"""FP8 KV cache quality (issue 15): perplexity with an fp8 vs a bf16 KV cache, and a long greedy run.

Models: SmolLM2-135M-Instruct (the original, GQA-3) and its MLA r=192, GLA-3 (3 x 64) and GTA-3
conversions (calibrated on older SOTU addresses, no fine-tuning; the demo's settings). Weights
in fp32; the KV cache in bf16 or fp8 (``kvslim.rows``: e4m3 with an fp32 scale per token per
tile, the RoPE key of the tied kinds in bf16). Perplexity is computed with every attention
reading K/V exactly as that cache gives them back (``Transformer.set_attention_options(kv_dtype=)``,
tested equal to step-by-step decoding over the cache), on four genres: SOTU (the conversions'
calibration genre: in-domain for them), Moby-Dick, Shakespeare and Python source code from the
standard library of the running interpreter (held out for everything). Then a 1024-token greedy
generation with an fp8 and a bf16 cache, compared token by token (the original and MLA by default).

Usage (CPU, ~40 minutes on 2 quiet cores):  python -m benchmarks.fp8_quality [--tokens 4096] [--gen 1024]
Writes benchmarks/results/fp8_quality.{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results"
CODE_FILES = ("argparse.py", "textwrap.py", "fractions.py", "shlex.py", "configparser.py", "difflib.py")
PROMPT = "The history of the printing press begins"


def code_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f).read_text(encoding="utf-8") for f in CODE_FILES)


def genres(tok, n_tokens: int) -> dict[str, torch.Tensor]:
    from kvslim.eval.data import load_text
    from kvslim.eval.tokenizer import tokenize

    texts = {"sotu (calibration genre)": load_text("sotu", "eval"), "moby-dick": load_text("moby-dick", "eval"),
             "shakespeare": load_text("shakespeare", "eval"), "python code": code_text()}
    return {k: tokenize(v, tok)[:n_tokens] for k, v in texts.items()}


def models(src: Path, calib_samples: int, log):
    from kvslim.convert import attention_input_moments, calibration_batches, convert_model
    from kvslim.eval.data import load_text
    from kvslim.eval.tokenizer import tokenize
    from kvslim.model import Transformer

    base = Transformer.from_pretrained(src).eval()
    calib = calibration_batches(tokenize(load_text("sotu", "calib"), src), num_samples=calib_samples, seq_len=256)
    moments = attention_input_moments(base, calib, progress=False)
    out = {"SmolLM2 (GQA-3)": base}
    for label, kw in (("MLA r=192", dict(to="mla", kv_lora_rank=192, rope_dim=64, freqfold=2)),
                      ("GLA-3 3x64", dict(to="gla", latent_heads=3, kv_lora_rank=64, rope_dim=64, freqfold=2)),
                      ("GTA-3", dict(to="gta", freqfold=4))):
        t = time.time()
        out[label], _ = convert_model(base, moments=moments, progress=False, **kw)
        out[label].eval()
        log(f"converted {label} in {time.time() - t:.0f} s")
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv=None) -> None:
    from kvslim.eval.perplexity import model_perplexity
    from kvslim.eval.smollm2 import smollm2_dir
    from kvslim.eval.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per genre")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=1024, help="greedy tokens compared fp8 vs bf16")
    ap.add_argument("--gen-models", default="SmolLM2 (GQA-3),MLA r=192",
                    help="comma-separated model labels that get the long greedy run (each costs ~10 min on 2 CPU cores)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    src = smollm2_dir()
    tok = load_tokenizer(src)
    data = genres(tok, a.tokens)
    ms = models(src, a.calib_samples, log)
    rows = []
    for label, m in ms.items():
        for genre, ids in data.items():
            r = {"model": label, "genre": genre, "tokens": None, "kv_bytes": {}}
            for kv in ("bf16", "fp8"):
                m.set_attention_options(kv_dtype=kv)
                p = model_perplexity(m, ids, seq_len=a.seq_len, batch_size=4, device="cpu")
                r[kv], r["tokens"] = p["ppl"], p["tokens"]
                r["kv_bytes"][kv] = m.spec.row_format(kv).row_bytes
            m.set_attention_options(kv_dtype="none")
            r["delta_pct"] = 100 * (r["fp8"] / r["bf16"] - 1)
            rows.append(r)
            log(f"{label:16s} {genre:26s} bf16 {r['bf16']:8.3f}  fp8 {r['fp8']:8.3f}  ({r['delta_pct']:+.2f} %)")
    prompt = tok(PROMPT)["input_ids"]
    gens = []
    wanted = [x.strip() for x in a.gen_models.split(",") if x.strip()]
    for label, m in ms.items():
        if label not in wanted:
            continue
        t = time.time()
        with torch.inference_mode():
            ref = m.generate([prompt], max_new_tokens=a.gen, kv_dtype="bf16", page_size=64)[0]
            got = m.generate([prompt], max_new_tokens=a.gen, kv_dtype="fp8", page_size=64)[0]
        d = first_divergence(got, ref)
        same = sum(x == y for x, y in zip(got, ref))
        gens.append({"model": label, "tokens": a.gen, "first_divergence": d, "same_positions": same,
                     "bf16_text": tok.decode(ref[:60]), "fp8_text": tok.decode(got[:60])})
        log(f"{label}: greedy {a.gen} tokens, first divergence at {d} ({time.time() - t:.0f} s)")
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "eval_tokens": a.tokens,
            "seq_len": a.seq_len, "code_files": list(CODE_FILES), "seconds": round(time.time() - t0)}
    write(Path(a.out), rows, gens, meta)


def write(out: Path, rows, gens, meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_quality.json").write_text(json.dumps({"meta": meta, "ppl": rows, "generation": gens}, indent=1))
    worst = max(abs(r["delta_pct"]) for r in rows)
    held = [r for r in rows if "calibration" not in r["genre"]]
    lines = [
        "# FP8 KV cache quality (issue 15)",
        "",
        f"{meta['date']}, CPU ({meta['machine']}), Python {meta['python']}, torch {meta['torch']}; generated by "
        "`python -m benchmarks.fp8_quality` in "
        f"{meta['seconds']} s. SmolLM2-135M-Instruct and its conversions (no fine-tuning), fp32 weights; the KV cache "
        "in bf16 or in kvslim's fp8 row (e4m3, an fp32 scale per token per tile, RoPE key in bf16). Every attention "
        "reads K/V as that cache returns them. Perplexity over the first "
        f"{meta['eval_tokens']} tokens of each text, non-overlapping {meta['seq_len']}-token windows. Python code: "
        f"{', '.join(meta['code_files'])} from this interpreter's standard library.",
        "",
        f"**Largest change from fp8: {worst:+.2f} %** over all models and genres "
        f"(held-out genres only: {max(abs(r['delta_pct']) for r in held):.2f} %; target: within +1 %).",
        "",
        "| model | KV B/token/layer bf16 → fp8 | genre | ppl, bf16 KV | ppl, fp8 KV | change |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kv_bytes']['bf16']} → {r['kv_bytes']['fp8']} | {r['genre']} | "
                     f"{r['bf16']:.3f} | {r['fp8']:.3f} | {r['delta_pct']:+.2f} % |")
    lines += ["", f"## Greedy generation, {gens[0]['tokens']} tokens, fp8 vs bf16 cache", "",
              f"Prompt: {PROMPT!r}.", "",
              "| model | first differing token | positions equal | start of the bf16 output | start of the fp8 output |",
              "|---|---:|---:|---|---|"]
    for g in gens:
        d = "none" if g["first_divergence"] is None else str(g["first_divergence"])
        lines.append(f"| {g['model']} | {d} | {g['same_positions']}/{g['tokens']} | {g['bf16_text'][:80]!r} | "
                     f"{g['fp8_text'][:80]!r} |")
    (out / "fp8_quality.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = list(dict.fromkeys(r["model"] for r in rows))
    genres_ = list(dict.fromkeys(r["genre"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    w = 0.8 / len(genres_)
    for j, gname in enumerate(genres_):
        vals = [next(r["delta_pct"] for r in rows if r["model"] == m and r["genre"] == gname) for m in models_]
        ax.bar([i + j * w for i in range(len(models_))], vals, w, label=gname)
    ax.axhline(1.0, color="red", lw=0.8, ls="--", label="+1 % target")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(models_))], models_)
    ax.set_ylabel("perplexity change, fp8 vs bf16 KV (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fp8_quality.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
