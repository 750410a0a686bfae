"""HTTP transport of the server and the data-parallel router: bounded connections, timeouts, auth, errors.

* :class:`HTTPServer`: one thread per connection, at most ``max_connections`` of them; beyond
  that a connection gets a 503 from the accepting thread and is closed. A request (line,
  headers and body) must arrive within ``read_timeout`` seconds in total, or its connection is
  shut for reading and answered 408 (a client that promises a body and stalls, or sends a
  header byte every few seconds, holds a thread for ``read_timeout`` at most). Once the request
  is read, each write may block ``write_timeout`` seconds (a client that stops reading its
  stream is a client that left).
* :class:`JSONHandler`: routing by path and method (404, 405 with ``Allow``, HEAD for GET
  routes), ``Authorization: Bearer`` on ``/v1/*`` when an API key is set (compared in constant
  time; ``/health`` and ``/metrics`` stay open, as in vLLM), strict ``Content-Length`` (411
  missing, 400 malformed or negative, 413 too large), JSON bodies (415 for other media types,
  400 for invalid JSON, NaN / Infinity or numbers out of float range), and every error —
  including the ones ``BaseHTTPRequestHandler`` raises itself (400 bad request line, 414, 431
  headers too large, 501 unknown method) — in OpenAI's shape
  ``{"error": {"message", "type", "param", "code"}}`` with ``code`` a string or null.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("kvslim.server")
MAX_BODY = 8 * 2**20
_LINGER_S, _LINGER_BYTES = 1.0, 2**20
#: OpenAI-style codes of the errors BaseHTTPRequestHandler sends itself (send_error)
_PROTOCOL_CODES = {400: "bad_request", 408: "request_timeout", 414: "uri_too_long", 431: "headers_too_large",
                   501: "method_not_implemented", 505: "http_version_not_supported"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``invalid_request_error`` for 4xx, ``server_error`` for 5xx."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class HTTPError(Exception):
    """An error response: status, message and OpenAI's ``param`` / ``code`` (plus extra headers)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8", "surrogateescape")).digest()


class HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap, a per-request read deadline and an API key.

    Args:
        address, handler: as for ``ThreadingHTTPServer``.
        api_key: the key ``/v1/*`` requests must send as ``Authorization: Bearer KEY`` (None: no auth).
        max_connections: connections served at once; more get 503 and are closed.
        read_timeout: seconds for a request's line, headers and body together.
        write_timeout: seconds one write to the client may block.

    The listen backlog is 1024: the default of 5 makes bursts of connections wait for SYN
    retransmits (seconds of extra TTFT) or get reset.
    """

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address, handler, *, api_key: str | None = None, max_connections: int = 1024,
                 read_timeout: float = 30.0, write_timeout: float = 60.0):
        self.max_connections = max_connections
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self._key_digest = _digest(api_key) if api_key is not None else None  # the key itself is not kept
        self.lock = threading.Lock()
        self.active = 0
        self.refused = 0
        self.timeouts = 0
        self._deadlines: dict[socket.socket, float] = {}
        self._expired: set[socket.socket] = set()
        self._linger: set[socket.socket] = set()
        self._closing: list[tuple[float, socket.socket]] = []
        self._stop = threading.Event()
        super().__init__(address, handler)
        host = self.server_address[0]
        if api_key is None and not _is_loopback(host):
            print(f"kvslim: WARNING: listening on {host} without an API key: anyone who can reach port "
                  f"{self.server_address[1]} can use the model (set --api-key or KVSLIM_API_KEY)",
                  file=sys.stderr, flush=True)
        self._watcher = threading.Thread(target=self._watch, name="kvslim-http-deadlines", daemon=True)
        self._watcher.start()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the key (always, without a key)."""
        if self._key_digest is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        # digests of equal length: the comparison takes the same time whatever the key's length
        return hmac.compare_digest(_digest(token.strip()), self._key_digest) and scheme.lower() == "bearer"

    def process_request(self, request, client_address):
        with self.lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
                self._deadlines[request] = time.monotonic() + self.read_timeout
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # noqa: BLE001 - no thread for it (resource limits): refuse, keep accepting
            self._done(request)
            self._refuse(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self.lock:
            self.active -= 1
            self._deadlines.pop(request, None)
            self._expired.discard(request)

    def _refuse(self, request) -> None:
        """503 from the accepting thread (a small reply fits the empty send buffer), then close later."""
        with self.lock:
            self.refused += 1
        data = json.dumps(error_body(503, f"too many connections (limit {self.max_connections}): retry later",
                                     code="too_many_connections")).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + data)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self.lock:  # closed by the watcher after draining what the client sent (no reset)
            self._closing.append((time.monotonic() + _LINGER_S, request))

    def request_read(self, request) -> None:
        """The request is in: no more read deadline; writes may block ``write_timeout`` each."""
        with self.lock:
            self._deadlines.pop(request, None)
        with contextlib.suppress(OSError):
            request.settimeout(self.write_timeout)

    def expired(self, request) -> bool:
        with self.lock:
            return request in self._expired

    def linger(self, request) -> None:
        """Answered before the body was read: drain it before closing (an unread body turns
        ``close`` into a reset that can destroy the response on its way)."""
        with self.lock:
            self._linger.add(request)

    def shutdown_request(self, request):
        with self.lock:
            linger = request in self._linger
            self._linger.discard(request)
        if linger:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_WR)
                request.settimeout(0.1)
                end, got = time.monotonic() + _LINGER_S, 0
                while time.monotonic() < end and got < _LINGER_BYTES:
                    chunk = request.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
        super().shutdown_request(request)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self.lock:
                late = [r for r, t in self._deadlines.items() if t <= now]
                for r in late:
                    del self._deadlines[r]
                    self._expired.add(r)
                self.timeouts += len(late)
                closing, self._closing = self._closing, []
            for r in late:  # wakes the handler's blocked read with EOF; it can still answer 408
                with contextlib.suppress(OSError):
                    r.shutdown(socket.SHUT_RD)
            keep = []
            for t, r in closing:
                try:
                    while r.recv(65536):
                        pass
                    done = True  # EOF: the client closed its side
                except BlockingIOError:
                    done = t <= now
                except OSError:
                    done = True
                if done:
                    r.close()
                else:
                    keep.append((t, r))
            if keep:
                with self.lock:
                    self._closing.extend(keep)

    def server_close(self):
        self._stop.set()
        super().server_close()
        with self.lock:
            for _, r in self._closing:
                r.close()
            self._closing = []


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:40]} is outside the range of a float")
    return v


def parse_json(data: bytes):
    """Strict JSON: NaN / Infinity literals and numbers that overflow a float are errors (400)."""
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise HTTPError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints of more than 4300 digits
        raise HTTPError(400, f"invalid JSON body: {e}", code="invalid_json") from None


class JSONHandler(BaseHTTPRequestHandler):
    """Routing, auth, bodies and OpenAI-shaped errors; subclasses set ``routes`` and the route methods.

    ``routes`` maps a path to ``{method: name of the handler method}``; a GET route also answers
    HEAD (headers only).
    """

    server: HTTPServer
    server_version = "kvslim"
    routes: dict[str, dict[str, str]] = {}
    responded = False  # a status line went out (after that, an error can only end the stream)
    body_read = False

    def log_message(self, fmt, *args):  # quiet: the access log would be one line per request
        pass

    def setup(self):
        self.timeout = self.server.read_timeout + 1.0  # per recv, a backstop: the watcher enforces the total
        super().setup()

    def count_error(self, status: int) -> None:
        """Hook for the server's metrics."""

    def send_response(self, code, message=None):
        self.responded = True
        super().send_response(code, message)

    def send_bytes(self, status: int, data: bytes, ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), headers=headers)

    def error(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
              headers: dict | None = None) -> None:
        self.count_error(status)
        with contextlib.suppress(OSError):
            self.send_json(status, error_body(status, message, param=param, code=code), headers)

    def send_error(self, code, message=None, explain=None):
        """What BaseHTTPRequestHandler sends for protocol errors, as JSON instead of an HTML page.

        A request line cut short by the read deadline is a 408, not a bad request; and the
        reply always has a status line (the base class writes none to a request it takes for
        HTTP/0.9, e.g. a malformed request line).
        """
        code = int(code)
        short = self.responses.get(code, ("error", ""))[0]
        msg = message or short
        if explain and explain not in msg:
            msg = f"{msg}: {explain}"
        if self.server.expired(self.connection):
            code, msg = 408, f"the request did not arrive within {self.server.read_timeout:g} s"
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.server.linger(self.connection)
        self.error(code, msg, code=_PROTOCOL_CODES.get(code), headers={"Connection": "close"})

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self.responded = self.body_read = False
        try:
            if self.server.expired(self.connection):
                raise HTTPError(408, f"the request did not arrive within {self.server.read_timeout:g} s",
                                code="request_timeout")
            if (path == "/v1" or path.startswith("/v1/")) and not self.server.authorized(
                    self.headers.get("Authorization")):
                raise HTTPError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            methods = self.routes.get(path)
            if methods is None:
                raise HTTPError(404, f"no route {path}", code="not_found")
            method = "GET" if self.command == "HEAD" and "GET" in methods else self.command
            if method not in methods:
                allow = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
                raise HTTPError(405, f"{self.command} is not allowed on {path} (allowed: {allow})",
                                code="method_not_allowed", headers={"Allow": allow})
            if method == "GET":
                self.server.request_read(self.connection)
            getattr(self, methods[method])()
        except HTTPError as e:
            if not self.body_read and ("Content-Length" in self.headers or "Transfer-Encoding" in self.headers):
                self.server.linger(self.connection)
            self.error(e.status, e.message, param=e.param, code=e.code, headers=e.headers)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            pass  # the client is gone (or stopped reading): nobody to answer
        except Exception:  # noqa: BLE001 - a bug answers 500, it does not drop the connection
            log.exception("%s %s failed", self.command, path)
            self.close_connection = True
            if not self.responded:
                self.error(500, "internal server error", code="internal_error")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def read_body(self) -> bytes:
        """The body: exactly ``Content-Length`` bytes within the read deadline."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise HTTPError(411, "chunked bodies are not supported: send Content-Length", code="length_required")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise HTTPError(411, "Content-Length is required", code="length_required")
        v = values[0].strip()
        if any(x.strip() != v for x in values):
            raise HTTPError(400, "conflicting Content-Length headers", code="invalid_content_length")
        if not (v.isascii() and v.isdigit()):
            raise HTTPError(400, f"Content-Length must be a non-negative integer, got {v[:40]!r}",
                            code="invalid_content_length")
        n = int(v) if len(v) <= 18 else MAX_BODY + 1
        if n > MAX_BODY:
            raise HTTPError(413, f"the body ({v[:20]} bytes) is larger than the limit of {MAX_BODY} bytes",
                            code="body_too_large")
        late = HTTPError(408, f"the request body did not arrive within {self.server.read_timeout:g} s",
                         code="request_timeout")
        try:
            data = self.rfile.read(n)
        except TimeoutError:  # one recv waited read_timeout
            raise late from None
        if len(data) < n:  # EOF: the client closed, or the watcher shut the read side at the deadline
            if self.server.expired(self.connection):
                raise late
            raise HTTPError(400, f"the body ended after {len(data)} of {n} bytes", code="incomplete_body")
        self.body_read = True
        self.server.request_read(self.connection)
        return data

    def read_json(self) -> dict:
        """The body as a JSON object (``Content-Type`` absent or JSON)."""
        ctype = self.headers.get("Content-Type")
        if ctype is not None:
            media = ctype.split(";")[0].strip().lower()
            if media and media != "application/json" and not media.endswith("+json"):
                raise HTTPError(415, f"Content-Type must be application/json, got {ctype[:60]!r}",
                                code="unsupported_media_type")
        body = parse_json(self.read_body())
        if not isinstance(body, dict):
            raise HTTPError(400, f"the JSON body must be an object, got {type(body).__name__}", code="invalid_json")
        return body
