"""OpenAI-compatible HTTP server over the engine (standard library only).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text).

The request schema (every field checked; unknown and unimplemented ones refused) is in
:mod:`kvslim.engine.api`; connections, timeouts, the API key and the error shape
``{"error": {"message", "type", "param", "code"}}`` in :mod:`kvslim.engine.http`. Every choice
also carries ``token_ids``. Without a tokenizer, prompts must be token ids, chats are refused,
and the text of a token is `` <id>``.

Statuses: 400 bad input, 401 missing / wrong API key, 404, 405, 408 a request that did not
arrive within ``read_timeout``, 411, 413, 415, 431; 500 when the engine failed *this* request
(its forward or its sampling: other requests go on), 503 with ``Retry-After`` when the queue or
the connection cap is full, 504 after ``request_timeout``. A stream that fails after its
first event ends with an ``data: {"error": ...}`` event and ``data: [DONE]``. A client that
disconnects mid-stream has its request aborted (pages freed) at the next engine step.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

from kvslim.engine.api import parse_request, sampling_from_body
from kvslim.engine.http import MAX_BODY, HTTPError, HTTPServer, JSONHandler, error_body
from kvslim.engine.loop import EngineLoop, Overloaded

log = logging.getLogger("kvslim.server")


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
        model_name: the name reported in responses and ``/v1/models`` (a request naming another is 404).
        request_timeout: seconds a request may take before it is aborted (504).
        api_key: the key ``/v1/*`` requests must send as ``Authorization: Bearer KEY`` (None: no auth).
        max_connections, read_timeout, write_timeout: see :class:`~kvslim.engine.http.HTTPServer`.
    """

    def __init__(self, loop: EngineLoop, tokenizer=None, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "kvslim", request_timeout: float = 600.0, api_key: str | None = None,
                 max_connections: int = 1024, read_timeout: float = 30.0, write_timeout: float = 60.0):
        self.loop, self.tokenizer, self.model_name = loop, tokenizer, model_name
        self.request_timeout = request_timeout
        self.metrics = Metrics()
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = HTTPServer((host, port), handler, api_key=api_key, max_connections=max_connections,
                                read_timeout=read_timeout, write_timeout=write_timeout)
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
        h = self.httpd
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
            ("kvslim_requests_failed_total", "counter", s.get("requests_failed", 0)),
            ("kvslim_engine_steps_total", "counter", s["steps"]),
            ("kvslim_prefill_tokens_total", "counter", s.get("prefill_tokens", 0)),
            ("kvslim_prefix_cache_queried_tokens_total", "counter", s.get("prefix_queried_tokens", 0)),
            ("kvslim_prefix_cache_hit_tokens_total", "counter", s.get("prefix_hit_tokens", 0)),
            ("kvslim_prefix_cache_hit_rate", "gauge", s.get("prefix_hit_rate", 0.0)),
            ("kvslim_prefix_cache_evictions_total", "counter", s.get("prefix_evictions", 0)),
            ("kvslim_spec_decode_proposed_tokens_total", "counter", s.get("spec_proposed_tokens", 0)),
            ("kvslim_spec_decode_accepted_tokens_total", "counter", s.get("spec_accepted_tokens", 0)),
            ("kvslim_spec_decode_verify_steps_total", "counter", s.get("spec_verifies", 0)),
            ("kvslim_spec_decode_acceptance_rate", "gauge", s.get("spec_acceptance_rate", 0.0)),
            ("kvslim_overlap_decode_steps_total", "counter", s.get("overlap_steps", 0)),
            ("kvslim_overlap_discarded_tokens_total", "counter", s.get("overlap_discarded_tokens", 0)),
            ("kvslim_engine_errors_total", "counter", s["errors"]),
            ("kvslim_http_requests_total", "counter", c["http_requests"]),
            ("kvslim_http_errors_total", "counter", c["http_errors"]),
            ("kvslim_http_connections_open", "gauge", h.active),
            ("kvslim_http_connections_refused_total", "counter", h.refused),
            ("kvslim_http_read_timeouts_total", "counter", h.timeouts),
            ("kvslim_client_disconnects_total", "counter", c["client_disconnects"]),
            ("kvslim_time_to_first_token_seconds_sum", "counter", c["ttft_sum"]),
            ("kvslim_time_to_first_token_seconds_count", "counter", c["ttft_count"]),
            ("kvslim_e2e_request_latency_seconds_sum", "counter", c["e2e_sum"]),
            ("kvslim_e2e_request_latency_seconds_count", "counter", c["e2e_count"]),
        ]
        return "".join(f"# TYPE {n.partition('{')[0]} {t}\n{n} {v}\n" for n, t, v in rows)


def _event_error(val) -> tuple[int, str, str | None]:
    """(status, message, code) of an error event (a bare message is a server error)."""
    if isinstance(val, tuple) and len(val) == 3:
        return val
    return 500, str(val), "engine_error"


class _Handler(JSONHandler):
    app: Server
    routes = {
        "/health": {"GET": "get_health"},
        "/metrics": {"GET": "get_metrics"},
        "/v1/models": {"GET": "get_models"},
        "/v1/completions": {"POST": "post_completions"},
        "/v1/chat/completions": {"POST": "post_chat"},
    }

    def count_error(self, status: int) -> None:
        self.app.metrics.add(http_errors=1)

    def _dispatch(self) -> None:
        self.app.metrics.add(http_requests=1)
        super()._dispatch()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def get_health(self):
        ok = self.app.loop.alive
        self.send_json(200 if ok else 503, {"status": "ok" if ok else "engine stopped"})

    def get_metrics(self):
        self.send_bytes(200, self.app.metrics_text().encode(), "text/plain; version=0.0.4")

    def get_models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": self.app.model_name, "object": "model", "owned_by": "kvslim",
             "max_model_len": self.app.loop.max_model_len, "vocab_size": self.app.loop.vocab_size}]})

    def post_completions(self):
        self._complete(chat=False)

    def post_chat(self):
        self._complete(chat=True)

    def _complete(self, chat: bool) -> None:
        app = self.app
        body = self.read_json()
        req = parse_request(body, chat=chat, tokenizer=app.tokenizer, vocab_size=app.loop.vocab_size,
                            max_model_len=app.loop.max_model_len, model_name=app.model_name)
        try:
            handle = app.loop.submit(req.prompt, req.params)
        except Overloaded as e:
            raise HTTPError(503, f"server overloaded: {e}", code="overloaded", headers={"Retry-After": "1"}) from None
        except (ValueError, TypeError) as e:  # the engine's own checks (the schema should have caught it)
            raise HTTPError(400, str(e), code="invalid_value") from None
        except RuntimeError as e:
            raise HTTPError(503, str(e), code="engine_unavailable") from None
        try:
            self._respond(handle, req, chat)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            app.metrics.add(client_disconnects=1)
            app.loop.abort(handle.request_id)
        except HTTPError:  # the request's own error (engine failure, timeout): answered by _dispatch
            raise
        except Exception:  # a handler bug must not leak the request's pages
            log.exception("handler failed")
            app.loop.abort(handle.request_id)
            raise

    def _sse(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _respond(self, h, req, chat: bool) -> None:
        app, stream = self.app, req.stream
        text = TextStream(app.tokenizer, req.stops)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": h.request_id, "object": obj + (".chunk" if chat and stream else ""), "created": created,
                "model": app.model_name}
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
            self._sse(dict(head, choices=[choice]))

        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            if chat:
                self._sse(dict(head, choices=[{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]))
        while finish is None:
            # wake on one event, then take every event already queued: under load the tokens that
            # arrived while this thread waited for the GIL go out as one SSE event, not one each
            try:
                events = [h.events.get(timeout=max(0.01, deadline - time.monotonic()))]
            except queue.Empty:
                app.loop.abort(h.request_id)
                events = [("error", (504, f"request timed out after {app.request_timeout:g} s", "timeout"))]
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
                    finish = val if val in ("stop", "length") else str(val)
                    delta += text.feed(None)
                    break
                else:
                    error = _event_error(val)
                    break
            if stream and (new_ids or finish is not None):
                chunk(delta, finish, new_ids)
            if error is not None:
                status, message, code = error
                if stream:  # the status line is gone: an error event, then the end of the stream
                    self.count_error(status)
                    self._sse(error_body(status, message, code=code))
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                raise HTTPError(status, message, code=code)
        app.metrics.add(e2e_sum=time.monotonic() - t0, e2e_count=1)
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": len(ids),
                 "total_tokens": len(req.prompt) + len(ids)}
        if stream:
            if req.include_usage:
                self._sse(dict(head, choices=[], usage=usage))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            return
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text.text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text.text, "finish_reason": finish}
        choice["token_ids"] = ids
        self.send_json(200, dict(head, choices=[choice], usage=usage))


def start_server(engine, tokenizer=None, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "kvslim",
                 max_waiting: int = 1024, request_timeout: float = 600.0, **http) -> Server:
    """Start the engine loop and the HTTP server in background threads; returns the Server.

    ``http``: ``api_key``, ``max_connections``, ``read_timeout``, ``write_timeout`` of :class:`Server`.
    """
    loop = EngineLoop(engine, max_waiting=max_waiting)
    return Server(loop, tokenizer, host=host, port=port, model_name=model_name,
                  request_timeout=request_timeout, **http).start()


__all__ = ["MAX_BODY", "Server", "start_server", "sampling_from_body", "TextStream"]
