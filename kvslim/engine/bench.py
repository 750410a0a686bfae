"""Load generator for a running server (``kvslim bench serve``): TTFT, ITL, E2E, throughput.

Sends ``num_requests`` streaming ``/v1/completions`` requests of random token ids,
at most ``concurrency`` at a time, arriving as a Poisson process of ``request_rate``
requests/s (``inf`` = all at once). Prompt and output lengths are drawn uniformly from
``len * [1 - range, 1 + range]``; ``ignore_eos`` makes every request produce exactly its
output length. Times are taken per SSE event. The server sends the tokens a request
has queued when its handler wakes as *one* event (``token_ids`` holds them all), so an
event may carry several tokens:

* TTFT: request sent -> first event with a token;
* ITL: gaps between consecutive token-carrying events of a request, recorded **once per
  event** (what a client sees; the same convention as vLLM's ``benchmark_serving``). An
  event of k tokens counts as one gap, not k: when the server falls behind, ITL shows
  the stall instead of hiding it in k small gaps;
* TPOT: per request, (E2E - TTFT) / (output tokens - 1): the per-token time, whatever the
  grouping of tokens into events;
* E2E: request sent -> ``[DONE]``;  throughput: output tokens / wall time of the run.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from kvslim.checkpoint import prepare_output_file


@dataclass
class Result:
    prompt_len: int
    output_len: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None
    events: int = 0  # token-carrying SSE events

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def _one(host: str, port: int, prompt: list[int], max_tokens: int, timeout: float, headers: dict) -> Result:
    res = Result(len(prompt))
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    last = None
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", **headers})
        r = c.getresponse()
        if r.status != 200:
            res.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return res
        for line in r:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                res.e2e = time.perf_counter() - t0
                break
            ev = json.loads(payload)
            if "error" in ev:
                res.error = ev["error"]["message"]
                break
            n = len(ev["choices"][0].get("token_ids", []))
            if n:
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
                res.output_len += n
                res.events += 1
        c.close()
    except OSError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_bench(url: str, *, num_requests: int = 64, concurrency: int = 16, request_rate: float = math.inf,
              input_len: int = 128, input_range: float = 0.0, output_len: int = 128, output_range: float = 0.0,
              vocab_size: int | None = None, seed: int = 0, timeout: float = 600.0, progress: bool = True,
              api_key: str | None = None) -> dict:
    """Run the load and return a summary dict (see :func:`format_summary`).

    ``api_key``: sent as ``Authorization: Bearer`` (default: ``$KVSLIM_API_KEY``, the key of ``kvslim serve``).
    """
    if num_requests < 1 or concurrency < 1:
        raise ValueError("num_requests and concurrency must be >= 1")
    if not (0 <= input_range < 1 and 0 <= output_range < 1):
        raise ValueError("input/output length ranges must be in [0, 1)")
    if request_rate <= 0:
        raise ValueError("request_rate must be > 0 (inf = all at once)")
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    api_key = api_key if api_key is not None else os.environ.get("KVSLIM_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if vocab_size is None:
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("GET", "/v1/models", headers=headers)
        info = json.loads(c.getresponse().read())["data"][0]
        c.close()
        vocab_size = int(info.get("vocab_size", 1000))
    rng = random.Random(seed)

    def draw(n, r):
        return max(1, int(round(n * rng.uniform(1 - r, 1 + r))))

    jobs = [([rng.randrange(vocab_size) for _ in range(draw(input_len, input_range))], draw(output_len, output_range))
            for _ in range(num_requests)]
    results: list[Result | None] = [None] * num_requests
    sem = threading.Semaphore(concurrency)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_requests, desc="requests", unit="req")

    def worker(i):
        try:
            results[i] = _one(host, port, jobs[i][0], jobs[i][1], timeout, headers)
        finally:
            sem.release()
            if bar is not None:
                bar.update(1)

    threads = []
    t_start = time.perf_counter()
    next_t = t_start
    for i in range(num_requests):
        if math.isfinite(request_rate):
            next_t += rng.expovariate(request_rate)
            time.sleep(max(0.0, next_t - time.perf_counter()))
        sem.acquire()
        t = threading.Thread(target=worker, args=(i,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    ok = [r for r in results if r is not None and r.error is None and r.e2e is not None]
    errors = [r.error for r in results if r is not None and r.error is not None]
    out_tokens = sum(r.output_len for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]

    def stats(xs):
        return {"mean": sum(xs) / len(xs) if xs else float("nan"), "p50": _pct(xs, 0.5), "p90": _pct(xs, 0.9),
                "p99": _pct(xs, 0.99)}

    return {
        "url": url, "num_requests": num_requests, "completed": len(ok), "errors": errors[:10],
        "num_errors": len(errors), "concurrency": concurrency, "request_rate": request_rate,
        "input_len": input_len, "output_len": output_len, "wall_s": wall,
        "output_tokens": out_tokens, "prompt_tokens": sum(r.prompt_len for r in ok),
        "output_throughput": out_tokens / wall, "request_throughput": len(ok) / wall,
        "ttft_s": stats(ttft), "itl_s": stats(itl), "tpot_s": stats(tpot), "e2e_s": stats(e2e),
        "tokens_per_event": out_tokens / max(1, sum(r.events for r in ok)),
        "_raw": {"ttft": ttft, "itl": itl, "e2e": e2e},
    }


def format_summary(s: dict) -> str:
    lines = [
        f"requests: {s['completed']}/{s['num_requests']} ok ({s['num_errors']} errors), concurrency "
        f"{s['concurrency']}, rate {s['request_rate']} req/s, input ~{s['input_len']}, output ~{s['output_len']}",
        f"wall {s['wall_s']:.2f} s | output throughput {s['output_throughput']:.1f} tok/s | "
        f"{s['request_throughput']:.2f} req/s | {s['tokens_per_event']:.2f} tokens per SSE event",
        "",
        f"| {'metric':<8} | {'mean':>10} | {'p50':>10} | {'p90':>10} | {'p99':>10} |",
        f"|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 12}|",
    ]
    for key, name in (("ttft_s", "TTFT ms"), ("itl_s", "ITL ms"), ("tpot_s", "TPOT ms"), ("e2e_s", "E2E ms")):
        st = s[key]
        lines.append(f"| {name:<8} | " + " | ".join(f"{1000 * st[q]:>10.2f}" for q in ("mean", "p50", "p90", "p99"))
                     + " |")
    if s["errors"]:
        lines.append(f"first errors: {s['errors'][:3]}")
    return "\n".join(lines)


def plot_summary(s: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("ttft", "itl", "e2e"), ("TTFT", "inter-token latency", "end-to-end latency")):
        xs = sorted(1000 * x for x in s["_raw"][key])
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], color="black")
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{s['completed']} requests, concurrency {s['concurrency']}: "
                 f"{s['output_throughput']:.0f} output tok/s")
    fig.tight_layout()
    fig.savefig(prepare_output_file(path), dpi=120)
    plt.close(fig)
    return path


def run_engine_bench(engine, *, num_requests: int = 64, concurrency: int = 16, input_len: int = 128,
                     output_len: int = 128, seed: int = 0, deadline: float | None = None,
                     progress_every: float | None = None, log=print) -> dict:
    """Closed-loop load on an ``LLMEngine`` in this process (no HTTP): the engine's own speed.

    ``num_requests`` greedy ``ignore_eos`` requests of ``input_len`` random token ids and
    ``output_len`` new tokens, at most ``concurrency`` in flight: all of the first
    ``concurrency`` are added at once, then a new one each time one finishes (between
    steps). Token times come from the engine listener (one ``perf_counter`` per token, taken
    right after the step's sampling sync):

    * TTFT: ``add_request`` -> first token;  ITL: gaps between consecutive tokens of a
      request;  E2E: ``add_request`` -> last token;  TPOT: (E2E - TTFT) / (tokens - 1);
    * throughput: output tokens / wall time (first add -> last token);
    * per step: decode steps, mean decode batch, mean wall ms of *decode-only* steps (no
      prefill in them; their sampling ``tolist`` synchronises), and the wall time of steps
      that prefill (synchronised on CUDA after each such step).

    ``deadline`` (a ``time.perf_counter`` value): past it the requests in flight are aborted
    and the summary says ``timed_out``; ``progress_every`` seconds: a progress line via ``log``.
    """
    import torch

    from kvslim.engine.scheduler import SamplingParams

    if num_requests < 1 or concurrency < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_requests, concurrency, input_len and output_len must be >= 1")
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sync = engine.device.type == "cuda"
    submit = [0.0] * num_requests
    first: list[float | None] = [None] * num_requests
    last = [0.0] * num_requests
    count = [0] * num_requests
    itl: list[float] = []
    finished: list[int] = []
    clock = time.perf_counter

    def listener(i):
        def on_event(seq, tok):
            if tok is None:
                finished.append(i)
                return
            now = clock()
            if first[i] is None:
                first[i] = now
            else:
                itl.append(now - last[i])
            last[i] = now
            count[i] += 1
        return on_event

    def add(i):
        submit[i] = clock()
        engine.add_request(prompts[i], params, request_id=f"bench-{i}", listener=listener(i))

    nxt, in_flight, done_ids = 0, 0, []
    decode_steps = decode_rows = only_steps = prefill_steps = 0
    only_time = prefill_time = 0.0
    timed_out = False
    steps0, preempt0 = engine.counters["steps"], engine.scheduler.num_preemptions
    t_start = clock()
    next_log = t_start + (progress_every or float("inf"))
    while nxt < num_requests or in_flight:
        while nxt < num_requests and in_flight < concurrency:
            add(nxt)
            nxt, in_flight = nxt + 1, in_flight + 1
        t0 = clock()
        engine.step()
        n_dec, n_pre = engine.last_step
        if n_pre and sync:
            torch.cuda.synchronize(engine.device)
        dt = clock() - t0
        if n_dec:
            decode_steps += 1
            decode_rows += n_dec
        if n_pre:
            prefill_steps += 1
            prefill_time += dt
        elif n_dec:
            only_steps += 1
            only_time += dt
        if finished:
            done_ids += finished
            in_flight -= len(finished)
            finished.clear()
        now = clock()
        if now >= next_log:
            log(f"  {now - t_start:6.1f} s: {len(done_ids)}/{num_requests} done, {in_flight} in flight, "
                f"{engine.counters['steps'] - steps0} steps, last decode batch {n_dec}")
            next_log = now + progress_every
        if deadline is not None and now > deadline and (in_flight or nxt < num_requests):
            timed_out = True
            for i in range(nxt):
                engine.abort(f"bench-{i}")
            break
    wall = (max(last[i] for i in done_ids) if done_ids else clock()) - t_start
    ok = [i for i in done_ids if count[i] == output_len]
    ttft = [first[i] - submit[i] for i in ok]
    e2e = [last[i] - submit[i] for i in ok]
    tpot = [(last[i] - first[i]) / (count[i] - 1) for i in ok if count[i] > 1]
    out_tokens = sum(count[i] for i in done_ids)

    def stats(xs):
        return {"mean": sum(xs) / len(xs) if xs else float("nan"), "p50": _pct(xs, 0.5), "p90": _pct(xs, 0.9),
                "p99": _pct(xs, 0.99)}

    return {
        "mode": "engine", "num_requests": num_requests, "completed": len(ok), "concurrency": concurrency,
        "request_rate": math.inf, "input_len": input_len, "output_len": output_len, "wall_s": wall,
        "timed_out": timed_out, "errors": [] if not timed_out else ["time budget exhausted"],
        "num_errors": num_requests - len(ok), "output_tokens": out_tokens, "prompt_tokens": input_len * len(ok),
        "output_throughput": out_tokens / wall if wall > 0 else float("nan"),
        "request_throughput": len(ok) / wall if wall > 0 else float("nan"), "tokens_per_event": 1.0,
        "ttft_s": stats(ttft), "itl_s": stats(itl), "tpot_s": stats(tpot), "e2e_s": stats(e2e),
        "steps": engine.counters["steps"] - steps0, "decode_steps": decode_steps,
        "mean_decode_batch": decode_rows / decode_steps if decode_steps else float("nan"),
        "decode_only_steps": only_steps,
        "decode_step_ms": 1e3 * only_time / only_steps if only_steps else float("nan"),
        "prefill_steps": prefill_steps, "prefill_s": prefill_time,
        "preemptions": engine.scheduler.num_preemptions - preempt0,
        "_raw": {"ttft": ttft, "itl": itl, "e2e": e2e},
    }


def bench_serve(*, url: str | None = None, source=None, engine=None, server=None, plot: str | None = None,
                json_path: str | None = None, **load) -> dict:
    """``kvslim bench serve``: load the server at ``url`` (or one started here from ``source``/``engine``/
    ``server`` configs), print the table, save the plot / JSON; returns the summary.

    ``load``: the keyword arguments of :func:`run_bench` (num_requests, concurrency, ...).
    """
    from kvslim.engine.serve import launch

    srv = bundle = None
    if url is None:
        if source is None:
            raise ValueError("give --url of a running server, or --model/--random-model to start one")
        srv, bundle = launch(source, engine, server.replace(port=0))
        url = srv.url
        load.setdefault("api_key", server.api_key)
    try:
        summary = run_bench(url, **load)
    finally:
        if srv is not None:
            srv.shutdown()
        if bundle is not None:
            bundle.close()
    print(format_summary(summary))
    if plot:
        print(f"plot: {plot_summary(summary, plot)}")
    if json_path:
        with open(prepare_output_file(json_path), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "_raw"}, f, indent=2)
    return summary
