"""OpenAI-compatible HTTP server over the engine (standard library only).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text).

Request fields: ``prompt`` (string, or a list of token ids), ``messages`` (chat),
``max_tokens`` (16), ``temperature`` (1.0), ``top_p``, ``top_k``, ``seed``, ``stop``
(string or list), and the extensions ``stop_token_ids``, ``ignore_eos``. Every choice
also carries ``token_ids``. Without a tokenizer, prompts must be token ids, chats are
refused, and the text of a token is `` <id>``.

Errors are OpenAI-style JSON ``{"error": {"message", "type", "code"}}``: 400 for
malformed JSON / bad fields / oversize prompts, 404, 405, 411, 413, and 503 with
``Retry-After`` when the waiting queue is full. A client that disconnects mid-stream
has its request aborted (pages freed) at the next engine step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvslim.engine.loop import EngineLoop, Overloaded
from kvslim.engine.scheduler import SamplingParams

log = logging.getLogger("kvslim.server")
MAX_BODY = 8 * 2**20


class BadRequest(ValueError):
    pass


class HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog for many simultaneous clients.

    The default backlog of 5 makes bursts of connections wait for SYN retransmits
    (seconds of extra TTFT) or get reset.
    """

    request_queue_size = 1024
    daemon_threads = True


def _field(body: dict, name: str, types, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{name}' must be {types}, got {v!r}")
    if not isinstance(v, types):
        raise BadRequest(f"'{name}' has the wrong type: {type(v).__name__}")
    return v


def sampling_from_body(body: dict) -> tuple[SamplingParams, list[str]]:
    """SamplingParams and stop strings from an OpenAI request body (BadRequest on bad fields)."""
    n = _field(body, "n", int, 1)
    if n != 1:
        raise BadRequest("only n = 1 is supported")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings")
    stops = [s for s in stops if s]
    try:
        params = SamplingParams(
            max_tokens=_field(body, "max_tokens", int, 16),
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_k=_field(body, "top_k", int) or None,
            top_p=_field(body, "top_p", (int, float)),
            seed=_field(body, "seed", int),
            stop_token_ids=tuple(_field(body, "stop_token_ids", list, [])),
            ignore_eos=_field(body, "ignore_eos", bool, False),
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return params, stops


class TextStream:
    """Incremental detokenisation with stop strings: ``feed(token)`` -> text safe to emit.

    Decodes a sliding window (vLLM's prefix/read offsets): the text of the new tokens is
    ``decode(ids[prefix:]) - decode(ids[prefix:read])``, so each token costs O(window), not
    O(length) — streaming a long output is linear, not quadratic. A window ending in an
    incomplete UTF-8 sequence waits for more tokens.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def _new_text(self) -> str:
        if self.tok is None:
            new = "".join(f" {t}" for t in self.ids[self.read :])
            self.read = len(self.ids)
            return new
        before = self.tok.decode(self.ids[self.prefix : self.read])
        full = self.tok.decode(self.ids[self.prefix :])
        if full.endswith("\ufffd") or len(full) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(before) :]

    def feed(self, token: int | None) -> str:
        """Add a token (None = finished) and return the new text to send."""
        if token is not None:
            self.ids.append(token)
            self.text += self._new_text()
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
        end = len(self.text) if (token is None or self.stopped) else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = dict(http_requests=0, http_errors=0, ttft_sum=0.0, ttft_count=0, e2e_sum=0.0, e2e_count=0,
                      client_disconnects=0)

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                self.c[k] += v


class Server:
    """The HTTP front of one engine loop.

    Args:
        loop: an :class:`EngineLoop` (engine thread in this process) or an
            :class:`~kvslim.engine.process.EngineProcess` (engine in its own process).
        tokenizer: a :class:`~kvslim.eval.tokenizer.TextTokenizer` or None (token-id prompts only).
        host, port: bind address (127.0.0.1 by default; port 0 = ephemeral).
        model_name: the name reported in responses and ``/v1/models``.
        request_timeout: seconds a request may take before it is aborted.
    """

    def __init__(self, loop: EngineLoop, tokenizer=None, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "kvslim", request_timeout: float = 600.0):
        self.loop, self.tokenizer, self.model_name = loop, tokenizer, model_name
        self.request_timeout = request_timeout
        self.metrics = Metrics()
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = HTTPServer((host, port), handler)
        self.host, self.port = self.httpd.server_address[:2]
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Server:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="kvslim-http", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.close()

    def metrics_text(self) -> str:
        s = self.loop.stats()
        c = dict(self.metrics.c)
        used = s["num_pages"] - s["free_pages"]
        rows = [
            ("kvslim_requests_running", "gauge", s["running"]),
            ("kvslim_requests_waiting", "gauge", s["waiting"]),
            ("kvslim_kv_pages_total", "gauge", s["num_pages"]),
            ("kvslim_kv_pages_free", "gauge", s["free_pages"]),
            ("kvslim_kv_cache_usage_ratio", "gauge", used / max(1, s["num_pages"])),
            (f'kvslim_kv_cache_info{{kv_dtype="{s.get("kv_dtype", "?")}"}}', "gauge", 1),
            ("kvslim_kv_cache_bytes_per_token", "gauge", s.get("kv_bytes_per_token", 0)),
            ("kvslim_preemptions_total", "counter", s["preemptions"]),
            ("kvslim_prompt_tokens_total", "counter", s["prompt_tokens"]),
            ("kvslim_generation_tokens_total", "counter", s["generation_tokens"]),
            ("kvslim_requests_finished_total", "counter", s["requests_finished"]),
            ("kvslim_requests_aborted_total", "counter", s["requests_aborted"]),
            ("kvslim_engine_steps_total", "counter", s["steps"]),
            ("kvslim_engine_errors_total", "counter", s["errors"]),
            ("kvslim_http_requests_total", "counter", c["http_requests"]),
            ("kvslim_http_errors_total", "counter", c["http_errors"]),
            ("kvslim_client_disconnects_total", "counter", c["client_disconnects"]),
            ("kvslim_time_to_first_token_seconds_sum", "counter", c["ttft_sum"]),
            ("kvslim_time_to_first_token_seconds_count", "counter", c["ttft_count"]),
            ("kvslim_e2e_request_latency_seconds_sum", "counter", c["e2e_sum"]),
            ("kvslim_e2e_request_latency_seconds_count", "counter", c["e2e_count"]),
        ]
        return "".join(f"# TYPE {n.partition('{')[0]} {t}\n{n} {v}\n" for n, t, v in rows)


class _Handler(BaseHTTPRequestHandler):
    app: Server
    server_version = "kvslim"

    def log_message(self, fmt, *args):  # quiet by default; the logger decides
        log.debug("%s - " + fmt, self.address_string(), *args)

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self.app.metrics.add(http_errors=1)
        kind = "invalid_request_error" if status < 500 else "server_error"
        with contextlib.suppress(OSError):
            self._send_json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _body(self) -> dict:
        n = self.headers.get("Content-Length")
        if n is None:
            raise _HTTPError(411, "Content-Length is required")
        try:
            n = int(n)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise _HTTPError(413, f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _HTTPError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "the JSON body must be an object")
        return body

    def do_GET(self):
        self.app.metrics.add(http_requests=1)
        if self.path == "/health":
            ok = self.app.loop.alive
            self._send_json(200 if ok else 503, {"status": "ok" if ok else "engine stopped"})
        elif self.path == "/metrics":
            data = self.app.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.app.model_name, "object": "model", "owned_by": "kvslim",
                 "max_model_len": self.app.loop.max_model_len, "vocab_size": self.app.loop.vocab_size}]})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            self._error(405, f"use POST for {self.path}")
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        self.app.metrics.add(http_requests=1)
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404 if self.path not in ("/health", "/metrics", "/v1/models") else 405,
                        f"no POST route {self.path}")
            return
        chat = self.path == "/v1/chat/completions"
        try:
            body = self._body()
            prompt = self._prompt(body, chat)
            params, stops = sampling_from_body(body)
            stream = _field(body, "stream", bool, False)
            handle = self.app.loop.submit(prompt, params)
        except _HTTPError as e:
            self._error(e.status, e.message)
            return
        except Overloaded as e:
            self._error(503, f"server overloaded: {e}", {"Retry-After": "1"})
            return
        except (BadRequest, ValueError, TypeError) as e:
            self._error(400, str(e))
            return
        except RuntimeError as e:
            self._error(503, str(e))
            return
        try:
            self._respond(handle, prompt, stops, chat, stream)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.app.metrics.add(client_disconnects=1)
            self.app.loop.abort(handle.request_id)
        except Exception:  # noqa: BLE001 - a handler bug must not leak the request's pages
            log.exception("handler failed")
            self.app.loop.abort(handle.request_id)
            raise

    def _prompt(self, body: dict, chat: bool) -> list[int]:
        tok = self.app.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise BadRequest("'messages' must be a non-empty list of {role: str, content: str}")
            if tok is None:
                raise BadRequest("this model has no tokenizer: chat needs one (use /v1/completions with token ids)")
            return tok.chat(msgs)
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if tok is None:
                raise BadRequest("this model has no tokenizer: send 'prompt' as a list of token ids")
            ids = tok.encode(p)
            if not ids:
                raise BadRequest("'prompt' encodes to zero tokens")
            return ids
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise BadRequest("'prompt' must be a string or a non-empty list of token ids (one prompt per request)")

    def _respond(self, h, prompt, stops, chat: bool, stream: bool) -> None:
        app = self.app
        text = TextStream(app.tokenizer, stops)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        ids: list[int] = []
        t0 = h.arrival
        first = None
        deadline = t0 + app.request_timeout
        finish = None

        def chunk(delta: str, finish_reason, tok_ids):
            if chat:
                choice = {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta, "finish_reason": finish_reason}
            choice["token_ids"] = tok_ids
            self.wfile.write(b"data: " + json.dumps({"id": h.request_id, "object": obj + ("" if not chat else ".chunk"),
                                                     "created": created, "model": app.model_name,
                                                     "choices": [choice]}).encode() + b"\n\n")
            self.wfile.flush()

        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            if chat:
                self.wfile.write(b"data: " + json.dumps({"id": h.request_id, "object": "chat.completion.chunk",
                                                         "created": created, "model": app.model_name,
                                                         "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                      "finish_reason": None}]}).encode() + b"\n\n")
                self.wfile.flush()
        while finish is None:
            # wake on one event, then take every event already queued: under load the tokens that
            # arrived while this thread waited for the GIL go out as one SSE event, not one each
            try:
                events = [h.events.get(timeout=max(0.01, deadline - time.monotonic()))]
            except queue.Empty:
                app.loop.abort(h.request_id)
                events = [("error", f"request timed out after {app.request_timeout:.0f} s")]
            while True:
                try:
                    events.append(h.events.get_nowait())
                except queue.Empty:
                    break
            new_ids: list[int] = []
            delta, error = "", None
            for kind, val in events:
                if kind == "token":
                    if first is None:
                        first = time.monotonic()
                        app.metrics.add(ttft_sum=first - t0, ttft_count=1)
                    ids.append(val)
                    new_ids.append(val)
                    delta += text.feed(val)
                    if text.stopped:
                        app.loop.abort(h.request_id)
                        finish = "stop"
                        break
                elif kind == "done":
                    finish = "stop" if val == "stop" else ("length" if val == "length" else val)
                    delta += text.feed(None)
                    break
                else:
                    error = val
                    break
            if stream and (new_ids or finish is not None):
                chunk(delta, finish, new_ids)
            if error is not None:
                if stream:
                    self.wfile.write(b"data: " + json.dumps({"error": {"message": error, "type": "server_error"}})
                                     .encode() + b"\n\n")
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                self._error(500 if "timed out" not in error else 504, error)
                return
        app.metrics.add(e2e_sum=time.monotonic() - t0, e2e_count=1)
        if stream:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            return
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text.text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text.text, "finish_reason": finish}
        choice["token_ids"] = ids
        self._send_json(200, {"id": h.request_id, "object": obj, "created": created, "model": app.model_name,
                              "choices": [choice], "usage": usage})


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def start_server(engine, tokenizer=None, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "kvslim",
                 max_waiting: int = 1024, request_timeout: float = 600.0) -> Server:
    """Start the engine loop and the HTTP server in background threads; returns the Server."""
    loop = EngineLoop(engine, max_waiting=max_waiting)
    return Server(loop, tokenizer, host=host, port=port, model_name=model_name,
                  request_timeout=request_timeout).start()


__all__ = ["Server", "start_server", "sampling_from_body", "TextStream"]
