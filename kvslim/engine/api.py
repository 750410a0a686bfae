"""The OpenAI request schema of ``/v1/completions`` and ``/v1/chat/completions``, checked field by field.

Every field has a type and a range (OpenAI's where it has one): ``temperature`` a finite number
in [0, 2] (default 1), ``top_p`` in (0, 1], ``top_k`` an int >= -1 (-1 and 0 = off, vLLM's
extension), ``max_tokens`` (chat: also ``max_completion_tokens``) an int >= 1 (default 16),
``seed`` an int64, ``n`` 1, ``stop`` a string or at most 16 strings of at most 256
characters, ``stop_token_ids`` at most 256 ids of the vocabulary, ``stream`` and
``ignore_eos`` booleans, ``stream_options`` ``{"include_usage": bool}`` (with ``stream``), ``user``
a string (ignored, as OpenAI's end-user id), ``model`` the served name (another one is 404).

Known OpenAI parameters that kvslim does not implement (``logprobs``, ``top_logprobs``,
``presence_penalty`` / ``frequency_penalty`` other than 0, ``logit_bias``, ``best_of`` > 1,
``echo``, ``suffix``, ``tools``, ``tool_choice``, ``functions``, ``function_call``,
``response_format`` other than text) are accepted only at their neutral value and are
otherwise refused with 400 naming them (code ``unsupported_parameter``), never silently
ignored. Unknown fields are refused as OpenAI refuses them ("Unrecognized request argument
supplied", code ``unknown_parameter``): a typo such as ``max_token`` is an error, not a default.

Chat messages are ``{"role", "content"}`` with role ``system``, ``user`` or ``assistant`` and
content a string or a list of ``{"type": "text", "text": ...}`` parts (joined by newlines).
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass

from kvslim.engine.http import HTTPError
from kvslim.engine.scheduler import SEED_MAX, SEED_MIN, SamplingParams

MAX_STOP, MAX_STOP_CHARS, MAX_STOP_IDS = 16, 256, 256
ROLES = ("system", "user", "assistant")
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
           "user", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "best_of", "echo", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                         "functions", "function_call", "response_format", "parallel_tool_calls"}


def _zero(v) -> bool:
    return _is_number(v) and v == 0


#: the neutral values of parameters that are known but not implemented (anything else is a 400)
NEUTRAL = {
    "presence_penalty": _zero, "frequency_penalty": _zero,
    "logit_bias": lambda v: v == {},
    "best_of": lambda v: _is_int(v) and v == 1,
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "logprobs": lambda v: v is False,  # chat's boolean; the completions' int has no neutral value
    "top_logprobs": lambda v: False,
    "tools": lambda v: v == [], "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none", "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "parallel_tool_calls": lambda v: isinstance(v, bool),  # only meaningful with tools
}
_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = 40


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(name: str, what: str, v, code: str = "invalid_value") -> HTTPError:
    got = f"{type(v).__name__} {_short.repr(v)}" if not isinstance(v, (dict, list)) else type(v).__name__
    return HTTPError(400, f"'{name}' must be {what}, got {got}", param=name, code=code)


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(name, "an integer", v, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}", v)
    return v


def _number(body: dict, name: str, default, lo: float, hi: float, *, open_lo: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise _bad(name, "a finite number", v, "invalid_type")
    if not ((v > lo if open_lo else v >= lo) and v <= hi):
        raise _bad(name, f"a number in {'(' if open_lo else '['}{lo:g}, {hi:g}]", v)
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "a boolean", v, "invalid_type")
    return v


def text(v, name: str) -> str:
    """A string that is valid Unicode (JSON's ``\\ud800`` escapes give lone surrogates)."""
    if not isinstance(v, str):
        raise _bad(name, "a string", v, "invalid_type")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, f"'{name}' is not valid Unicode (a lone surrogate)", param=name,
                        code="invalid_value") from None
    return v


def check_fields(body: dict, chat: bool, model_name: str | None) -> None:
    """Refuse unknown fields, non-neutral values of unimplemented ones, and another model's name."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for k in body:
        if k not in allowed:
            raise HTTPError(400, f"Unrecognized request argument supplied: {_short.repr(k)}", param=str(k)[:80],
                            code="unknown_parameter")
    for k, neutral in NEUTRAL.items():
        if k in allowed and body.get(k) is not None and not neutral(body[k]):
            raise HTTPError(400, f"'{k}' is not supported by this server (got {_short.repr(body[k])}); "
                                 "leave it out", param=k, code="unsupported_parameter")
    model = body.get("model")
    if model is not None:
        text(model, "model")
        if model_name is not None and model != model_name:
            raise HTTPError(404, f"The model {_short.repr(model)} does not exist (this server serves "
                                 f"{model_name!r})", param="model", code="model_not_found")


def sampling_from_body(body: dict, *, vocab_size: int | None = None, chat: bool = False
                       ) -> tuple[SamplingParams, list[str]]:
    """SamplingParams and stop strings from a request body (HTTPError 400 naming the bad field)."""
    if _int(body, "n", 1, 1) != 1:
        raise HTTPError(400, "only n = 1 is supported", param="n", code="unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= MAX_STOP:
        stops = [text(s, "stop") for s in stop]
    else:
        raise _bad("stop", f"a string or a list of at most {MAX_STOP} strings", stop)
    for i, s in enumerate(stops):
        text(s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise HTTPError(400, f"stop strings may have at most {MAX_STOP_CHARS} characters, stop[{i}] has "
                                 f"{len(s)}", param="stop", code="invalid_value")
    ids = body.get("stop_token_ids")
    if ids is None:
        ids = []
    top = vocab_size if vocab_size is not None else SEED_MAX
    if not isinstance(ids, list) or len(ids) > MAX_STOP_IDS or not all(_is_int(t) and 0 <= t < top for t in ids):
        raise _bad("stop_token_ids", f"a list of at most {MAX_STOP_IDS} token ids in [0, {top})", ids)
    max_tokens = _int(body, "max_tokens", 16, 1)
    if chat and body.get("max_completion_tokens") is not None:
        m = _int(body, "max_completion_tokens", 16, 1)
        if body.get("max_tokens") is not None and m != max_tokens:
            raise HTTPError(400, "'max_tokens' and 'max_completion_tokens' disagree: give one",
                            param="max_completion_tokens", code="invalid_value")
        max_tokens = m
    top_k = _int(body, "top_k", None, -1)
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=_number(body, "top_p", None, 0.0, 1.0, open_lo=True),
            seed=_int(body, "seed", None, SEED_MIN, SEED_MAX),
            stop_token_ids=tuple(ids),
            ignore_eos=_bool(body, "ignore_eos", False),
        )
    except ValueError as e:  # a second line of defence: SamplingParams checks its own fields
        raise HTTPError(400, str(e), code="invalid_value") from None
    return params, [s for s in stops if s]


def _content(c, i: int) -> str:
    name = f"messages[{i}].content"
    if isinstance(c, str):
        return text(c, name)
    if isinstance(c, list) and c:
        out = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise HTTPError(400, f"{name}[{j}]: only text parts {{'type': 'text', 'text': ...}} are "
                                     f"supported, got {_short.repr(kind)}", param=name, code="unsupported_value")
            out.append(text(part["text"], f"{name}[{j}].text"))
        return "\n".join(out)
    raise _bad(name, "a string or a non-empty list of text parts", c, "invalid_type")


def chat_messages(msgs) -> list[dict]:
    """``messages`` as ``[{"role", "content": str}]`` (roles system / user / assistant only)."""
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty list of {role, content} objects", msgs, "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object {role, content}", m, "invalid_type")
        extra = sorted(str(k) for k in m if k not in ("role", "content"))
        if extra:
            raise HTTPError(400, f"messages[{i}]: {_short.repr(extra[0])} is not supported (only role and content)",
                            param=f"messages[{i}].{extra[0][:40]}", code="unsupported_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise HTTPError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_short.repr(role)}",
                            param=f"messages[{i}].role", code="invalid_value")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def prompt_ids(p, tokenizer, vocab_size: int) -> list[int]:
    """``prompt``: a string (needs a tokenizer) or a list of token ids; a batch of one is unwrapped."""
    if p is None:
        raise HTTPError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise HTTPError(400, f"one prompt per request (got a batch of {len(p)})", param="prompt",
                            code="unsupported_value")
        p = p[0]
    if isinstance(p, str):
        text(p, "prompt")
        if tokenizer is None:
            raise HTTPError(400, "this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt",
                            code="invalid_value")
        try:
            ids = tokenizer.encode(p)
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer refuses is the caller's input
            raise HTTPError(400, f"the tokenizer refused the prompt: {type(e).__name__}: {e}", param="prompt",
                            code="invalid_value") from None
        if not ids:
            raise HTTPError(400, "'prompt' encodes to zero tokens", param="prompt", code="invalid_value")
        return ids
    if not isinstance(p, list) or not p:
        raise _bad("prompt", "a string or a non-empty list of token ids (one prompt per request)", p,
                   "invalid_type")
    for i, t in enumerate(p):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise HTTPError(400, f"prompt[{i}] = {_short.repr(t)} is not a token id in [0, {vocab_size})",
                            param="prompt", code="invalid_value")
    return p


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool


def parse_request(body: dict, *, chat: bool, tokenizer, vocab_size: int, max_model_len: int,
                  model_name: str | None = None) -> Request:
    """Everything the server needs from a body, or an HTTPError (400 / 404) naming the field."""
    check_fields(body, chat, model_name)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise _bad("stream_options", "an object {include_usage: bool}", opts)
        if not stream:
            raise HTTPError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options",
                            code="invalid_value")
        include_usage = _bool(opts, "include_usage", False)
    if body.get("user") is not None:
        text(body["user"], "user")
    params, stops = sampling_from_body(body, vocab_size=vocab_size, chat=chat)
    if chat:
        msgs = chat_messages(body.get("messages"))
        if tokenizer is None:
            raise HTTPError(400, "this model has no tokenizer: chat needs one (use /v1/completions with token ids)",
                            param="messages", code="invalid_value")
        try:
            prompt = tokenizer.chat(msgs)
        except Exception as e:  # noqa: BLE001 - e.g. a template that wants alternating roles
            raise HTTPError(400, f"the chat template refused these messages: {type(e).__name__}: {e}",
                            param="messages", code="invalid_value") from None
        if not prompt or not all(_is_int(t) and 0 <= t < vocab_size for t in prompt):
            raise HTTPError(400, "the chat template gave no valid token ids", param="messages", code="invalid_value")
    else:
        prompt = prompt_ids(body.get("prompt"), tokenizer, vocab_size)
    total = len(prompt) + params.max_tokens
    if total > max_model_len:
        raise HTTPError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_model_len {max_model_len}", param="max_tokens" if len(prompt) < max_model_len
                        else ("messages" if chat else "prompt"), code="context_length_exceeded")
    return Request(prompt, params, stops, stream, include_usage)
