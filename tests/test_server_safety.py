"""Issue 17, items 5-8: one request fails only itself; auth, timeouts, connection cap; OpenAI error bodies.

Every server case runs against a live server on 127.0.0.1 (ephemeral port), through raw sockets
where the case is about bytes on the wire.
"""

import argparse
import copy
import json
import math
import random
import socket
import threading
import time

import pytest
import torch

from kvslim.engine.config import EngineConfig, ServerConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.scheduler import SamplingParams
from kvslim.engine.server import start_server
from kvslim.eval.tokenizer import open_tokenizer
from kvslim.sampling import sample
from kvslim.testing import tiny_model, tiny_spec

VOCAB = 97
KEY = "sk-kvslim-test-0123456789"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="w0")
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_spec("gqa-2"), vocab=VOCAB)


def _start(model, tok=None, **kw):
    eng = LLMEngine(model, EngineConfig(num_pages=256, page_size=4, max_batch=16, max_num_batched_tokens=64))
    return start_server(eng, tok, model_name="tiny", **kw)


@pytest.fixture(scope="module")
def server(model, tokenizer_dir):
    torch.set_num_threads(1)
    srv = _start(model, open_tokenizer(tokenizer_dir))
    yield srv
    srv.shutdown()



def _read_all(s: socket.socket) -> bytes:
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def _parse(buf: bytes) -> tuple[int, dict, bytes]:
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _raw(srv, data: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        s.sendall(data)
        return _parse(_read_all(s))


def _req(srv, method: str, path: str, body=None, *, headers: dict | None = None, raw: bytes | None = None):
    """(status, headers, body bytes) of one request; ``body`` is JSON-encoded (NaN allowed)."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    h = {"Host": "x", "Content-Type": "application/json"} | (headers or {})
    if body is not None or raw is not None:
        h.setdefault("Content-Length", str(len(data)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None)
    return _raw(srv, head.encode() + b"\r\n" + data)


def _post(srv, body, path="/v1/completions", **kw):
    status, _, data = _req(srv, "POST", path, body, **kw)
    return status, json.loads(data)


def _error(status: int, body: bytes) -> dict:
    """Assert OpenAI's error shape (``code`` a string or null) and return the error object."""
    obj = json.loads(body)
    assert list(obj) == ["error"], obj
    e = obj["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert isinstance(e["message"], str) and e["message"]
    assert e["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert e["param"] is None or isinstance(e["param"], str)
    assert e["code"] is None or isinstance(e["code"], str)
    return e


def _sse_events(body: bytes) -> list:
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            out.append(line[6:].strip() if line[6:].strip() == b"[DONE]" else json.loads(line[6:]))
    return out


def _wait_idle(srv, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = srv.loop.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["free_pages"] == s["num_pages"]:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle / pages leaked: {srv.loop.stats()}")


class _Long:
    """A long greedy request in a thread: its tokens must equal model.generate whatever else happens."""

    def __init__(self, srv, model, prompt=(3, 1, 4, 1, 5), n=150, stream=False):
        self.prompt, self.n, self.ref = list(prompt), n, model.generate([list(prompt)], max_new_tokens=n)[0]
        self.out = None
        body = {"prompt": self.prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream}

        def run():
            status, _, data = _req(srv, "POST", "/v1/completions", body)
            if stream:
                self.out = [t for e in _sse_events(data)[:-1] for t in e["choices"][0]["token_ids"]]
            else:
                self.out = json.loads(data)["choices"][0]["token_ids"] if status == 200 else data
        self.t = threading.Thread(target=run)
        self.t.start()

    def check(self):
        self.t.join(120)
        assert self.out == self.ref



def test_sample_is_greedy_for_tiny_temperatures_and_never_nan():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g) * 3
    logits[0, 5:] = float("-inf")  # a masked vocabulary
    for t in (1e-45, 5e-324, 1e-300, 1e-12):
        for kw in ({}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 3, "top_p": 0.5}):
            assert sample(logits, temperature=t, generator=g, **kw).tolist() == logits.argmax(-1).tolist()
    x = sample(logits.half(), temperature=1e-30, generator=g)  # low precision input too
    assert x.tolist() == logits.half().float().argmax(-1).tolist()
    for bad in (math.nan, math.inf, -math.inf, -1e-9):
        with pytest.raises(ValueError, match="temperature"):
            sample(logits, temperature=bad)
    for kw in ({"top_p": math.nan}, {"top_p": math.inf}, {"top_p": 0.0}, {"top_k": True}, {"top_k": 2.0}):
        with pytest.raises(ValueError):
            sample(logits, temperature=1.0, **kw)


def test_sampling_params_refuse_nan_inf_and_bad_seeds(model):
    for bad in (dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan), dict(top_p=math.inf),
                dict(seed=2**63), dict(seed=-(2**63) - 1), dict(top_k=True), dict(ignore_eos="yes")):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(seed=-5, temperature=1).temperature == 1.0
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1, 2]], 2, temperature=math.nan)


def _engine(model, pages=64):
    return LLMEngine(model, EngineConfig(num_pages=pages, page_size=4, max_batch=8, max_num_batched_tokens=32))


def test_a_failing_sampling_finishes_only_its_sequence(model, monkeypatch):
    from kvslim.engine import engine as engine_mod

    def flaky(logits, *, temperature, **kw):
        if temperature == 0.77:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(logits, temperature=temperature, **kw)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    eng = _engine(model)
    a = eng.add_request([5, 6, 7], SamplingParams(max_tokens=12, ignore_eos=True))
    events = []
    bad = eng.add_request([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.77),
                          listener=lambda seq, tok: events.append((tok, seq.finish_reason)))
    c = eng.add_request([9, 8], SamplingParams(max_tokens=12, temperature=0.5, seed=3, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error" and "probability tensor" in bad.error and events == [(None, "error")]
    assert a.output == model.generate([[5, 6, 7]], 12)[0] and len(c.output) == 12
    assert eng.counters["requests_failed"] == 1 and eng.allocator.num_free == eng.allocator.num_usable


def _poisoned(model, token: int):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.embed_tokens.weight[token] = float("nan")
    return m


def _clean_token(model, prompt, n):
    used = set(prompt) | set(model.generate([prompt], n)[0])
    return next(t for t in range(1, VOCAB) if t not in used)


def test_non_finite_logits_fail_only_their_sequence_and_leave_clean_pages(model):
    long_prompt = [4, 5, 6, 7]
    bad_tok = _clean_token(model, long_prompt, 60)
    eng = _engine(_poisoned(model, bad_tok), pages=24)  # 23 pages x 4: the next requests reuse the NaN pages
    a = eng.add_request(long_prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    eng.step()
    bad = eng.add_request([1, 2, bad_tok, 3, 9], SamplingParams(max_tokens=5, temperature=0.9))
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error" and "non-finite logits" in bad.error
    assert a.output == model.generate([long_prompt], 20)[0]
    assert eng.generate([long_prompt], SamplingParams(max_tokens=60, ignore_eos=True))[0] == \
        model.generate([long_prompt], 60)[0]


def test_a_failing_forward_fails_only_its_sequences(model, monkeypatch):
    eng = _engine(model)
    real = eng.runner.prefill

    def prefill(chunks, starts, pages):
        if any(66 in c for c in chunks):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(chunks, starts, pages)

    monkeypatch.setattr(eng.runner, "prefill", prefill)
    a = eng.add_request([4, 5, 6], SamplingParams(max_tokens=16, ignore_eos=True))
    eng.step()
    bad = eng.add_request([66, 1, 2], SamplingParams(max_tokens=4))
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error" and "illegal memory access" in bad.error and "prefill" in bad.error
    assert a.output == model.generate([[4, 5, 6]], 16)[0]
    assert eng.allocator.num_free == eng.allocator.num_usable


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,raw", [
    ("temperature", None, b'{"prompt": [1, 2], "temperature": NaN}'),
    ("temperature", None, b'{"prompt": [1, 2], "temperature": Infinity}'),
    ("temperature", None, b'{"prompt": [1, 2], "temperature": -Infinity}'),
    ("temperature", None, b'{"prompt": [1, 2], "temperature": 1e400}'),
    ("temperature", 2.5, None), ("temperature", -0.1, None), ("temperature", "1", None), ("temperature", True, None),
    ("top_p", 0, None), ("top_p", 1.5, None), ("top_p", None, b'{"prompt": [1], "top_p": NaN}'),
    ("top_k", -2, None), ("top_k", 1.5, None),
    ("seed", 2**64, None), ("seed", "7", None),
    ("max_tokens", 0, None), ("max_tokens", 4.0, None), ("max_tokens", 2**70, None), ("max_tokens", False, None),
    ("n", 2, None), ("n", "1", None),
    ("stop", ["x"] * 17, None), ("stop", "y" * 300, None), ("stop", [1], None),
    ("stop_token_ids", [-1], None), ("stop_token_ids", [VOCAB], None), ("stop_token_ids", "1", None),
    ("ignore_eos", 1, None), ("stream", "yes", None), ("stream_options", {"include_usage": True}, None),
    ("user", 5, None),
])
def test_every_sampling_field_is_validated(server, field, value, raw):
    status, _, data = _req(server, "POST", "/v1/completions", None if raw else {"prompt": [1, 2], field: value},
                           raw=raw)
    assert status == 400, data
    e = _error(status, data)
    if raw is None:
        assert e["param"] == field, e
    else:  # refused by the JSON parser already
        assert e["code"] == "invalid_json" and ("not valid JSON" in e["message"] or "range" in e["message"])


def test_tiny_temperature_is_greedy_and_a_bad_request_hurts_nobody(server, model):
    long = _Long(server, model)
    status, out = _post(server, {"prompt": [5, 17, 33], "max_tokens": 8, "temperature": 1e-45, "ignore_eos": True})
    assert status == 200 and out["choices"][0]["token_ids"] == model.generate([[5, 17, 33]], 8)[0]
    assert _req(server, "POST", "/v1/completions", raw=b'{"prompt": [1], "temperature": NaN}')[0] == 400
    long.check()


def test_an_engine_failure_is_a_500_for_that_request_only(server, model, monkeypatch, caplog):
    from kvslim.engine import engine as engine_mod

    def flaky(logits, *, temperature, **kw):
        if temperature == 0.77:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(logits, temperature=temperature, **kw)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    long = _Long(server, model)
    bad = {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0.77}
    status, _, data = _req(server, "POST", "/v1/completions", bad)
    assert status == 500 and "probability tensor" in _error(status, data)["message"]
    assert _error(status, data)["code"] == "engine_error"
    status, _, data = _req(server, "POST", "/v1/completions", dict(bad, stream=True))
    events = _sse_events(data)
    assert status == 200 and events[-1] == b"[DONE]" and _error(500, json.dumps(events[-2]).encode())
    long.check()
    _wait_idle(server)
    assert "handler failed" not in caplog.text  # a request's own error is not a handler bug


def test_engine_process_delivers_per_request_errors(model, tmp_path):
    from kvslim.engine.serve import launch
    from kvslim.engine.source import ModelSource

    prompt = [9, 8, 7, 6]
    bad_tok = _clean_token(model, prompt, 70)
    _poisoned(model, bad_tok).save_pretrained(tmp_path / "m")
    srv, _ = launch(ModelSource(path=str(tmp_path / "m")),
                    EngineConfig(num_pages=24, page_size=4, max_batch=8, device="cpu"), ServerConfig(port=0))
    try:
        long = _Long(srv, model, prompt, n=30, stream=True)
        bad = {"prompt": [1, bad_tok, 2], "max_tokens": 4, "temperature": 0.5}
        status, _, data = _req(srv, "POST", "/v1/completions", bad)
        assert status == 500 and "non-finite" in _error(status, data)["message"]
        status, _, data = _req(srv, "POST", "/v1/completions", dict(bad, stream=True))
        events = _sse_events(data)
        assert events[-1] == b"[DONE]" and "non-finite" in events[-2]["error"]["message"]
        long.check()
        status, out = _post(srv, {"prompt": prompt, "max_tokens": 70, "temperature": 0, "ignore_eos": True})
        assert status == 200 and out["choices"][0]["token_ids"] == model.generate([prompt], 70)[0]  # reused pages
        assert srv.loop.stats()["requests_failed"] == 2
    finally:
        srv.shutdown()



def test_api_key_guards_v1_only(model, capfd):
    srv = _start(model, api_key=KEY)
    try:
        body = {"prompt": [1, 2], "max_tokens": 2}
        for auth in (None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", f"bearer {KEY[:-1]}"):
            status, headers, data = _req(srv, "POST", "/v1/completions", body, headers={"Authorization": auth})
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert _error(status, data)["code"] == "invalid_api_key" and KEY not in data.decode()
        assert _req(srv, "GET", "/v1/models")[0] == 401
        assert _req(srv, "DELETE", "/v1/completions")[0] == 401  # auth before routing under /v1
        assert _req(srv, "POST", "/v1/completions", body, headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert _req(srv, "GET", "/v1/models", headers={"Authorization": f"bearer  {KEY}"})[0] == 200
        assert _req(srv, "GET", "/health")[0] == 200 and _req(srv, "GET", "/metrics")[0] == 200  # open, as in vLLM
        from kvslim.engine.bench import run_bench

        s = run_bench(srv.url, num_requests=2, concurrency=2, input_len=3, output_len=2, vocab_size=None,
                      progress=False, api_key=KEY)
        assert s["completed"] == 2
    finally:
        srv.shutdown()
    assert KEY not in repr(ServerConfig(api_key=KEY)) and KEY not in capfd.readouterr().err


def test_router_checks_and_forwards_the_key(model):
    from kvslim.engine.router import Router

    rep = _start(model, api_key=KEY)
    router = Router([(rep.host, rep.port)], api_key=KEY)
    threading.Thread(target=router.httpd.serve_forever, daemon=True).start()
    try:
        body = {"prompt": [4, 5, 6], "max_tokens": 5, "temperature": 0}
        status, _, data = _req(router, "POST", "/v1/completions", body)
        assert status == 401 and _error(status, data)["code"] == "invalid_api_key"
        status, out = _post(router, body, headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and out["choices"][0]["token_ids"] == model.generate([[4, 5, 6]], 5)[0]
        assert _req(router, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert _req(router, "GET", "/health")[0] == 200
        status, _, data = _req(router, "PUT", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 405 and _error(status, data)["code"] == "method_not_allowed"
    finally:
        router.httpd.shutdown()
        router.httpd.server_close()
        rep.shutdown()


def test_api_key_flag_env_and_exposure_warning(monkeypatch, capfd):
    from kvslim.cli import engine_args as ea
    from kvslim.engine.http import HTTPServer, JSONHandler

    p = argparse.ArgumentParser()
    ea.add_server_args(p)
    monkeypatch.setenv("KVSLIM_API_KEY", KEY)
    assert ea.server_config_from_args(p.parse_args([])).api_key == KEY
    assert ea.server_config_from_args(p.parse_args(["--api-key", "k2"])).api_key == "k2"
    monkeypatch.delenv("KVSLIM_API_KEY")
    cfg = ea.server_config_from_args(p.parse_args(["--max-connections", "7", "--read-timeout", "3"]))
    assert cfg.api_key is None and cfg.max_connections == 7 and cfg.read_timeout == 3.0
    with pytest.raises(ValueError, match="api_key"):
        ServerConfig(api_key="has space")
    for key, warned in ((None, True), (KEY, False)):
        h = HTTPServer(("0.0.0.0", 0), JSONHandler, api_key=key)
        h.server_close()
        err = capfd.readouterr().err
        assert ("without an API key" in err) == warned and KEY not in err
    HTTPServer(("127.0.0.1", 0), JSONHandler).server_close()
    assert capfd.readouterr().err == ""



def _stall(srv, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((srv.host, srv.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        socks.append(s)
    return socks


def test_stalled_bodies_and_slow_headers_are_cut_while_others_are_served(model):
    srv = _start(model, read_timeout=1.5)
    try:
        t0 = time.monotonic()
        socks = _stall(srv, 200)
        slow = socket.create_connection((srv.host, srv.port), timeout=0.2)
        status, out = _post(srv, {"prompt": [4, 5, 6], "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert status == 200 and out["choices"][0]["token_ids"] == model.generate([[4, 5, 6]], 5)[0]
        assert time.monotonic() - t0 < 1.5  # served while 200 stalled connections are open
        got = b""
        for b in b"POST /v1/completions HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # a header byte every 0.05 s
            try:
                slow.sendall(bytes([b]))
                got = slow.recv(4096)
                if got:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        assert got.startswith(b"HTTP/1.0 408") and time.monotonic() - t0 < 4
        for s in socks:
            status, _, data = _parse(_read_all(s))
            assert status == 408 and _error(status, data)["code"] == "request_timeout"
            s.close()
        assert time.monotonic() - t0 < 5
        end = time.monotonic() + 5
        while srv.httpd.active and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.httpd.active == 0 and srv.httpd.timeouts >= 200
    finally:
        srv.shutdown()


def test_connection_cap_answers_503_then_recovers(model):
    srv = _start(model, max_connections=4, read_timeout=1.5)
    try:
        socks = _stall(srv, 4)
        time.sleep(0.2)
        t0 = time.monotonic()
        status, headers, data = _req(srv, "GET", "/health")
        assert status == 503 and headers["retry-after"] == "1" and time.monotonic() - t0 < 1
        assert _error(status, data)["code"] == "too_many_connections"
        for s in socks:
            assert _parse(_read_all(s))[0] == 408
            s.close()
        time.sleep(0.2)
        assert _req(srv, "GET", "/health")[0] == 200
        assert "kvslim_http_connections_refused_total 1" in _req(srv, "GET", "/metrics")[2].decode()
    finally:
        srv.shutdown()


@pytest.mark.parametrize("headers,status,code", [
    ({"Content-Length": "-5"}, 400, "invalid_content_length"),
    ({"Content-Length": "abc"}, 400, "invalid_content_length"),
    ({"Content-Length": "5_0"}, 400, "invalid_content_length"),
    ({"Content-Length": "+9"}, 400, "invalid_content_length"),
    ({"Content-Length": None}, 411, "length_required"),
    ({"Content-Length": None, "Transfer-Encoding": "chunked"}, 411, "length_required"),
    ({"Content-Length": str(9 * 2**20)}, 413, "body_too_large"),
    ({"Content-Length": "9" * 40}, 413, "body_too_large"),
    ({"Content-Length": "500"}, 400, "incomplete_body"),  # then the client closes its side
    ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
])
def test_content_length_and_type(server, headers, status, code):
    body = b'{"prompt": [1, 2], "max_tokens": 1}'
    h = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body))} | headers
    head = "POST /v1/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None)
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n" + (body if code != "body_too_large" else b""))
        s.shutdown(socket.SHUT_WR)
        got, _, data = _parse(_read_all(s))
    assert got == status and _error(got, data)["code"] == code
    if status == 413:
        assert "larger than" in _error(got, data)["message"]


def test_slow_reader_of_a_long_stream_is_still_served(model):
    srv = _start(model, read_timeout=1.0, write_timeout=5.0)
    try:
        body = json.dumps({"prompt": [2, 3], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                           "stream": True}).encode()
        with socket.create_connection((srv.host, srv.port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            buf = b""
            while chunk := s.recv(512):  # slower than the stream, for longer than the read timeout
                buf += chunk
                time.sleep(0.03)
        events = _sse_events(_parse(buf)[2])
        assert events[-1] == b"[DONE]"
        assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == model.generate([[2, 3]], 200)[0]
    finally:
        srv.shutdown()



@pytest.mark.parametrize("raw,status,code", [
    (b"DELETE /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    (b"PUT /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "method_not_allowed"),
    (b"PATCH /v1/chat/completions HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    (b"GET /v1/completions HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    (b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "method_not_allowed"),
    (b"GET /nope HTTP/1.1\r\n\r\n", 404, "not_found"),
    (b"DELETE /nope HTTP/1.1\r\n\r\n", 404, "not_found"),
    (b"FOO /health HTTP/1.1\r\n\r\n", 501, "method_not_implemented"),
    (b"GET /health HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
    (b"GET /health HTTP/1.1 extra\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431,
     "headers_too_large"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
])
def test_every_error_is_openai_shaped(server, raw, status, code):
    got, headers, data = _raw(server, raw)
    assert got == status and headers["content-type"] == "application/json"
    assert _error(got, data)["code"] == code
    if status == 405:
        assert headers["allow"] in ("POST", "GET, HEAD")


def test_head_and_query_strings(server):
    status, headers, data = _raw(server, b"HEAD /health HTTP/1.1\r\n\r\n")
    assert status == 200 and data == b"" and int(headers["content-length"]) > 0
    assert _raw(server, b"GET /health?probe=1 HTTP/1.1\r\n\r\n")[0] == 200


@pytest.mark.parametrize("messages,param", [
    ([{"role": "tool", "content": "w1"}], "messages[0].role"),
    ([{"role": "developer", "content": "w1"}], "messages[0].role"),
    ([{"role": "function", "content": "w1"}], "messages[0].role"),
    ([{"role": "user", "content": "w1"}, {"role": "robot", "content": "w2"}], "messages[1].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([{"role": "user", "content": "w1", "name": "bob"}], "messages[0].name"),
    ([{"role": "assistant", "content": "w1", "tool_calls": []}], "messages[0].tool_calls"),
    ([], "messages"), ("w1", "messages"), ([["user", "w1"]], "messages[0]"),
])
def test_chat_refuses_unknown_roles_and_content(server, messages, param):
    status, out = _post(server, {"messages": messages}, "/v1/chat/completions")
    assert status == 400 and _error(status, json.dumps(out).encode())["param"] == param, out


def test_chat_accepts_text_parts(server):
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    a = _post(server, dict(body, messages=[{"role": "system", "content": "w5"},
                                           {"role": "user", "content": "w1 w2\nw3"}]), "/v1/chat/completions")
    b = _post(server, dict(body, messages=[{"role": "system", "content": [{"type": "text", "text": "w5"}]},
                                           {"role": "user", "content": [{"type": "text", "text": "w1 w2"},
                                                                        {"type": "text", "text": "w3"}]}]),
              "/v1/chat/completions")
    assert a[0] == b[0] == 200 and a[1]["choices"][0]["token_ids"] == b[1]["choices"][0]["token_ids"]


@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "logprobs", 1), ("/v1/completions", "logprobs", 0), ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 2), ("/v1/completions", "presence_penalty", 0.5),
    ("/v1/chat/completions", "frequency_penalty", -1), ("/v1/completions", "logit_bias", {"5": 10}),
    ("/v1/completions", "best_of", 2), ("/v1/completions", "echo", True), ("/v1/completions", "suffix", "w1"),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"), ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
])
def test_unimplemented_parameters_are_refused_by_name(server, path, field, value):
    body = {"prompt": "w1 w2"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "w1"}]}
    status, out = _post(server, dict(body, **{field: value}), path)
    e = _error(status, json.dumps(out).encode())
    assert status == 400 and e["param"] == field and e["code"] == "unsupported_parameter", out


def test_neutral_values_unknown_fields_model_and_usage(server):
    ok = {"prompt": "w1 w2", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
          "echo": False, "best_of": 1, "logprobs": None, "user": "me", "model": "tiny", "top_k": -1, "seed": -3,
          "stop": None, "n": 1}
    status, out = _post(server, ok)
    assert status == 200, out
    status, out = _post(server, {"messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": 3,
                                 "logprobs": False, "tools": [], "tool_choice": "none",
                                 "response_format": {"type": "text"}, "ignore_eos": True}, "/v1/chat/completions")
    assert status == 200 and out["usage"]["completion_tokens"] == 3
    status, out = _post(server, {"prompt": [1], "max_token": 5})  # a typo is not a default
    e = _error(status, json.dumps(out).encode())
    assert status == 400 and e["code"] == "unknown_parameter" and e["param"] == "max_token"
    assert "Unrecognized request argument" in e["message"]
    status, out = _post(server, {"prompt": [1], "model": "gpt-4o"})
    assert status == 404 and out["error"]["code"] == "model_not_found"
    status, out = _post(server, {"prompt": [1], "messages": []})
    assert status == 400 and out["error"]["param"] == "messages"
    _, _, data = _req(server, "POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "ignore_eos": True,
                                                          "stream": True, "stream_options": {"include_usage": True}})
    events = _sse_events(data)
    assert events[-1] == b"[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}



_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "seed", "stop", "stream", "stream_options", "n", "user", "stop_token_ids", "ignore_eos", "logprobs",
           "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "best_of", "echo", "suffix",
           "tools", "tool_choice", "response_format"]
_GOOD = {"model": ["tiny"], "prompt": ["w1 w2 w3", [1, 2, 3], [[4, 5]], ["w7"]], "max_tokens": [1, 2, 4],
         "max_completion_tokens": [1, 3], "temperature": [0, 0.7, 1e-45, 2], "top_p": [0.5, 1], "top_k": [-1, 0, 5],
         "seed": [0, -1, 2**63 - 1], "stop": ["w3", ["w4", "w5"]], "stream": [True, False],
         "messages": [[{"role": "user", "content": "w1 w2"}],
                      [{"role": "system", "content": [{"type": "text", "text": "w9"}]},
                       {"role": "user", "content": "w3"}]],
         "n": [1], "ignore_eos": [True, False], "stop_token_ids": [[0], [5, 6]]}


def _junk(r: random.Random, depth: int = 0):
    kind = r.randrange(12 if depth < 2 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return r.random() < 0.5
    if kind == 2:
        return r.choice([0, 1, -1, 7, 2**31, 2**63, -(2**64), 10**30, r.randrange(-1000, 1000)])
    if kind == 3:
        return r.choice([0.0, 0.5, -2.5, 1e-45, 5e-324, 1e308, NAN, INF, -INF, r.uniform(-10, 10)])
    if kind in (4, 5):
        return r.choice(["", "w1", "user", "tiny", "\ud800", "é😀", "x" * 5000, "NaN", "\x00", "w3 w4"])
    if kind == 6:
        return r.choice([[], {}, [1], {"type": "text"}])
    if kind == 7:
        return [r.randrange(-5, 200) for _ in range(r.randrange(4))]
    if kind in (8, 9):
        return [_junk(r, depth + 1) for _ in range(r.randrange(4))]
    return {r.choice(["role", "content", "type", "text", "include_usage", "x"]): _junk(r, depth + 1)
            for _ in range(r.randrange(4))}


def _fuzz_request(r: random.Random) -> tuple[str, bytes, dict]:
    chat = r.random() < 0.4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = "messages" if chat else "prompt"
    body: object = {base: r.choice(_GOOD[base])}
    for f in r.sample(sorted(_GOOD), r.randrange(4)):  # valid values of valid fields ...
        if f not in ("prompt", "messages"):
            body[f] = r.choice(_GOOD[f])
    mode = r.random()
    if mode > 0.3:  # ... then junk in one field (or in many)
        for f in r.sample(_FIELDS, 1 if mode < 0.7 else r.randrange(2, 8)):
            body[f] = _junk(r)
    if r.random() < 0.1:
        body[r.choice(["foo", "max_token", "", "🙂", "prompt "])] = _junk(r)
    if r.random() < 0.05:
        body = _junk(r)
    data = json.dumps(body).encode()  # NaN / Infinity literals included
    headers = {"Content-Type": "application/json"}
    m = r.random()
    if m < 0.05:
        data = data[: r.randrange(len(data) + 1)]
    elif m < 0.1:
        i = r.randrange(len(data) + 1)
        data = data[:i] + r.choice([b"\xff", b"\xc3", b"1e999", b"\x00", b"]"]) + data[i:]
    elif m < 0.13:
        headers["Content-Type"] = r.choice(["text/plain", "application/x-www-form-urlencoded", "", "json"])
    elif m < 0.15:
        headers["Content-Type"] = None
    return path, data, headers


def test_fuzzed_request_bodies_never_get_5xx_and_hurt_nobody(server, model):
    failed = server.loop.stats()["requests_failed"]
    long = _Long(server, model, n=120)
    long_stream = _Long(server, model, prompt=(8, 6, 7), n=100, stream=True)
    counts: dict[int, int] = {}
    failures: list = []
    lock = threading.Lock()

    def client(seed):
        r = random.Random(seed)
        for _ in range(100):
            path, data, headers = _fuzz_request(r)
            try:
                status, h, out = _req(server, "POST", path, raw=data, headers=headers)
                if status == 200:
                    if h.get("content-type") == "text/event-stream":
                        events = _sse_events(out)
                        assert events[-1] == b"[DONE]" and all("error" not in e for e in events[:-1]), events
                    else:
                        assert json.loads(out)["choices"][0]["finish_reason"] in ("stop", "length")
                else:
                    assert status < 500, (status, out)
                    _error(status, out)
            except Exception as e:  # noqa: BLE001 - collected with the input that caused it
                failures.append((path, data[:300], headers, repr(e)[:500]))
            with lock:
                counts[status] = counts.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    assert sum(counts.values()) == 300 and counts.get(200, 0) >= 20 and counts.get(400, 0) >= 100, counts
    long.check()
    long_stream.check()
    _wait_idle(server)
    assert server.loop.stats()["requests_failed"] == failed  # nothing failed inside the engine
