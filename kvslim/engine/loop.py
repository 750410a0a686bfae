"""EngineLoop: drives an ``LLMEngine`` from one background thread for concurrent clients.

Clients (HTTP handler threads) never touch the engine: they post ``add``/``abort``
commands on a queue and read their request's events from its own queue:
``("token", id)``, ``("done", finish_reason)`` or ``("error", (status, message, code))``
(an HTTP status and an OpenAI error code, see :func:`error_event`). The loop thread drains
commands between steps, so aborts (e.g. a client that disconnected) take effect at the next
step and free the request's pages. A request whose forward or sampling fails inside a step
gets its own error event (the engine finishes only that request, or only the requests of
that forward); an exception that escapes a step fails the requests in flight (their pages
are freed) but never kills the loop.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams

log = logging.getLogger("kvslim.engine")


class Overloaded(RuntimeError):
    """The waiting queue is full: retry later (HTTP 503)."""


def error_event(status: int, message: str, code: str | None) -> tuple:
    """The event of a request that failed: an HTTP status, a message and an OpenAI error code."""
    return ("error", (status, message, code))


def finished_event(seq) -> tuple:
    """The last event of a finished sequence: ``done``, or its error (finish reason ``"error"``)."""
    if seq.finish_reason == "error":
        return error_event(500, seq.error or "engine error", "engine_error")
    return ("done", seq.finish_reason)


def add_error_event(e: Exception) -> tuple:
    """The event of a request the engine refused to add (a bad request is the caller's: 400)."""
    if isinstance(e, (ValueError, TypeError)):
        return error_event(400, str(e), "invalid_value")
    return error_event(500, f"engine error: {type(e).__name__}: {e}", "engine_error")


@dataclass
class Handle:
    request_id: str
    events: queue.Queue = field(default_factory=queue.Queue)
    arrival: float = field(default_factory=time.monotonic)


class EngineLoop:
    """Args: engine; max_waiting: queued (not yet running) requests before new ones are refused."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self.commands: queue.Queue = queue.Queue()
        self.handles: dict[str, Handle] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.errors = 0
        self._outbox: list = []
        self.thread = threading.Thread(target=self._run, name="kvslim-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        """Queue a request (validated here, so bad ones fail fast with ValueError)."""
        if not self.alive:
            raise RuntimeError("engine loop is not running")
        self.engine.validate(prompt, params)
        if len(self.engine.scheduler.waiting) + self.commands.qsize() >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} requests are already waiting")
        h = Handle(f"cmpl-{next(self._ids)}-{int(time.time() * 1000) % 10**8}")
        self.commands.put(("add", h, list(prompt), params))
        return h

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop.is_set()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    def stats(self) -> dict:
        return dict(self.engine.stats(), errors=self.errors)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.commands.put(("wake",))
        self.thread.join(timeout)

    def _listener(self, h: Handle):
        # Events are delivered after the step, not inside it: waking a client thread per token
        # in the middle of a step makes the step fight those threads for the GIL, while after
        # it they run as the next step's forward executes on the device.
        def on_event(seq, tok):
            if tok is not None:
                self._outbox.append((h, ("token", tok)))
            else:
                self.handles.pop(h.request_id, None)
                self._outbox.append((h, finished_event(seq)))
        return on_event

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        for h, ev in out:
            h.events.put(ev)

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, h, prompt, params = cmd
            try:
                self.engine.add_request(prompt, params, request_id=h.request_id, listener=self._listener(h))
                self.handles[h.request_id] = h
            except Exception as e:  # noqa: BLE001 - a request the engine refuses must not stop the loop
                h.events.put(add_error_event(e))
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            try:
                cmd = self.commands.get(block=not busy, timeout=None if busy else 0.1)
                self._handle(cmd)
                while True:
                    self._handle(self.commands.get_nowait())
            except queue.Empty:
                pass
            self._flush()  # aborts and add errors produce events too
            if self._stop.is_set() or not self.engine.has_unfinished():
                continue
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                self.errors += 1
                log.exception("engine step failed")
                self._flush()
                self._fail_all(500, f"engine error: {type(e).__name__}: {e}", "engine_error")
            self._flush()
        self._flush()
        self._fail_all(503, "server shutting down", "shutting_down")

    def _fail_all(self, status: int, message: str, code: str) -> None:
        for rid, h in list(self.handles.items()):
            self.engine.listeners.pop(rid, None)
            self.engine.abort(rid)
            self.handles.pop(rid, None)
            h.events.put(error_event(status, message, code))
