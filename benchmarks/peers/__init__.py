"""Peer implementations that bench_decode times beside kvslim's kernels.

Each takes ``benchmarks.decode_problem.Problem`` (duck-typed: ``cache [num_pages, page, row]``,
``block_table``, ``seq_lens``, ``q [B, q_len, h_q, d_qk]`` and the spec's dimensions) and
returns callables for the timing loop; none of them is imported by the kvslim package.
"""
