"""Benchmarks and studies of kvslim; each script runs from the repo root as ``python -m benchmarks.<name>``.

Scripts (helper modules in parentheses):

* ``bench_decode``: the decode kernels vs torch / SGLang / FlashInfer peers on one GPU
  (``decode_problem``, ``decode_report``, ``peers/``, ``timing``);
* ``ab_kernels``: the decode kernels of several source trees (git revisions) side by side (``timing``);
* ``offline_compile``: registers, spills and shared memory of a kernel compiled for sm_90a, no GPU;
* ``bench_serve``: the engine and ``kvslim serve`` per attention variant at equal KV memory;
* ``engine_overhead``: host cost of one engine step with the model forward stubbed out;
* ``quality_study``: six attention variants trained from scratch at equal size, then their decode
  speed (``quality_setup``, ``quality_worker``, ``quality_report``);
* ``convert_report``: the converters on SmolLM2-135M, KV bytes/token vs perplexity;
* ``convert_recover``: perplexity recovered by distillation after conversion.

Results go to ``benchmarks/results/``; ``NOTES.md`` records how they were taken. The ``kvslim``
package imports nothing from here.
"""
