"""Host cost of one ``LLMEngine.step()`` at a large decode batch, with the model forward stubbed out.

The runner's ``_forward`` is replaced by a function that returns a precomputed logits
tensor, so what is timed is the pure Python/torch-host work of a decode step: scheduling,
page growth, block-table and input building, greedy sampling bookkeeping and listener
delivery (the listener mimics the engine process: it appends ``(id, "token", tok)`` to an
outbox that is pickled once per step, as ``conn.send`` does). CPU only; the CUDA-graph
path adds a few host-to-device copies and one replay launch on top of this.

    python -m benchmarks.engine_overhead --batch 64,256 --context 3072 --steps 200
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine, SamplingParams
from kvslim.testing import tiny_model, tiny_spec


def stub_forward(runner, vocab: int, max_batch: int):
    """Make ``runner._forward`` return constant logits [B, vocab] instantly (token 3 wins)."""
    logits = torch.zeros(max_batch, vocab)
    logits[:, 3] = 1.0

    def forward(tokens, start, block_table, *args, **kw):  # decode, prefill (every_position, fresh)
        return logits[: tokens.shape[0]]

    runner._forward = forward


def measure(batch: int, context: int, steps: int, page_size: int = 16, preset: str = "gqa-2",
            overlap: bool = True) -> dict:
    """Decode-step host time (µs) at ``batch`` sequences of ``context`` prompt tokens each."""
    model = tiny_model(tiny_spec(preset), layers=1)
    budget = 8192
    # sequences start decoding while later ones still prefill: room for those extra tokens too
    max_tokens = steps + batch * context // budget + 8
    pages_per_seq = -(-(context + max_tokens) // page_size)
    config = EngineConfig(num_pages=batch * pages_per_seq + 2, page_size=page_size, max_batch=batch,
                          max_num_batched_tokens=budget, max_model_len=context + max_tokens,
                          cuda_graphs=False, overlap=overlap)
    eng = LLMEngine(model, config)
    stub_forward(eng.runner, model.config.vocab_size, batch)
    outbox: list = []

    def listener(rid):
        def on_event(seq, tok):
            outbox.append((rid, "token", tok) if tok is not None else (rid, "done", seq.finish_reason))
        return on_event

    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
        eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id=f"r{i}",
                        listener=listener(f"r{i}"))
    while any(s.pending > 1 or s.status != "running" for s in list(eng.requests.values())):
        eng.step()  # prefill (stubbed) until every sequence decodes
        outbox.clear()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        touched = eng.step()
        pickle.dumps(outbox)
        outbox.clear()
        times.append(time.perf_counter() - t0)
        assert len(touched) == batch, (len(touched), batch)
    pages = [len(s.pages) for s in eng.requests.values()]
    return dict(batch=batch, context=context, pages_per_seq=max(pages), steps=steps,
                mean_us=1e6 * statistics.mean(times), p50_us=1e6 * statistics.median(times),
                min_us=1e6 * min(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--context", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-overlap", action="store_true", help="the synchronous decode path (default: overlapped)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for b in (int(x) for x in args.batch.split(",")):
        r = measure(b, args.context, args.steps, args.page_size, overlap=not args.no_overlap)
        print(f"batch {r['batch']:>4} | {'sync' if args.no_overlap else 'overlap'} | {r['pages_per_seq']} pages/seq | "
              f"{r['steps']} decode steps | host per step: "
              f"mean {r['mean_us']:.0f} µs, p50 {r['p50_us']:.0f} µs, min {r['min_us']:.0f} µs", flush=True)


if __name__ == "__main__":
    main()
