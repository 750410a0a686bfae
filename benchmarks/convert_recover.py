"""Recovery after conversion: SmolLM2-135M -> MLA / GLA / GTA, then `kvslim finetune` (distillation).

For each target: convert (TransMLA machinery, one calibration shared by all targets),
perplexity before, distil from the original model on the SOTU *calib* split for ``--steps``
steps, perplexity after — on the same held-out SOTU eval tokens and windows as
``convert_report.py`` (first 2048 tokens, windows of 512), so the numbers line up with
``results/convert.md``. Results go to ``results/convert_recovery.{json,md}``.

    python -m benchmarks.convert_recover --steps 100 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvslim.convert import attention_input_moments, convert_model
from kvslim.convert.calib import calibration_tokens
from kvslim.eval.data import split_text
from kvslim.eval.perplexity import perplexity
from kvslim.eval.smollm2 import smollm2_dir
from kvslim.eval.tokenizer import load_tokenizer, tokenize
from kvslim.model import Transformer
from kvslim.train import finetune

TARGETS = {
    "mla-r128-ff2": dict(to="mla", kv_lora_rank=128, rope_dim=64, freqfold=2),
    "gla3-d64-ff2": dict(to="gla", latent_heads=3, kv_lora_rank=64, rope_dim=64, freqfold=2),
    "gta3-joint-ff4": dict(to="gta", freqfold=4, gta_state="joint"),
    "mla-r64-ff2": dict(to="mla", kv_lora_rank=64, rope_dim=64, freqfold=2),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="mla-r128-ff2,gla3-d64-ff2,gta3-joint-ff4", help=f"from {sorted(TARGETS)}")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/convert_recovery")
    args = ap.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = set(names) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {sorted(TARGETS)}")

    src = smollm2_dir()
    tok = load_tokenizer(src)
    teacher = Transformer.from_pretrained(src).eval()
    ids = tokenize(split_text("sotu")["eval"], tok)[: args.eval_tokens]

    run_dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")

    def ppl(m):  # conversion runs on the CPU; perplexity where the fine-tuning runs
        m = m.to(run_dev).eval()
        with torch.inference_mode():
            return perplexity(lambda x: m(x.to(run_dev)), ids, seq_len=512, batch_size=4, progress=False)["ppl"]

    calib = calibration_tokens(src, num_samples=16, seq_len=256, seed=0)
    moments = attention_input_moments(teacher, calib, progress=True)
    rows = [{"target": "original GQA-3", "kv_elems": teacher.spec.row_dim, "ppl_before": ppl(teacher)}]
    for name in names:
        t0 = time.time()
        conv, _ = convert_model(teacher.cpu(), moments=moments, progress=False, **TARGETS[name])
        before = ppl(conv)
        student, hist = finetune(model=conv, teacher=teacher, text="sotu:calib", tokenizer=str(src),
                                 steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 lr=args.lr, device=args.device, eval_every=0, save_every=0, progress=True)
        after = ppl(student.float())
        rows.append({"target": name, "kv_elems": conv.spec.row_dim, "ppl_before": before, "ppl_after": after,
                     "seconds": round(time.time() - t0, 1), **TARGETS[name]})
        print(f"{name}: ppl {before:.2f} -> {after:.2f} after {args.steps} distillation steps")
        base = rows[0]["ppl_before"]
        meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "lr": args.lr, "train_text": "sotu calib split (disjoint from eval)",
                "eval": f"sotu eval split, first {ids.numel()} tokens, windows of 512"}
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        lines = [
            "# Recovery after conversion (SmolLM2-135M, distillation with `kvslim finetune`)", "",
            f"{meta['date']}, {meta['device']}, torch {meta['torch']}. Student distilled from the original model "
            f"(KL on full-vocabulary logits, T=1) for {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
            f"({args.steps * args.batch_size * args.seq_len:,} tokens) of the SOTU calib split, lr {args.lr} "
            f"(warm-up 10 %, cosine). Perplexity: {meta['eval']} (same protocol as convert.md).", "",
            "| model | KV elements/token/layer | ppl after conversion | ppl after fine-tuning | x original (after) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            after_s = f"{r['ppl_after']:.2f}" if "ppl_after" in r else "-"
            ratio = r.get("ppl_after", r["ppl_before"]) / base
            lines.append(f"| {r['target']} | {r['kv_elems']} | {r['ppl_before']:.2f} | {after_s} | x{ratio:.2f} |")
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
