"""Device timing shared by the benchmarks: do_bench medians and CUDA-graph replays with an L2 flush.

Only torch and triton are imported here, so scripts that choose which ``kvslim`` to import
(``ab_kernels.py``) can use it too.
"""

from __future__ import annotations

import torch
import triton
import triton.testing


def bench(fn, rep=60):
    """Median seconds of fn, timed by device events (``do_bench``; L2 flushed before each call).

    Includes the host launch gaps when a kernel is shorter than its launch; see bench_graph.
    """
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e-3


_FLUSH = None


def bench_graph(fn, n=10, reps=7):
    """Seconds per call of fn replayed from a CUDA graph, with a 256 MB L2 flush before each call.

    Decode runs under CUDA graphs, so this times the kernels without the Python launch
    cost (which dominates small batches). Capturing our launchers also checks that they
    are graph-capturable (no host sync). The flush-only graph's time is subtracted.
    Falls back to :func:`bench` when fn cannot be captured.
    """
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    graphs = []
    try:
        for with_fn in (True, False):
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()  # warm the stream / allocator before capture
                with torch.cuda.graph(g, stream=s):
                    for _ in range(n):
                        _FLUSH.zero_()
                        if with_fn:
                            fn()
            torch.cuda.current_stream().wait_stream(s)
            graphs.append(g)
    except Exception as e:
        torch.cuda.synchronize()
        print(f"  graph capture failed ({type(e).__name__}: {str(e)[:80]}); timing with do_bench", flush=True)
        return bench(fn)
    times = [event_median(g.replay, reps) for g in graphs]
    del graphs
    return max(times[0] - times[1], 1e-9) / n


def event_median(fn, reps: int) -> float:
    """Median seconds of ``fn()`` timed one call at a time by CUDA events (the upper median for even ``reps``)."""
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    ts.sort()
    return ts[len(ts) // 2]


def gemm_peak() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on random data (the compute roofline of a run)."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / bench(lambda: x @ y)
