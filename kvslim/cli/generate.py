"""``kvslim generate``: one prompt through the paged-KV engine, streamed to stdout."""

from __future__ import annotations

from kvslim.cli.engine_args import add_engine_args, add_model_args, engine_config_from_args, source_from_args


def add(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate from a prompt, streaming text to stdout",
                              description="Generate with the paged-KV engine (--tp N for tensor parallel).")
    add_model_args(p)
    add_engine_args(p)
    g = p.add_argument_group("request")
    g.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    g.add_argument("--tokens", help="prompt as comma-separated token ids (tokenizer-less models)")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--sample-seed", type=int, help="per-request sampling seed")
    g.add_argument("--stop-token-ids", help="comma-separated ids that end generation")
    p.set_defaults(func=run)


def _ids(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated ints, got {text!r}") from None


def run(args) -> int:
    from kvslim.engine.scheduler import SamplingParams
    from kvslim.engine.serve import generate

    source = source_from_args(args)
    if source is None:
        raise ValueError("give --model DIR or --random-model PRESET")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.sample_seed,
                            stop_token_ids=tuple(_ids(args.stop_token_ids, "--stop-token-ids") or ()))
    generate(source=source, engine=engine_config_from_args(args), params=params, prompt=args.prompt,
             tokens=_ids(args.tokens, "--tokens"), tokenizer=args.tokenizer)
    return 0
