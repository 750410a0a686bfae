"""``kvslim eval ppl``: perplexity of kvslim or Hugging Face model directories on named corpora or files."""

from __future__ import annotations

import json
import sys

from kvslim.checkpoint import check_output_file, prepare_output_file


def add(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate models (perplexity)", description="Evaluate models.")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    q = sub.add_parser(
        "ppl", help="perplexity on held-out text",
        description="Perplexity of a kvslim or Hugging Face model directory on held-out text "
        "(non-overlapping windows unless --stride).",
    )
    q.add_argument("--model", required=True, action="append", help="model directory or a known model (smollm2, "
                   "qwen2.5-coder-0.5b); repeatable")
    q.add_argument("--text", action="append", help="sotu-eval, moby-dick, shakespeare (bare name = held-out part), "
                   "a text file or .npy/.bin ids; repeatable (default sotu-eval)")
    q.add_argument("--tokenizer", help="tokenizer (default: the model directory's)")
    q.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    q.add_argument("--stride", type=int, help="sliding-window stride (default: seq-len, no overlap)")
    q.add_argument("--max-tokens", type=int, help="use only the first N tokens of each text")
    q.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    q.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    q.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    q.add_argument("--clean-text", action="store_true",
                   help="normalise text files as the corpora are (CRLF, BOM, blank lines, surrounding whitespace); "
                        "default: score a file's text exactly as stored")
    q.set_defaults(func=run)


def run(args) -> int:
    from kvslim.eval.models import resolve_model_dir
    from kvslim.eval.perplexity import eval_ppl

    if args.json:
        check_output_file(args.json, flag="--json")
    texts = args.text or ["sotu-eval"]
    rows = []
    for m in args.model:
        for r in eval_ppl(model=resolve_model_dir(m), texts=texts, tokenizer=args.tokenizer, seq_len=args.seq_len,
                          batch_size=args.batch_size, max_tokens=args.max_tokens, stride=args.stride,
                          device=args.device, dtype=args.dtype, progress=sys.stderr.isatty(),
                          clean=args.clean_text):
            rows.append({"model": m, **r})
    w = max(len("model"), *(len(r["model"]) for r in rows))
    t = max(len("text"), *(len(str(r["text"])) for r in rows))
    print(f"{'model':<{w}}  {'text':<{t}}  {'scored':>9}  {'of':>9}  {'windows':>7}  {'nll':>7}  {'ppl':>10}")
    for r in rows:
        print(f"{r['model']:<{w}}  {r['text']!s:<{t}}  {r['tokens']:>9,}  {r['source_tokens']:>9,}  {r['windows']:>7,}  "
              f"{r['nll']:>7.4f}  {r['ppl']:>10.3f}")
    stride = args.stride or args.seq_len
    print(f"scored: every token after the first of each {args.seq_len}-token window (stride {stride})"
          + (f", the first {args.max_tokens:,} tokens of each text" if args.max_tokens else "")
          + ("; text files normalised (--clean-text)" if args.clean_text else "; text files exactly as stored"))
    if args.json:
        with open(prepare_output_file(args.json), "w") as f:
            json.dump(rows, f, indent=1)
    return 0
