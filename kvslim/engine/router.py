"""Data parallelism: M engine replicas (each ``kvslim serve``, TP over its own GPUs) behind a router.

This is the (TP x DP) deployment of seed 000 §5.2 / Appx B.6 (e.g. MLA TP=2 x DP=4 vs
GLA TP=8): replica ``i`` uses GPUs ``i*tp ... i*tp + tp - 1``. The router forwards every
``POST`` to the replica with the fewest requests in flight (ties: round robin) and
relays its response byte for byte, so SSE streams pass through; a client that goes
away closes the upstream connection, which makes that replica abort the request.
``/health`` is OK when every replica is; ``/metrics`` concatenates the replicas'
metrics with a ``replica`` label.
"""

from __future__ import annotations

import http.client
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler

from kvslim.engine.server import HTTPServer


class Router:
    def __init__(self, backends: list[tuple[str, int]], *, host: str = "127.0.0.1", port: int = 0):
        self.backends = backends
        self.inflight = [0] * len(backends)
        self.lock = threading.Lock()
        self._rr = itertools.count()
        handler = type("Handler", (_RouterHandler,), {"app": self})
        self.httpd = HTTPServer((host, port), handler)
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


class _RouterHandler(BaseHTTPRequestHandler):
    app: Router

    def log_message(self, fmt, *args):
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _fetch(self, i: int, path: str) -> tuple[int, bytes]:
        host, port = self.app.backends[i]
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def do_GET(self):
        try:
            if self.path == "/health":
                bad = [i for i in range(len(self.app.backends)) if self._fetch(i, "/health")[0] != 200]
                self._reply(503 if bad else 200, (b'{"status": "replicas down: %s"}' % str(bad).encode()) if bad
                            else b'{"status": "ok"}')
            elif self.path == "/metrics":
                out = []
                for i in range(len(self.app.backends)):
                    for line in self._fetch(i, "/metrics")[1].decode().splitlines():
                        if line and not line.startswith("#"):
                            name, val = line.split()
                            out.append(f'{name}{{replica="{i}"}} {val}')
                self._reply(200, ("\n".join(out) + "\n").encode(), "text/plain; version=0.0.4")
            else:
                status, body = self._fetch(0, self.path)
                self._reply(status, body)
        except OSError as e:
            self._reply(502, b'{"error": {"message": "replica unreachable: %s", "type": "server_error"}}'
                        % str(e).encode())

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n > 0 else b""
        i = self.app.pick()
        host, port = self.app.backends[i]
        up = http.client.HTTPConnection(host, port, timeout=600)
        try:
            headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
            if self.headers.get("Content-Length") is not None:
                headers["Content-Length"] = str(len(body))
            up.request("POST", self.path, body=body, headers=headers)
            r = up.getresponse()
            self.send_response(r.status)
            for k in ("Content-Type", "Content-Length", "Retry-After", "Cache-Control"):
                if r.getheader(k) is not None:
                    self.send_header(k, r.getheader(k))
            self.send_header("Connection", "close")
            self.end_headers()
            while True:
                chunk = r.read1(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:
            pass  # client or replica gone: closing the upstream makes the replica abort
        finally:
            up.close()
            self.app.done(i)


def run_router(child_argv: list[str], *, dp: int, tp: int, host: str, port: int, port_file: str | None = None,
               startup_timeout: float = 900.0) -> int:
    """Start ``dp`` replicas (``python -m kvslim serve``) and route to them until interrupted."""
    tmp = tempfile.mkdtemp(prefix="kvslim-dp-")
    procs, ports = [], []
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    try:
        for i in range(dp):
            pf = os.path.join(tmp, f"port{i}")
            cmd = [sys.executable, "-m", "kvslim", "serve", *child_argv, "--host", "127.0.0.1", "--port", "0",
                   "--port-file", pf, "--device-offset", str(i * tp)]
            procs.append(subprocess.Popen(cmd, env=env))
        end = time.monotonic() + startup_timeout
        for i, p in enumerate(procs):
            pf = os.path.join(tmp, f"port{i}")
            while not os.path.exists(pf):
                if p.poll() is not None:
                    raise RuntimeError(f"replica {i} exited with code {p.returncode} during startup")
                if time.monotonic() > end:
                    raise RuntimeError(f"replica {i} did not start in {startup_timeout:.0f} s")
                time.sleep(0.2)
            with open(pf) as f:
                ports.append(int(f.read()))
        router = Router([("127.0.0.1", p) for p in ports], host=host, port=port)
        print(f"kvslim serve: router http://{router.host}:{router.port} -> {dp} replicas x tp {tp} "
              f"(ports {ports})", flush=True)
        if port_file:
            with open(port_file + ".tmp", "w") as f:
                f.write(str(router.port))
            os.replace(port_file + ".tmp", port_file)
        try:
            router.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            router.httpd.server_close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0
