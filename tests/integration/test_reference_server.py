"""The reference server (known timings): endpoint shapes and per-request timing truth."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_kvcache.testing import reference_server
from pytest_kvcache.servers._process import free_port
from pytest_kvcache.testing import ReferenceServer, start_reference_server

ROOT = Path(__file__).resolve().parents[2]
MODEL = "ref-test-model"
TTFT, ITL = 0.040, 0.008


def start(tmp: Path, *args: str) -> tuple[ReferenceServer, str]:
    server = start_reference_server(tmp, *args, model=MODEL)
    return server, server.url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start(tmp_path_factory.mktemp("ref"), "--ttft-ms", "40", "--itl-ms", "8")
    yield url
    proc.stop()


def sse(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(url: str, path: str, body: dict) -> list:
    r = httpx.post(url + path, json=dict(body, stream=True), timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse(r.text)


def test_health_and_models(server) -> None:
    assert httpx.get(server + "/health").status_code == 200
    body = httpx.get(server + "/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == MODEL
    assert httpx.get(server + "/nope").status_code == 404


def test_tokenize_round_trip(server) -> None:
    r = httpx.post(server + "/tokenize", json={"model": MODEL, "prompt": "ba be bi"}).json()
    assert r["tokens"] == [6, 7, 8] and r["count"] == 3
    ids = list(range(6, 300, 7))
    text = httpx.post(server + "/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert httpx.post(server + "/tokenize", json={"prompt": text}).json()["tokens"] == ids
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "ba be"}]}).json()
    assert chat["count"] == 2 + 3 + 2


def test_errors(server) -> None:
    r = httpx.post(server + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", json={"model": "other", "prompt": "a"})
    assert r.status_code == 404
    r = httpx.post(server + "/v1/completions", json={"prompt": "a", "max_tokens": 0})
    assert r.status_code == 400


def check_timing(timing: dict, n_chunks: int) -> None:
    arrival, chunks = timing["arrival_perf_s"], timing["chunk_perf_s"]
    assert len(chunks) == n_chunks
    late = [c - (arrival + TTFT + k * ITL) for k, c in enumerate(chunks)]
    assert min(late) >= 0, late  # never early
    late.sort()
    assert late[len(late) // 2] < 0.002, late  # on time (a loaded machine may delay a few)


def test_completions_stream_shape_and_timing(server) -> None:
    events = stream(server, "/v1/completions", {"model": MODEL, "prompt": "ba be bi bo", "max_tokens": 12,
                                                "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    content, usage = events[:-2], events[-2]
    assert len(content) == 12
    assert all(e["object"] == "text_completion" and e["choices"][0]["text"].startswith(" ") for e in content)
    assert [e["choices"][0]["finish_reason"] for e in content] == [None] * 11 + ["length"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 4, "total_tokens": 16,
                                                         "completion_tokens": 12}
    check_timing(usage["server_timing"], 12)
    # exactly max_tokens tokens of the server's tokenizer
    text = "".join(e["choices"][0]["text"] for e in content)
    assert httpx.post(server + "/tokenize", json={"prompt": text}).json()["count"] == 12


def test_timing_on_last_chunk_without_usage(server) -> None:
    events = stream(server, "/v1/completions", {"prompt": "a b", "max_tokens": 5})
    assert events[-1] == "[DONE]" and len(events) == 6
    assert "usage" not in events[0]
    check_timing(events[-2]["server_timing"], 5)


def test_chat_stream_with_continuous_usage(server) -> None:
    events = stream(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "ba be"}], "max_tokens": 4,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = events[1:5]
    assert all(e["object"] == "chat.completion.chunk" for e in content)
    assert [e["usage"]["completion_tokens"] for e in content] == [1, 2, 3, 4]
    assert events[5]["usage"]["completion_tokens"] == 4 and events[5]["usage"]["prompt_tokens"] == 7
    assert events[6] == "[DONE]"


def test_tokens_per_chunk(tmp_path) -> None:
    proc, url = start(tmp_path, "--tokens-per-chunk", "4", "--ttft-ms", "5", "--itl-ms", "2")
    try:
        events = stream(url, "/v1/completions", {"prompt": "a", "max_tokens": 10,
                                                 "stream_options": {"include_usage": True,
                                                                    "continuous_usage_stats": True}})
    finally:
        proc.stop()
    content = [e for e in events[:-1] if e["choices"]]
    assert [len(e["choices"][0]["text"].split()) for e in content] == [4, 4, 2]
    assert [e["usage"]["completion_tokens"] for e in content] == [4, 8, 10]
    assert len(events[-2]["server_timing"]["chunk_perf_s"]) == 3


def test_non_streaming(server) -> None:
    r = httpx.post(server + "/v1/completions", json={"prompt": "a b", "max_tokens": 3}, timeout=10).json()
    assert r["object"] == "text_completion" and len(r["choices"][0]["text"].split()) == 3
    assert r["usage"]["completion_tokens"] == 3
    t = r["server_timing"]
    assert t["chunk_perf_s"][0] - t["arrival_perf_s"] >= TTFT + 2 * ITL
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "max_tokens": 2}, timeout=10).json()
    assert r["choices"][0]["message"]["role"] == "assistant"


def test_keep_alive_and_pipelining(server) -> None:
    import socket

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        s.sendall(req * 3)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 200") < 3 and time.monotonic() < deadline:
            data += s.recv(65536)
    assert data.count(b"HTTP/1.1 200") == 3


def test_a_malformed_request_is_answered_in_turn_then_the_connection_closes(server) -> None:
    """Pipelined after a stream, its 400 comes after the stream's end, not inside it."""
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "ba", "max_tokens": 3, "stream": True}).encode()
    good = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    with socket.create_connection((host, int(port))) as s:
        s.sendall(good + b"POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
        s.settimeout(5)
        data = b""
        while b'"code": 400}}' not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    stream, _, refusal = data.partition(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert stream.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 4" not in stream
    assert refusal.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in refusal
    assert b"Content-Length" in refusal.split(b"\r\n\r\n", 1)[1]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", " ", "  ", "\n", "\u3000"]), max_size=60).map("".join), st.integers(0, 20))
def test_words_are_counted_a_slice_at_a_time_as_the_tokenizer_counts_them(text: str, limit: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference_server, "_SLICE", 7)  # words straddle many slice boundaries
        assert reference_server._count_words(text, 10**9) == len(text.split())
        assert (reference_server._count_words(text, limit) > limit) == (len(text.split()) > limit)


def test_error_every(tmp_path) -> None:
    proc, url = start(tmp_path, "--error-every", "2", "--ttft-ms", "1", "--itl-ms", "1")
    try:
        codes = [httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code
                 for _ in range(4)]
        err = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
    finally:
        proc.stop()
    assert codes == [200, 500, 200, 500]
    assert err.status_code == 200


def test_sigterm_exits_zero(tmp_path) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "pytest_kvcache.testing.reference_server", "--port", str(port)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_workers_share_the_port_and_stop_together(tmp_path) -> None:
    port = free_port()
    log = tmp_path / "workers.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("w") as out:
        p = subprocess.Popen([sys.executable, "-m", "pytest_kvcache.testing.reference_server", "--port", str(port),
                              "--ttft-ms", "1", "--itl-ms", "1", "--workers", "2"], env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while log.read_text().count("listening on") < 2:
            assert time.monotonic() < deadline and p.poll() is None, log.read_text()
            time.sleep(0.05)
        pids = {int(line.split("(pid ")[1].split(",")[0]) for line in log.read_text().splitlines()
                if "listening on" in line}
        assert len(pids) == 2 and p.pid in pids
        for _ in range(8):  # a new connection each: either worker may take it
            with httpx.Client() as client:
                events = sse(client.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10, json={
                    "prompt": "a b", "max_tokens": 3, "stream": True,
                    "stream_options": {"include_usage": True}}).text)
            assert events[-1] == "[DONE]" and "server_timing" in events[-2]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
        (child,) = pids - {p.pid}
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel receive stamps are Linux's")
def test_arrival_is_when_the_request_reached_the_host_not_when_the_server_woke(tmp_path) -> None:
    """The truth the client is measured against: a server that is slow to notice a request
    (here: stopped outright) must not charge that time to the client."""
    proc, url = start(tmp_path, "--ttft-ms", "5", "--itl-ms", "1")
    try:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": MODEL, "prompt": "ba be", "max_tokens": 1, "stream": True}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            os.kill(proc.process.pid, signal.SIGSTOP)
            try:
                sent = time.perf_counter()
                sock.sendall(request)
                time.sleep(0.2)  # the bytes wait in the stopped server's socket
            finally:
                os.kill(proc.process.pid, signal.SIGCONT)
            sock.settimeout(10)
            data = b""
            while b"[DONE]" not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
    finally:
        proc.stop()
    timing = json.loads(data.split(b'"server_timing":', 1)[1].split(b"}", 1)[0] + b"}")
    assert sent <= timing["arrival_perf_s"] < sent + 0.1
    assert timing["chunk_perf_s"][0] >= sent + 0.2  # it could not answer while stopped
