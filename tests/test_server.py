"""HTTP server: OpenAI endpoints, SSE streaming, errors, cancelled streams and page leaks (loopback only)."""

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from kvslim.engine.config import EngineConfig
from kvslim.engine.engine import LLMEngine
from kvslim.engine.server import start_server
from kvslim.eval.tokenizer import open_tokenizer
from kvslim.testing import tiny_model, tiny_spec

VOCAB = 97


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


@pytest.fixture(scope="module")
def server(model, tokenizer_dir):
    torch.set_num_threads(1)
    tok = open_tokenizer(tokenizer_dir)
    # 255 pages x 4 tokens: long enough that a stream is still running when the client leaves
    eng = LLMEngine(model, EngineConfig(num_pages=256, page_size=4, max_batch=16, max_num_batched_tokens=64))
    srv = start_server(eng, tok, host="127.0.0.1", port=0, model_name="tiny")
    yield srv
    srv.shutdown()


def _post(srv, path, body, raw: bytes | None = None, timeout=30):
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out[0], json.loads(out[1]) if out[1] else None


def _get(srv, path):
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    out = r.status, r.read().decode()
    c.close()
    return out


def _sse(srv, path, body):
    """(list of decoded events, saw [DONE])."""
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    c.request("POST", path, body=json.dumps(dict(body, stream=True)).encode())
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events, done = [], False
    for line in r:
        line = line.strip()
        if not line:
            continue
        assert line.startswith(b"data: ")
        payload = line[6:]
        if payload == b"[DONE]":
            done = True
            break
        events.append(json.loads(payload))
    c.close()
    return events, done


def _wait_idle(srv, timeout=15.0):
    eng = srv.loop.engine
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = eng.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["free_pages"] == s["num_pages"]:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle / pages leaked: {eng.stats()}")


def test_completion_token_ids_match_generate(server, model):
    prompt = [5, 17, 33, 2, 9, 61, 4]
    status, out = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                    "ignore_eos": True})
    assert status == 200, out
    assert out["choices"][0]["token_ids"] == model.generate([prompt], max_new_tokens=12)[0]
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["object"] == "text_completion" and out["model"] == "tiny"


def test_text_prompt_stream_equals_non_stream(server):
    body = {"prompt": "w3 w14 w15 w92 w65", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    status, full = _post(server, "/v1/completions", body)
    assert status == 200
    text = full["choices"][0]["text"]
    assert text and all(w.startswith("w") for w in text.split())
    events, done = _sse(server, "/v1/completions", body)
    assert done
    assert "".join(e["choices"][0]["text"] for e in events) == text
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == full["choices"][0]["token_ids"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_stop_string_truncates(server):
    body = {"prompt": "w3 w14 w15", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    _, full = _post(server, "/v1/completions", body)
    words = full["choices"][0]["text"].split()
    stop = " " + words[3]
    _, cut = _post(server, "/v1/completions", dict(body, stop=[stop]))
    text = cut["choices"][0]["text"]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert stop not in text and full["choices"][0]["text"].startswith(text)
    _wait_idle(server)


def test_chat_completion_and_stream(server):
    body = {"messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    status, out = _post(server, "/v1/chat/completions", body)
    assert status == 200, out
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    events, done = _sse(server, "/v1/chat/completions", body)
    assert done and events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == msg["content"]
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_seeded_sampling_over_http_is_reproducible(server):
    body = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.8, "top_p": 0.95, "seed": 11,
            "ignore_eos": True}
    a = _post(server, "/v1/completions", body)[1]["choices"][0]["token_ids"]
    b = _post(server, "/v1/completions", body)[1]["choices"][0]["token_ids"]
    assert a == b


@pytest.mark.parametrize("body,needle", [
    ({"prompt": [1, 2], "temperature": -1}, "temperature"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2], "top_p": 2.0}, "top_p"),
    ({"prompt": [1, 2], "max_tokens": "many"}, "max_tokens"),
    ({"prompt": [1, 2], "n": 3}, "n = 1"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 500]}, "[0, 97)"),
    ({"prompt": list(range(90)) * 12, "max_tokens": 100}, "max_model_len"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_requests_get_400(server, body, needle):
    status, out = _post(server, "/v1/completions", body)
    assert status == 400
    assert needle in out["error"]["message"] and out["error"]["type"] == "invalid_request_error"


def test_malformed_json_routes_and_methods(server):
    assert _post(server, "/v1/completions", None, raw=b"{not json")[0] == 400
    assert _post(server, "/v1/completions", None, raw=b"[1, 2]")[0] == 400
    assert _post(server, "/v1/chat/completions", {"messages": "hi"})[0] == 400
    assert _post(server, "/v1/nope", {})[0] == 404
    assert _get(server, "/v1/completions")[0] == 405
    # no Content-Length: 411, from a raw socket
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 411")
    status, body = _get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_metrics(server):
    status, text = _get(server, "/metrics")
    assert status == 200
    vals = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert int(vals["kvslim_kv_pages_total"]) == 255
    assert float(vals["kvslim_generation_tokens_total"]) >= 0
    assert "kvslim_time_to_first_token_seconds_count" in vals
    assert float(vals["kvslim_prefix_cache_hit_tokens_total"]) <= float(vals["kvslim_prefix_cache_queried_tokens_total"])
    assert 0 <= float(vals["kvslim_prefix_cache_hit_rate"]) <= 1
    assert float(vals["kvslim_spec_decode_accepted_tokens_total"]) == 0  # speculation is off by default
    assert float(vals["kvslim_overlap_decode_steps_total"]) >= 0


def _cancel_stream(srv, after_events: int, max_tokens: int, errors: list) -> None:
    try:
        s = socket.create_connection((srv.host, srv.port), timeout=30)
        body = json.dumps({"prompt": [7, 8, 9], "max_tokens": max_tokens, "stream": True, "temperature": 0.5,
                           "ignore_eos": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while seen.count(b"data: ") < after_events:
            chunk = s.recv(4096)
            if not chunk:
                break
            seen += chunk
        s.close()  # mid-stream disconnect
    except Exception as e:  # noqa: BLE001
        errors.append(e)


def test_cancelled_stream_frees_pages(server):
    eng = server.loop.engine
    aborted = eng.counters["requests_aborted"]
    errors: list = []
    _cancel_stream(server, 3, 900, errors)
    assert not errors
    _wait_idle(server)
    assert eng.counters["requests_aborted"] == aborted + 1


def test_storm_of_cancelled_requests_leaks_no_pages(server, model):
    errors: list = []
    aborted = server.loop.engine.counters["requests_aborted"]
    threads = [threading.Thread(target=_cancel_stream, args=(server, 1 + i % 5, 300 + 20 * i, errors))
               for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stats = _wait_idle(server)
    assert stats["requests_aborted"] == aborted + 24
    # still serving, still exact
    status, out = _post(server, "/v1/completions", {"prompt": [4, 5, 6], "max_tokens": 5, "temperature": 0,
                                                    "ignore_eos": True})
    assert status == 200 and out["choices"][0]["token_ids"] == model.generate([[4, 5, 6]], max_new_tokens=5)[0]
    assert _get(server, "/health")[0] == 200


def test_overloaded_queue_gets_503(model):
    eng = LLMEngine(model, EngineConfig(num_pages=16, page_size=4))
    srv = start_server(eng, None, max_waiting=0)
    try:
        status, out = _post(srv, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
        assert status == 503 and "overloaded" in out["error"]["message"]
        status, out = _post(srv, "/v1/completions", {"prompt": "text", "max_tokens": 2})
        assert status == 400 and "tokenizer" in out["error"]["message"]
    finally:
        srv.shutdown()


def test_bench_serve_cli_reports_table_and_png(server, tmp_path, capsys):
    from kvslim.cli import main

    png, js = tmp_path / "bench.png", tmp_path / "bench.json"
    rc = main(["bench", "serve", "--url", server.url, "--num-requests", "6", "--concurrency", "3",
               "--input-len", "8", "--input-range", "0.5", "--output-len", "6", "--request-rate", "100", "--plot", str(png),
               "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "TTFT ms" in out and "ITL ms" in out and "E2E ms" in out
    summary = json.loads(js.read_text())
    assert summary["completed"] == 6 and summary["output_tokens"] == 36
    assert png.stat().st_size > 0
    _wait_idle(server)


def test_generate_cli_streams_the_greedy_tokens(capsys):
    from kvslim.cli import main
    from kvslim.engine.source import random_model

    rc = main(["generate", "--random-model", "gla-2", "--model-shape", "tiny", "--tokens", "5,6,7",
               "--num-pages", "32", "--page-size", "4", "--max-tokens", "6"])
    assert rc == 0
    ref = random_model("gla-2", "tiny").generate([[5, 6, 7]], max_new_tokens=6)[0]
    assert [int(t) for t in capsys.readouterr().out.split()] == ref
    assert main(["generate", "--random-model", "gla-2", "--model-shape", "tiny", "--prompt", "hi",
                 "--num-pages", "32"]) == 2  # no tokenizer: a clear error, exit code 2


def test_dp_router_balances_streams_and_cancels(model):
    from kvslim.engine.router import Router

    servers = [start_server(LLMEngine(model, EngineConfig(num_pages=128, page_size=4)), None) for _ in range(2)]
    router = Router([(s.host, s.port) for s in servers])
    threading.Thread(target=router.httpd.serve_forever, daemon=True).start()
    try:
        class R:  # what the helpers need
            host, port = router.host, router.port
        status, out = _post(R, "/v1/completions", {"prompt": [4, 5, 6], "max_tokens": 5, "temperature": 0,
                                                   "ignore_eos": True})
        assert status == 200 and out["choices"][0]["token_ids"] == model.generate([[4, 5, 6]], max_new_tokens=5)[0]
        events, done = _sse(R, "/v1/completions", {"prompt": [4, 5, 6], "max_tokens": 5, "temperature": 0,
                                                   "ignore_eos": True})
        # an SSE event carries every token queued when the handler woke (coalescing): compare the concatenation
        assert done and [t for e in events for t in e["choices"][0]["token_ids"]] == out["choices"][0]["token_ids"]
        errors: list = []
        threads = [threading.Thread(target=_cancel_stream, args=(R, 2, 400, errors)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        for s in servers:
            _wait_idle(s)
        assert all(s.loop.engine.counters["requests_aborted"] >= 1 for s in servers)  # both replicas used
        assert _get(R, "/health")[0] == 200
        assert 'kvslim_kv_pages_free{replica="1"} 127' in _get(R, "/metrics")[1]
        assert _post(R, "/v1/completions", {"prompt": [1], "temperature": -1})[0] == 400
    finally:
        router.httpd.shutdown()
        router.httpd.server_close()
        for s in servers:
            s.shutdown()


def test_serve_cli_with_dp2_replica_processes(tmp_path):
    import signal
    import subprocess
    import sys

    from kvslim.engine.source import random_model

    pf = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally, outlives the Popen call
    proc = subprocess.Popen([sys.executable, "-m", "kvslim", "serve", "--random-model", "gqa-2", "--model-shape",
                             "tiny", "--num-pages", "64", "--page-size", "4", "--dp", "2", "--port", "0",
                             "--port-file", str(pf), "--engine-in-process"], stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 90
        while not pf.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.2)

        class R:
            host, port = "127.0.0.1", int(pf.read_text())

        assert _get(R, "/health")[0] == 200
        status, out = _post(R, "/v1/completions", {"prompt": [3, 1, 4], "max_tokens": 6, "temperature": 0})
        assert status == 200, out
        assert out["choices"][0]["token_ids"] == random_model("gqa-2", "tiny").generate([[3, 1, 4]], 6)[0]
        assert 'replica="1"' in _get(R, "/metrics")[1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_text_stream_is_incremental_and_utf8_safe():
    tokenizers = pytest.importorskip("tokenizers")
    from kvslim.engine.server import TextStream

    corpus = ["héllo wörld 😀 naïve café", "the quick brown fox — jumps", "日本語のテキスト 😀😀"] * 20
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=270, min_frequency=1, show_progress=False)
    text = "café 😀 日本 — héllo naïve fox 😀"
    ids = bpe.encode(text).ids

    class Tok:
        decode = staticmethod(lambda ids, skip_special_tokens=True: bpe.decode(ids))

    ts = TextStream(Tok(), [])
    pieces = [ts.feed(t) for t in ids] + [ts.feed(None)]
    assert "".join(pieces) == bpe.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    ts = TextStream(Tok(), ["日本"])  # a stop string cuts the text before it
    out = "".join(ts.feed(t) for t in ids if not ts.stopped)
    assert ts.stopped and out == "café 😀 "


@pytest.mark.slow
def test_smollm2_engine_and_chat_server():
    """The real SmolLM2-135M-Instruct: engine == model.generate, chat via its own template."""
    from kvslim.eval.smollm2 import smollm2_dir
    from kvslim.model import Transformer

    d = str(smollm2_dir())
    model, tok = Transformer.from_pretrained(d), open_tokenizer(d)
    assert tok.has_chat_template and tok.eos_token_id is not None
    ids = tok.encode("The capital of France is")
    ref = model.generate([ids], max_new_tokens=6)[0]
    srv = start_server(LLMEngine(model, EngineConfig(num_pages=64, page_size=16), eos_token_id=tok.eos_token_id), tok)
    try:
        status, out = _post(srv, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 6,
                                                     "temperature": 0})
        assert status == 200 and out["choices"][0]["token_ids"] == ref
        assert "Paris" in out["choices"][0]["text"]
        status, out = _post(srv, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0})
        assert status == 200 and out["choices"][0]["message"]["content"].strip()
    finally:
        srv.shutdown()


def test_engine_in_its_own_process_serves_cancels_and_frees_pages():
    from kvslim.engine.config import ServerConfig
    from kvslim.engine.serve import launch
    from kvslim.engine.source import ModelSource, random_model

    srv, bundle = launch(ModelSource(preset="gla-2", shape="tiny"),
                         EngineConfig(num_pages=256, page_size=4, max_batch=16, device="cpu"), ServerConfig(port=0))
    assert bundle is None and srv.loop.proc.is_alive()
    try:
        prompt = [9, 8, 7, 6]
        status, out = _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert status == 200, out
        assert out["choices"][0]["token_ids"] == random_model("gla-2", "tiny").generate([prompt], 8)[0]
        events, done = _sse(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert done and [t for e in events for t in e["choices"][0]["token_ids"]] == out["choices"][0]["token_ids"]
        assert _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 2000})[0] == 400
        errors: list = []
        threads = [threading.Thread(target=_cancel_stream, args=(srv, 1 + i % 3, 500, errors)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        end = time.monotonic() + 15
        while True:
            s = srv.loop.stats()
            if s["running"] == 0 and s["waiting"] == 0 and s["free_pages"] == s["num_pages"]:
                break
            assert time.monotonic() < end, s
            time.sleep(0.1)
        assert s["requests_aborted"] == 12 and not srv.loop.handles
        vals = dict(line.split() for line in _get(srv, "/metrics")[1].splitlines() if not line.startswith("#"))
        assert int(vals["kvslim_kv_pages_free"]) == 255
    finally:
        srv.shutdown()
    assert not srv.loop.proc.is_alive()


class _BurstLoop:
    """A fake engine loop: the first token at once, the rest (and done) 0.3 s later in one burst."""

    max_model_len, vocab_size, alive = 64, VOCAB, True

    def __init__(self, burst=(11, 12, 13, 14)):
        self.burst = burst

    def submit(self, prompt, params):
        from kvslim.engine.loop import Handle

        h = Handle("cmpl-burst")
        h.events.put(("token", 10))

        def later():
            time.sleep(0.3)
            for t in self.burst:
                h.events.put(("token", t))
            h.events.put(("done", "length"))

        threading.Thread(target=later, daemon=True).start()
        return h

    def abort(self, request_id):
        pass

    def stats(self):
        return {}

    def close(self):
        pass


def test_sse_coalesces_queued_tokens_and_bench_counts_them():
    from kvslim.engine.bench import run_bench
    from kvslim.engine.server import Server

    srv = Server(_BurstLoop(), None, host="127.0.0.1", port=0).start()
    try:
        events, done = _sse(srv, "/v1/completions", {"prompt": [1, 2], "max_tokens": 5})
        assert done
        # the tokens queued while the handler waited go out as one event, which also ends the stream
        assert [e["choices"][0]["token_ids"] for e in events] == [[10], [11, 12, 13, 14]]
        assert [e["choices"][0]["finish_reason"] for e in events] == [None, "length"]
        assert "".join(e["choices"][0]["text"] for e in events) == " 10 11 12 13 14"
        s = run_bench(srv.url, num_requests=2, concurrency=2, input_len=3, output_len=5, vocab_size=VOCAB,
                      progress=False)
        assert s["completed"] == 2 and s["output_tokens"] == 10
        assert s["tokens_per_event"] == 2.5
        assert len(s["_raw"]["itl"]) == 2  # one gap per token-carrying event after the first, not per token
        assert min(s["_raw"]["itl"]) >= 0.25
        assert s["tpot_s"]["p50"] == pytest.approx(s["itl_s"]["p50"] / 4, rel=0.2)
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def test_bench_serve_script_metrics_and_flags(server, capsys):
    """benchmarks/bench_serve.py: pool metrics read from a live server, summed over --dp replicas."""
    from benchmarks import bench_serve as bs

    m = bs._metrics(server.url)
    assert m["kvslim_kv_pages_total"] == server.loop.stats()["num_pages"]
    two = bs.parse_metrics('# HELP x\nkvslim_kv_pages_total{replica="0"} 10\nkvslim_kv_pages_total{replica="1"} 12\n'
                           'kvslim_preemptions_total{replica="0"} 1\n')
    assert two == {"kvslim_kv_pages_total": 22.0, "kvslim_preemptions_total": 1.0}
    with pytest.raises(SystemExit):
        bs.main(["--mode", "engine", "--tp", "2"])
    assert "--tp / --dp run through `kvslim serve`" in capsys.readouterr().err
