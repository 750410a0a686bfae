"""Inference engine: paged KV pool, continuous batching, CUDA-graph decode, tensor parallelism, HTTP server.

| piece | module |
|---|---|
| page allocator, pool sizing | ``allocator.py`` |
| FIFO scheduler, chunked prefill, preemption | ``scheduler.py`` |
| forwards over the pools, CUDA graphs | ``runner.py`` |
| the engine (``LLMEngine``) | ``engine.py`` |
| tensor parallel shards and stepping | ``tp.py`` |
| model/tokenizer sources | ``source.py`` |
| sampling | ``sampling.py`` |
"""

from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams, Sequence

__all__ = ["LLMEngine", "SamplingParams", "Sequence"]
