"""N-gram speculative decoding and prefix caching on the real SmolLM2-135M-Instruct (issue 13).

Speculation: two single-request prompts whose answers copy from the prompt — a summary of a
State of the Union excerpt (``load_text("sotu", "eval")``) and a code edit (rename a variable in
a Python function taken from this repository) — decoded greedily with ``num_speculative_tokens``
k = 0 (plain) and k > 0 (prompt lookup, n-grams 1..3). Reported: proposed and accepted tokens,
acceptance rate, tokens per decode step (a verify step yields 1 + accepted tokens), decode
tokens/s and its speed-up over k = 0, and whether the tokens equal k = 0's exactly.

Prefix caching: N requests sharing a long system prompt (a Moby-Dick excerpt as reference text)
with different questions, prefix caching off vs on: prefill tokens, hit rate, wall time.

Usage: ``python -m benchmarks.spec_prefix [--device cuda] [--k 3,5] [--max-tokens 96]``
(CPU by default, one thread, ~6 minutes on a shared 2-core machine). Writes benchmarks/results/spec_prefix_<device>.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams
from kvslim.eval.data import load_text
from kvslim.eval.smollm2 import smollm2_dir
from kvslim.eval.tokenizer import load_tokenizer
from kvslim.model import Transformer

OUT = Path(__file__).resolve().parent / "results"
CODE_SOURCE = Path(__file__).resolve().parents[1] / "kvslim" / "engine" / "speculative.py"


def _chat(tok, user: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def spec_prompts(tok, n_words: int) -> dict[str, list[int]]:
    text = " ".join(load_text("sotu", "eval").split()[:n_words])
    src = CODE_SOURCE.read_text()
    code = src[src.index("def propose_ngram") : src.index("def accepted_prefix")].strip()
    return {
        "summary (SOTU excerpt)": _chat(tok, f"Summarize the following speech excerpt, quoting its key sentences.\n\n{text}"),
        "code edit (rename)": _chat(tok, "Rewrite this Python function with the variable `arr` renamed to `ids`. "
                                    f"Output only the code.\n\n```python\n{code}\n```"),
    }


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], dict]:
    """Drive the engine step by step; time the steps that ran no prefill (decode / verify steps)."""
    seqs = [engine.add_request(p, params) for p in prompts]
    decode_steps, decode_s, t0 = 0, 0.0, time.perf_counter()
    first_tokens = 0
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        if engine.last_step[1] == 0:
            decode_steps += 1
            decode_s += time.perf_counter() - t
        else:
            first_tokens = sum(1 for s in seqs if s.output)
    wall = time.perf_counter() - t0
    gen = sum(len(s.output) for s in seqs)
    return [s.output for s in seqs], dict(wall_s=wall, decode_steps=decode_steps, decode_s=decode_s,
                                          decode_tokens=gen - first_tokens, generated=gen)


def bench_spec(model, tok, device, ks: list[int], max_tokens: int, n_words: int) -> list[dict]:
    rows = []
    params = SamplingParams(max_tokens=max_tokens)
    for name, prompt in spec_prompts(tok, n_words).items():
        base = None
        for k in [0, *ks]:
            eng = LLMEngine(model, EngineConfig(num_pages=512, page_size=16, max_batch=4, device=device,
                                                num_speculative_tokens=k), eos_token_id=tok.eos_token_id)
            out, m = run(eng, [prompt], params)
            s = eng.stats()
            tps = m["decode_tokens"] / max(1e-9, m["decode_s"])
            if base is None:
                base = (out, tps)
            rows.append(dict(prompt=name, prompt_tokens=len(prompt), k=k, generated=m["generated"],
                             proposed=s["spec_proposed_tokens"], accepted=s["spec_accepted_tokens"],
                             acceptance=s["spec_acceptance_rate"],
                             tokens_per_step=m["decode_tokens"] / max(1, m["decode_steps"]),
                             decode_tok_s=tps, speedup=tps / base[1], same=out == base[0]))
            print(rows[-1], flush=True)
    return rows


def bench_prefix(model, tok, device, n_requests: int, system_words: int) -> list[dict]:
    system = "You are a helpful assistant. Answer questions about this text.\n\n" + " ".join(
        load_text("moby-dick", "eval").split()[:system_words])
    questions = ["Who is the narrator?", "What is the ship called?", "Where does the story begin?",
                 "What is the mood of the text?", "Name one character.", "What is a harpoon?",
                 "Summarize the first sentence.", "What does the narrator want?"]
    prompts = [_chat(tok, questions[i % len(questions)] + f" (question {i})", system) for i in range(n_requests)]
    params = SamplingParams(max_tokens=8)
    rows, base = [], None
    for on in (False, True):
        eng = LLMEngine(model, EngineConfig(num_pages=1024, page_size=16, max_batch=8, max_num_batched_tokens=2048,
                                            device=device, enable_prefix_caching=on), eos_token_id=tok.eos_token_id)
        out, m = run(eng, prompts, params)
        s = eng.stats()
        base = base or (out, m["wall_s"])
        rows.append(dict(prefix_caching=on, requests=n_requests, prompt_tokens=sum(map(len, prompts)),
                         prefill_tokens=s["prefill_tokens"], hit_tokens=s["prefix_hit_tokens"],
                         hit_rate=s["prefix_hit_rate"], wall_s=m["wall_s"], speedup=base[1] / m["wall_s"],
                         same=out == base[0]))
        print(rows[-1], flush=True)
    return rows


def markdown(spec_rows, prefix_rows, header: str) -> str:
    lines = [header, "", "## N-gram speculative decoding (greedy, batch 1, prompt lookup n = 1..3)", "",
             "| prompt | prompt tokens | k | generated | proposed | accepted | acceptance | tokens/step | "
             "decode tok/s | speed-up | tokens == k=0 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in spec_rows:
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['k']} | {r['generated']} | {r['proposed']} | "
                     f"{r['accepted']} | {r['acceptance']:.2f} | {r['tokens_per_step']:.2f} | "
                     f"{r['decode_tok_s']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same'] else 'NO'} |")
    lines += ["", "## Prefix caching (requests sharing one long system prompt, 8 new tokens each)", "",
              "| prefix caching | requests | prompt tokens | prefilled tokens | hit tokens | hit rate | wall s | "
              "speed-up | tokens == off |", "|---|---|---|---|---|---|---|---|---|"]
    for r in prefix_rows:
        lines.append(f"| {'on' if r['prefix_caching'] else 'off'} | {r['requests']} | {r['prompt_tokens']} | "
                     f"{r['prefill_tokens']} | {r['hit_tokens']} | {r['hit_rate']:.3f} | {r['wall_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {'yes' if r['same'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--k", default="3,5", help="speculative tokens to compare with k=0 (default 3,5)")
    ap.add_argument("--max-tokens", type=int, default=96, help="new tokens per speculation prompt (default 96)")
    ap.add_argument("--words", type=int, default=250, help="words of the SOTU excerpt (default 250)")
    ap.add_argument("--requests", type=int, default=12, help="requests sharing the system prompt (default 12)")
    ap.add_argument("--system-words", type=int, default=300, help="words of the system prompt (default 300)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine more threads ran 10x slower)")
    ap.add_argument("--out", type=Path, help="markdown file (default benchmarks/results/spec_prefix_<device>.md)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = Transformer.from_pretrained(smollm2_dir()).to(device).eval()
    tok = load_tokenizer(smollm2_dir())
    name = platform.processor() or platform.machine() if device.type == "cpu" else torch.cuda.get_device_name(device)
    header = (f"# Speculative decoding and prefix caching: SmolLM2-135M-Instruct (fp32), {args.device.upper()} "
              f"({name}, {torch.get_num_threads()} threads)\n\n{datetime.date.today()}, torch {torch.__version__}, "
              "`python -m benchmarks.spec_prefix` (engine in-process, no HTTP; CPU decode uses the torch reference "
              "kernels, so these speed-ups are CPU numbers, not GPU ones).")
    spec_rows = bench_spec(model, tok, args.device, [int(k) for k in args.k.split(",")], args.max_tokens, args.words)
    prefix_rows = bench_prefix(model, tok, args.device, args.requests, args.system_words)
    text = markdown(spec_rows, prefix_rows, header)
    out = args.out or OUT / f"spec_prefix_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
