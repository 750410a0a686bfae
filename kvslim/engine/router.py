"""Data parallelism: M engine replicas (each a server process, TP over its own GPUs) behind a router.

This is the (TP x DP) deployment of seed 000 §5.2 / Appx B.6 (e.g. MLA TP=2 x DP=4 vs
GLA TP=8): replica ``i`` uses GPUs ``i*tp ... i*tp + tp - 1``. Each replica is a spawned
process that receives the pickled ``(ModelSource, EngineConfig, ServerConfig)``, starts its
server on a free local port and reports the port back on a pipe. The router forwards every
``POST`` to the replica with the fewest requests in flight (ties: round robin) and
relays its response byte for byte, so SSE streams pass through; a client that goes
away closes the upstream connection, which makes that replica abort the request.
``/health`` is OK when every replica is; ``/metrics`` concatenates the replicas'
metrics with a ``replica`` label. The router is an :class:`~kvslim.engine.http.HTTPServer` like
the replicas' (connection cap, read deadline, API key, OpenAI-shaped errors; 502 when a
replica cannot be reached).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import threading
import time

from kvslim.engine.http import HTTPError, HTTPServer, JSONHandler

#: response headers relayed from a replica
_RELAY = ("Content-Type", "Content-Length", "Retry-After", "Cache-Control", "Allow", "WWW-Authenticate")


class Router:
    """Least-in-flight router over replica servers.

    Args:
        backends: ``(host, port)`` of each replica.
        host, port: bind address of the router.
        http: ``api_key``, ``max_connections``, ``read_timeout``, ``write_timeout`` of
            :class:`~kvslim.engine.http.HTTPServer`. With a key the router checks it itself and
            forwards the ``Authorization`` header, so replicas that hold the key accept the request.
    """

    def __init__(self, backends: list[tuple[str, int]], *, host: str = "127.0.0.1", port: int = 0, **http):
        self.backends = backends
        self.inflight = [0] * len(backends)
        self.lock = threading.Lock()
        self._rr = itertools.count()
        handler = type("Handler", (_RouterHandler,), {"app": self})
        self.httpd = HTTPServer((host, port), handler, **http)
        self.host, self.port = self.httpd.server_address[:2]

    def pick(self) -> int:
        with self.lock:
            low = min(self.inflight)
            cands = [i for i, n in enumerate(self.inflight) if n == low]
            i = cands[next(self._rr) % len(cands)]
            self.inflight[i] += 1
            return i

    def done(self, i: int) -> None:
        with self.lock:
            self.inflight[i] -= 1


class _RouterHandler(JSONHandler):
    app: Router
    routes = {
        "/health": {"GET": "get_health"},
        "/metrics": {"GET": "get_metrics"},
        "/v1/models": {"GET": "get_models"},
        "/v1/completions": {"POST": "post"},
        "/v1/chat/completions": {"POST": "post"},
    }

    def _fetch(self, i: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        host, port = self.app.backends[i]
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        except OSError as e:
            raise HTTPError(502, f"replica {i} unreachable: {e}", code="replica_unreachable") from None
        finally:
            c.close()

    def _auth(self) -> dict:
        a = self.headers.get("Authorization")
        return {"Authorization": a} if a is not None else {}

    def get_health(self):
        bad = []
        for i in range(len(self.app.backends)):
            try:
                if self._fetch(i, "/health")[0] != 200:
                    bad.append(i)
            except HTTPError:
                bad.append(i)
        self.send_json(503 if bad else 200, {"status": f"replicas down: {bad}" if bad else "ok"})

    def get_metrics(self):
        out = []
        for i in range(len(self.app.backends)):
            for line in self._fetch(i, "/metrics")[1].decode().splitlines():
                if line and not line.startswith("#"):
                    name, val = line.split()
                    base, _, labels = name.partition("{")
                    labels = f'replica="{i}",{labels}' if labels else f'replica="{i}"}}'
                    out.append(f"{base}{{{labels} {val}")
        self.send_bytes(200, ("\n".join(out) + "\n").encode(), "text/plain; version=0.0.4")

    def get_models(self):
        status, body = self._fetch(0, self.path, self._auth())
        self.send_bytes(status, body)

    def post(self):
        body = self.read_body()  # Content-Length checked here: the replica parses the JSON
        i = self.app.pick()
        host, port = self.app.backends[i]
        up = http.client.HTTPConnection(host, port, timeout=600)
        try:
            headers = {"Content-Type": self.headers.get("Content-Type", "application/json"),
                       "Content-Length": str(len(body)), **self._auth()}
            try:
                up.request("POST", self.path, body=body, headers=headers)
                r = up.getresponse()
            except OSError as e:
                raise HTTPError(502, f"replica {i} unreachable: {e}", code="replica_unreachable") from None
            self.send_response(r.status)
            for k in _RELAY:
                if r.getheader(k) is not None:
                    self.send_header(k, r.getheader(k))
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):  # client or replica gone: closing the upstream aborts it
                while True:
                    chunk = r.read1(65536)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    self.wfile.flush()
        finally:
            up.close()
            self.app.done(i)


def _replica_main(conn, source, engine, server, tokenizer) -> None:
    """One data-parallel replica: a server on a free local port until the router says stop."""
    import signal

    from kvslim.engine.serve import launch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the router stops us
    try:
        srv, bundle = launch(source, engine, server, tokenizer=tokenizer)
    except BaseException as e:  # noqa: BLE001 - reported to the router, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", srv.port))
    try:
        while srv.loop.alive and not conn.poll(0.5):
            pass
    except (EOFError, OSError):
        pass
    finally:
        srv.shutdown()
        if bundle is not None:
            bundle.close()


def run_router(source, engine, server, *, tokenizer=None, on_ready=None, startup_timeout: float = 900.0) -> int:
    """Start ``server.dp`` replicas of ``(source, engine)`` and route to them until interrupted.

    Replica ``i`` runs on devices ``engine.device_offset + i * engine.tp ...``. ``on_ready(port)``
    is called once the router listens.
    """
    import torch

    ctx = torch.multiprocessing.get_context("spawn")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    replica_server = server.replace(host="127.0.0.1", port=0, dp=1)
    procs, conns, ports = [], [], []
    try:
        for i in range(server.dp):
            parent, child = ctx.Pipe()
            cfg = engine.replace(device_offset=engine.device_offset + i * engine.tp)
            p = ctx.Process(target=_replica_main, args=(child, source, cfg, replica_server, tokenizer),
                            name=f"kvslim-replica-{i}")
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        end = time.monotonic() + startup_timeout
        for i, (p, c) in enumerate(zip(procs, conns)):
            if not c.poll(max(0.0, end - time.monotonic())):
                raise RuntimeError(f"replica {i} did not start in {startup_timeout:.0f} s")
            try:
                kind, val = c.recv()
            except EOFError:
                raise RuntimeError(f"replica {i} exited with code {p.exitcode} during startup") from None
            if kind == "fatal":
                raise ValueError(f"replica {i}: {val}")
            ports.append(val)
        router = Router([("127.0.0.1", p) for p in ports], host=server.host, port=server.port,
                        **server.http_options)
        print(f"kvslim serve: router http://{router.host}:{router.port} -> {server.dp} replicas x tp {engine.tp} "
              f"(ports {ports})", flush=True)
        if on_ready is not None:
            on_ready(router.port)
        try:
            router.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            router.httpd.server_close()
    finally:
        for c in conns:
            with contextlib.suppress(OSError):
                c.send("stop")
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return 0
