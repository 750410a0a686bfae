"""Inference engine: paged KV pool, continuous batching, CUDA-graph decode, tensor/data parallelism, HTTP server.

| piece | module |
|---|---|
| ``EngineConfig``, ``ServerConfig`` | ``config.py`` |
| model sources (checkpoint dir or random shape) | ``source.py`` |
| ``build_engine(source, config)`` | ``build.py`` |
| page allocator, pool sizing | ``allocator.py`` |
| FIFO scheduler, chunked prefill, preemption | ``scheduler.py`` |
| forwards over the pools, CUDA graphs | ``runner.py`` |
| the engine (``LLMEngine``) | ``engine.py`` |
| tensor-parallel shards and stepping | ``tp.py`` |
| engine in a thread / in its own process | ``loop.py`` / ``process.py`` |
| OpenAI-compatible HTTP server | ``server.py`` |
| data-parallel replicas behind a router | ``router.py`` |
| ``serve`` / ``generate`` (the CLI commands' calls) | ``serve.py`` |
| load generators | ``bench.py`` |
"""

from kvslim.engine.build import EngineBundle, build_engine
from kvslim.engine.config import EngineConfig, ServerConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams, Sequence
from kvslim.engine.source import ModelSource

__all__ = ["EngineBundle", "EngineConfig", "LLMEngine", "ModelSource", "SamplingParams", "Sequence", "ServerConfig",
           "build_engine"]
