"""EngineProcess: the engine in a process of its own, behind the same interface as EngineLoop.

With the engine loop in the HTTP process, one Python thread per streamed request competes
with the engine for the GIL on every token, and the engine's step stretches to several
times its own CPU time (docs/engine.md, "Measured"). Here the engine process only
schedules, runs forwards and samples; it receives ``add``/``abort``/``stats`` commands on a
pipe and sends back, once per step, one batch of ``(request_id, kind, value)`` events. The
HTTP process keeps the tokenizer, the sockets and the per-request queues.

The child builds its engine from the pickled ``(ModelSource, EngineConfig)`` with
:func:`kvslim.engine.build.build_engine`, so a CUDA context (and a TP group) only ever exists
in the engine process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time

import torch

from kvslim.engine.engine import validate_request
from kvslim.engine.loop import Handle, Overloaded, add_error_event, error_event, finished_event
from kvslim.engine.scheduler import SamplingParams

log = logging.getLogger("kvslim.engine")


class _Stop(Exception):
    pass


def _engine_main(conn, source, config, tokenizer=None) -> None:
    """Child process: build the engine of ``(source, config)``, then loop over commands and steps."""
    import signal

    from kvslim.engine.build import build_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    try:
        bundle = build_engine(source, config, tokenizer=tokenizer)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    engine, name = bundle.engine, bundle.name
    conn.send(("ready", dict(max_model_len=engine.max_model_len, vocab_size=engine.config.vocab_size, name=name,
                             max_batch=engine.scheduler.max_batch, stats=dict(engine.stats(), errors=0))))
    outbox: list = []
    errors = 0

    def listener(rid):
        def on_event(seq, tok):
            outbox.append((rid, "token", tok) if tok is not None else (rid, *finished_event(seq)))
        return on_event

    try:
        while True:
            busy = engine.has_unfinished()
            if conn.poll(0 if busy else 0.1):
                while conn.poll(0):
                    msg = conn.recv()
                    if msg[0] == "add":
                        _, rid, prompt, params = msg
                        try:
                            engine.add_request(prompt, params, request_id=rid, listener=listener(rid))
                        except Exception as e:  # noqa: BLE001 - a refused request must not stop the engine
                            outbox.append((rid, *add_error_event(e)))
                    elif msg[0] == "abort":
                        engine.abort(msg[1])
                    elif msg[0] == "stats":
                        outbox.append((None, "stats", dict(engine.stats(), errors=errors)))
                    elif msg[0] == "stop":
                        raise _Stop
            if engine.has_unfinished():
                try:
                    engine.step()
                except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                    errors += 1
                    log.exception("engine step failed")
                    for rid in list(engine.requests):
                        engine.listeners.pop(rid, None)
                        engine.abort(rid)
                        outbox.append((rid, *error_event(500, f"engine error: {type(e).__name__}: {e}", "engine_error")))
            if outbox:
                conn.send(outbox)
                outbox = []
    except (_Stop, EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        bundle.close()


class EngineProcess:
    """Start the engine of ``(source, config)`` in a spawned process.

    Args:
        source: the ``ModelSource``; config: the ``EngineConfig`` (both pickled to the child).
        tokenizer: tokenizer directory for the engine's EOS id (default: the checkpoint's).
        max_waiting: requests beyond the running batch before new ones are refused (503).
        startup_timeout: seconds to wait for the model and engine to be built.
    """

    def __init__(self, source, config, *, tokenizer=None, max_waiting: int = 1024, startup_timeout: float = 900.0):
        ctx = torch.multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(child, source, config, tokenizer), name="kvslim-engine")
        self.proc.start()
        child.close()
        if not self.conn.poll(startup_timeout):
            self.proc.terminate()
            raise RuntimeError(f"the engine process did not start in {startup_timeout:.0f} s")
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited with code {self.proc.join(5) or self.proc.exitcode}") \
                from None
        if kind == "fatal":
            self.proc.join(10)
            raise ValueError(f"engine process: {info}")
        self.max_model_len, self.vocab_size, self.name = info["max_model_len"], info["vocab_size"], info["name"]
        self.max_waiting = max_waiting
        self.max_running = info["max_batch"]
        self._stats = info["stats"]
        self._stats_event = threading.Event()
        self.handles: dict[str, Handle] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._closed = False
        self.reader = threading.Thread(target=self._read, name="kvslim-engine-reader", daemon=True)
        self.reader.start()

    def _send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        if not self.alive:
            raise RuntimeError("engine process is not running")
        validate_request(prompt, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        if len(self.handles) >= self.max_running + self.max_waiting:
            raise Overloaded(f"{len(self.handles)} requests in flight")
        h = Handle(f"cmpl-{next(self._ids)}-{int(time.time() * 1000) % 10**8}")
        self.handles[h.request_id] = h
        self._send(("add", h.request_id, list(prompt), params))
        return h

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(OSError):
            self._send(("abort", request_id))

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.is_alive() and self.reader.is_alive()

    @property
    def errors(self) -> int:
        return self._stats.get("errors", 0)

    def stats(self, timeout: float = 5.0) -> dict:
        """Fresh engine stats (the last known ones if the engine does not answer in time)."""
        if self.alive:
            self._stats_event.clear()
            try:
                self._send(("stats",))
                self._stats_event.wait(timeout)
            except OSError:
                pass
        return dict(self._stats)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self._send(("stop",))
        self._closed = True
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)

    def _read(self) -> None:
        try:
            while True:
                batch = self.conn.recv()
                for rid, kind, val in batch:
                    if kind == "stats":
                        self._stats = val
                        self._stats_event.set()
                        continue
                    h = self.handles.get(rid)
                    if h is None:
                        continue
                    if kind != "token":
                        self.handles.pop(rid, None)
                    h.events.put((kind, val))
        except (EOFError, OSError):
            pass
        finally:
            for rid, h in list(self.handles.items()):
                self.handles.pop(rid, None)
                h.events.put(error_event(503, "engine process exited", "engine_unavailable"))
