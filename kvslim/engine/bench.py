"""Load generator for a running server (``kvslim bench serve``): TTFT, ITL, E2E, throughput.

Sends ``num_requests`` streaming ``/v1/completions`` requests of random token ids,
at most ``concurrency`` at a time, arriving as a Poisson process of ``request_rate``
requests/s (``inf`` = all at once). Prompt and output lengths are drawn uniformly from
``len * [1 - range, 1 + range]``; ``ignore_eos`` makes every request produce exactly its
output length. Times are taken per SSE event (one event per token):

* TTFT: request sent -> first token;  ITL: gaps between consecutive tokens;
* E2E: request sent -> ``[DONE]``;  throughput: output tokens / wall time of the run.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class Result:
    prompt_len: int
    output_len: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None


def _one(host: str, port: int, prompt: list[int], max_tokens: int, timeout: float) -> Result:
    res = Result(len(prompt))
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    last = None
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
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
              vocab_size: int | None = None, seed: int = 0, timeout: float = 600.0, progress: bool = True) -> dict:
    """Run the load and return a summary dict (see :func:`format_summary`)."""
    if num_requests < 1 or concurrency < 1:
        raise ValueError("num_requests and concurrency must be >= 1")
    if not (0 <= input_range < 1 and 0 <= output_range < 1):
        raise ValueError("input/output length ranges must be in [0, 1)")
    if request_rate <= 0:
        raise ValueError("request_rate must be > 0 (inf = all at once)")
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    if vocab_size is None:
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("GET", "/v1/models")
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
            results[i] = _one(host, port, jobs[i][0], jobs[i][1], timeout)
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

    def stats(xs):
        return {"mean": sum(xs) / len(xs) if xs else float("nan"), "p50": _pct(xs, 0.5), "p90": _pct(xs, 0.9),
                "p99": _pct(xs, 0.99)}

    return {
        "url": url, "num_requests": num_requests, "completed": len(ok), "errors": errors[:10],
        "num_errors": len(errors), "concurrency": concurrency, "request_rate": request_rate,
        "input_len": input_len, "output_len": output_len, "wall_s": wall,
        "output_tokens": out_tokens, "prompt_tokens": sum(r.prompt_len for r in ok),
        "output_throughput": out_tokens / wall, "request_throughput": len(ok) / wall,
        "ttft_s": stats(ttft), "itl_s": stats(itl), "e2e_s": stats(e2e),
        "_raw": {"ttft": ttft, "itl": itl, "e2e": e2e},
    }


def format_summary(s: dict) -> str:
    lines = [
        f"requests: {s['completed']}/{s['num_requests']} ok ({s['num_errors']} errors), concurrency "
        f"{s['concurrency']}, rate {s['request_rate']} req/s, input ~{s['input_len']}, output ~{s['output_len']}",
        f"wall {s['wall_s']:.2f} s | output throughput {s['output_throughput']:.1f} tok/s | "
        f"{s['request_throughput']:.2f} req/s",
        "",
        f"| {'metric':<8} | {'mean':>10} | {'p50':>10} | {'p90':>10} | {'p99':>10} |",
        f"|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 12}|",
    ]
    for key, name in (("ttft_s", "TTFT ms"), ("itl_s", "ITL ms"), ("e2e_s", "E2E ms")):
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
