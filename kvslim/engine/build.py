"""From a model source and an engine config to a running engine (with its tokenizer and TP group).

:func:`build_engine` is the one place an engine is assembled: by ``kvslim generate``, by the
engine process behind ``kvslim serve``, by each data-parallel replica and by benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.source import ModelSource
from kvslim.eval.tokenizer import TextTokenizer, open_tokenizer


@dataclass
class EngineBundle:
    """An engine, the tokenizer of its model (or None), its TP session (or None) and its name."""

    engine: LLMEngine
    tokenizer: TextTokenizer | None
    session: object | None
    name: str

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def build_engine(source: ModelSource, config: EngineConfig, *,
                 tokenizer: str | os.PathLike | None = None) -> EngineBundle:
    """Build the model of ``source`` on ``config``'s device(s) and an engine over it.

    Args:
        source: the model recipe (its ``dtype`` is replaced by ``config.resolved_dtype``).
        config: the engine configuration (``tp > 1`` starts a tensor-parallel group).
        tokenizer: tokenizer directory (default: the checkpoint directory, if any).
    """
    if not isinstance(source, ModelSource):
        raise TypeError(f"source must be a ModelSource, got {type(source).__name__}")
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    device = config.resolved_device
    if device == "cpu" and config.num_pages is None and config.kv_memory_gib is None:
        raise ValueError("on CPU give --num-pages or --kv-memory to size the KV pool")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    source = replace(source, dtype=config.resolved_dtype, max_len=max(4096, config.max_model_len or 0))
    tok = open_tokenizer(tokenizer if tokenizer is not None else source.path)
    session = None
    if config.tp > 1:
        from kvslim.engine.tp import TPSession

        session = TPSession(config.tp, device=device, device_offset=config.device_offset)
    try:
        if session is not None:
            model = session.load(source)
        else:
            dev = f"cuda:{config.device_offset}" if device == "cuda" else device
            if device == "cuda":
                torch.cuda.set_device(dev)
            model = source.build(dev)
        engine = LLMEngine(model, config, eos_token_id=tok.eos_token_id if tok else None, tp=session)
    except BaseException:
        if session is not None:
            session.close()
        raise
    return EngineBundle(engine, tok, session, source.name)
