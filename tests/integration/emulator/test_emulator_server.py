"""End-to-end tests of the emulator as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import httpx
import pytest
from helpers.emulator import Emu, MODEL, ROOT, random_ids, raw_stream, stream, timing_of, ttft_of, wait_for


@pytest.fixture(scope="module")
def cpu_emu(emu_factory) -> Emu:
    return emu_factory("--backend", "cpu", "--log-level", "warning")


# -- API shape -----------------------------------------------------------------------------
def test_health_and_models(cpu_emu):
    r = httpx.get(cpu_emu.url + "/health")
    assert r.status_code == 200 and r.content == b""
    m = httpx.get(cpu_emu.url + "/v1/models").json()
    assert m["object"] == "list"
    (d,) = m["data"]
    assert d["id"] == MODEL and d["root"] == MODEL and d["owned_by"] == "vllm"
    assert d["object"] == "model" and isinstance(d["created"], int) and d["max_model_len"] == 131072


def test_version(cpu_emu, emu_factory):
    """vLLM's ``GET /version`` shape; the version is the package's unless told, and the
    offload tier it runs (what ``--kv-server external`` reads) beside it."""
    from pytest_kvcache import __version__

    r = httpx.get(cpu_emu.url + "/version")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"version": __version__, "kvcache_backend": "cpu"}
    other = emu_factory("--backend", "none", "--served-version", "0.10.1rc2+emulated")
    assert httpx.get(other.url + "/version").json() == {"version": "0.10.1rc2+emulated", "kvcache_backend": "none"}


def test_tokenize_detokenize_round_trip(cpu_emu):
    ids = random_ids(500, 3)
    r = httpx.post(cpu_emu.url + "/detokenize", json={"model": MODEL, "tokens": ids})
    text = r.json()["prompt"]
    t = httpx.post(cpu_emu.url + "/tokenize",
                   json={"model": MODEL, "prompt": text, "add_special_tokens": True}).json()
    assert t["tokens"] == ids and t["count"] == 500
    assert t["max_model_len"] == 131072 and t["token_strs"] is None


def test_streaming_completion_shape(cpu_emu):
    body = {"model": MODEL, "prompt": "ba be bi bo bu", "max_tokens": 7, "stream": True,
            "ignore_eos": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    events = stream(cpu_emu.url, body)
    assert events[-1] is None  # [DONE]
    content = [e for e in events[:-1] if e["choices"]]
    assert len(content) == 7
    for e in content:
        assert e["object"] == "text_completion" and e["model"] == MODEL
        (c,) = e["choices"]
        assert c["index"] == 0 and c["logprobs"] is None and c["stop_reason"] is None
        assert c["text"].strip()
    assert [e["choices"][0]["finish_reason"] for e in content] == [None] * 6 + ["length"]
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    timing = usage_chunk["emulator_timing"]
    assert timing["computed_tokens"] == 5 and timing["cached_tokens"] == 0
    assert len(timing["itl_ms"]) == 6 and timing["ttft_ms"] > 0
    # the text re-tokenizes to exactly the completion tokens
    text = "".join(e["choices"][0]["text"] for e in content)
    assert httpx.post(cpu_emu.url + "/tokenize", json={"prompt": text}).json()["count"] == 7


def test_streaming_without_usage_and_continuous_usage(cpu_emu):
    body = {"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 3, "stream": True}
    events = stream(cpu_emu.url, body)
    assert events[-1] is None and len(events) == 4
    assert all("usage" not in e for e in events[:-1])
    assert "emulator_timing" in events[-2] and events[-2]["choices"][0]["finish_reason"] == "length"
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    events = stream(cpu_emu.url, body)
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3, 3]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 6


def test_non_streaming_completion(cpu_emu):
    r = httpx.post(cpu_emu.url + "/v1/completions",
                   json={"model": MODEL, "prompt": ["ba be"], "max_tokens": 4})
    d = r.json()
    assert d["object"] == "text_completion"
    assert d["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6,
                          "prompt_tokens_details": None}
    assert d["choices"][0]["finish_reason"] == "length"
    assert len(d["choices"][0]["text"].split()) == 4


def test_chat_streaming_shape_and_template_count(cpu_emu):
    msgs = [{"role": "system", "content": "ba be"}, {"role": "user", "content": "bi bo bu"}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    events = stream(cpu_emu.url, body, chat=True)
    assert events[-1] is None
    first = events[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e for e in events[1:-1] if e["choices"]]
    assert len(content) == 5
    assert all(set(e["choices"][0]["delta"]) == {"content"} for e in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    n = httpx.post(cpu_emu.url + "/tokenize", json={"model": MODEL, "messages": msgs}).json()["count"]
    assert n == (2 + 3) + (3 + 3) + 2
    assert events[-2]["usage"]["prompt_tokens"] == n
    d = httpx.post(cpu_emu.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": msgs, "max_tokens": 2}).json()
    assert d["object"] == "chat.completion" and d["choices"][0]["message"]["role"] == "assistant"
    assert d["usage"]["prompt_tokens"] == n


@pytest.mark.parametrize(
    "path,body,code",
    [
        ("/v1/completions", {"model": "nope", "prompt": "ba"}, 404),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
        ("/v1/completions", {"model": MODEL, "prompt": [1] * 131072, "max_tokens": 1}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "ba", "max_tokens": 0}, 400),
        ("/v1/completions", {"model": MODEL}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": [99999999]}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400),
        ("/tokenize", {"model": MODEL}, 400),
        ("/detokenize", {"model": MODEL, "tokens": [-5]}, 400),
    ],
)
def test_bad_requests(cpu_emu, path, body, code):
    r = httpx.post(cpu_emu.url + path, json=body)
    assert r.status_code == code
    err = r.json()["error"]
    assert err["code"] == code and err["param"] is None and err["message"]
    assert err["type"] == ("NotFoundError" if code == 404 else "BadRequestError")


def test_malformed_json_is_400(cpu_emu):
    r = httpx.post(cpu_emu.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_metrics_names(cpu_emu):
    stream(cpu_emu.url, {"model": MODEL, "prompt": "ba be", "max_tokens": 2, "stream": True})
    text = httpx.get(cpu_emu.url + "/metrics").text
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:request_success_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
                 "vllm:external_prefix_cache_hits_total", "vllm:prompt_tokens_by_source_total",
                 "vllm:kv_cache_usage_perc", "lmcache:num_requested_tokens_total",
                 "lmcache:num_hit_tokens_total", "lmcache:num_stored_tokens_total",
                 "lmcache:retrieve_hit_rate", "lmcache:local_cpu_usage", "emulator:tier_io_seconds_total",
                 "emulator:tier_io_overrun_seconds_total", "emulator:tier_io_overruns_total"):
        assert re.search(rf"^# TYPE {re.escape(name)} (counter|gauge)$", text, re.MULTILINE), name
        assert re.search(rf'^{re.escape(name)}\{{model_name="{MODEL}"', text, re.MULTILINE), name
    for line in text.splitlines():
        if line.startswith("# TYPE") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total")
    m = cpu_emu.metrics()
    assert m[f'vllm:generation_tokens_total{{model_name="{MODEL}"}}'] >= 2
    assert m[f'vllm:prefix_cache_hits_total{{model_name="{MODEL}"}}'] == 0


# -- cache behaviour -------------------------------------------------------------------------
def test_cpu_backend_warm_prompt_is_faster_and_hits(emu_factory):
    emu = emu_factory("--backend", "cpu")
    for seed in (8, 9):  # warm up the server (code paths, memory for large bodies)
        ttft_of(emu.url, random_ids(10_000, seed))
    colds, warms = [], []
    for seed in (11, 12, 13):
        ids = random_ids(10_000, seed)
        cold = ttft_of(emu.url, ids)
        warm = ttft_of(emu.url, ids)
        assert cold["cached_tokens"] == 0 and cold["computed_tokens"] == 10_000
        assert warm["cached_tokens"] == 10_000 // 256 * 256 == 9984
        colds.append(cold["ttft_ms"])
        warms.append(warm["ttft_ms"])
    assert statistics.median(warms) < 0.75 * statistics.median(colds), (colds, warms)
    assert emu.metric("vllm:external_prefix_cache_hits_total") == 3 * 9984
    assert emu.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 3 * 9984
    assert emu.metric("lmcache:num_hit_tokens_total") == 3 * 9984
    assert emu.metric("lmcache:local_cpu_usage") == 5 * 39 * 256 * 57_344
    log = emu.log()
    assert "LMCache INFO: Retrieved 9984 out of total 10000 tokens" in log
    assert "LMCache INFO: Stored 9984 out of total 10000 tokens" in log
    # a prompt sharing only the first half hits only that half
    half = ids[:5000] + random_ids(5000, 99)
    assert ttft_of(emu.url, half)["cached_tokens"] == 5000 // 256 * 256
    # short prompts (less than one chunk) never hit
    short = random_ids(200, 13)
    ttft_of(emu.url, short)
    assert ttft_of(emu.url, short)["cached_tokens"] == 0
    # reset empties the tier
    assert httpx.post(emu.url + "/reset_prefix_cache").status_code == 200
    assert ttft_of(emu.url, ids)["cached_tokens"] == 0


def test_none_backend_never_hits(emu_factory):
    emu = emu_factory("--backend", "none")
    for seed in (18, 19):  # warm up the server (code paths, memory for large bodies)
        ttft_of(emu.url, random_ids(10_000, seed))
    ids = random_ids(10_000, 21)
    runs = [ttft_of(emu.url, ids) for _ in range(4)]
    # every repeat recomputes the whole prompt: nothing is loaded, so nothing can be faster
    assert all(r["cached_tokens"] == 0 and r["computed_tokens"] == 10_000 for r in runs)
    assert emu.metric("vllm:external_prefix_cache_hits_total") == 0
    assert "lmcache:num_hit_tokens_total" not in httpx.get(emu.url + "/metrics").text


def test_disk_backend_real_files_and_restart(emu_factory, tmp_path):
    disk = tmp_path / "kv"
    emu = emu_factory("--backend", "disk", "--disk-path", str(disk))
    ids = random_ids(3000, 31)
    assert ttft_of(emu.url, ids)["cached_tokens"] == 0
    # chunks still being written are served from the write buffer: a full hit at once
    assert ttft_of(emu.url, ids)["cached_tokens"] == 2816
    wait_for(lambda: emu.metric("lmcache:num_stored_tokens_total") == 2816)
    assert ttft_of(emu.url, ids)["cached_tokens"] == 2816  # now read back from the files
    files = list(disk.glob("*.kvchunk"))
    assert len(files) == 11
    assert all(f.stat().st_size == 16 + 256 * 57_344 // 4096 for f in files)
    assert emu.metric("lmcache:local_disk_usage") == 11 * 256 * 57_344
    assert emu.stop() == 0
    emu2 = emu_factory("--backend", "disk", "--disk-path", str(disk))
    assert ttft_of(emu2.url, ids)["cached_tokens"] == 2816  # hits survive a restart


def test_gds_backend_hits_and_sits_between_cpu_and_disk(emu_factory, tmp_path):
    emu = emu_factory("--backend", "gds", "--disk-path", str(tmp_path / "gds"))
    ids = random_ids(2000, 35)
    ttft_of(emu.url, ids)
    assert ttft_of(emu.url, ids)["cached_tokens"] == 1792
    wait_for(lambda: emu.metric("lmcache:num_stored_tokens_total") == 1792)
    assert len(list((tmp_path / "gds").glob("*.kvchunk"))) == 7
    assert emu.metric("lmcache:local_disk_usage") == 7 * 256 * 57_344


def test_disk_backend_corrupt_chunk_is_a_miss(emu_factory, tmp_path):
    disk = tmp_path / "kv"
    emu = emu_factory("--backend", "disk", "--disk-path", str(disk),
                      "--config-json", '{"use_odirect": true}')
    ids = random_ids(600, 41)  # two chunks
    ttft_of(emu.url, ids)
    wait_for(lambda: emu.metric("lmcache:num_stored_tokens_total") == 512)
    assert ttft_of(emu.url, ids)["cached_tokens"] == 512
    for f in disk.glob("*.kvchunk"):
        f.write_bytes(f.read_bytes()[:100])
    assert ttft_of(emu.url, ids)["cached_tokens"] == 0
    assert "failed verification" in emu.log()


def test_slowdown_scales_ttft(emu_factory):
    # a larger modeled prefill so that the unmodeled request handling (~1 ms) is small
    cfg = ("--config-json", '{"prefill_base_ms": 30}')
    base = emu_factory("--backend", "none", "--log-level", "warning", *cfg)
    slow = emu_factory("--backend", "none", "--log-level", "warning", "--slowdown", "1.3", *cfg)
    ids = random_ids(1000, 51)

    def med(e):
        return statistics.median(ttft_of(e.url, ids)["ttft_ms"] for _ in range(7))

    ratio = med(slow) / med(base)
    assert 1.2 < ratio < 1.4, ratio


def test_quick_profile_default_ttft_and_decode(emu_factory):
    emu = emu_factory("--backend", "none", "--log-level", "warning")
    ids = random_ids(1000, 52)
    runs = [timing_of(stream(emu.url, {"model": MODEL, "prompt": ids, "max_tokens": 5,
                                       "stream": True})) for _ in range(5)]
    ttft = statistics.median(r["ttft_ms"] for r in runs)
    assert 3.0 <= ttft <= 3.4 + 4  # modeled 3.4 ms plus request handling
    itl = statistics.median(x for r in runs for x in r["itl_ms"])
    assert itl == pytest.approx(5.2, abs=0.6)  # 5 ms + 0.2 ms x 1 running


# -- fixed profile: timing is the behaviour under test ---------------------------------------
def test_fixed_profile_ttft_and_itl_at_concurrency_16(emu_factory):
    emu = emu_factory("--profile", "fixed", "--fixed-ttft-ms", "40", "--fixed-itl-ms", "8",
                      "--log-level", "warning")
    body = {"model": MODEL, "prompt": random_ids(1000, 61), "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}

    async def round_(conc: int):
        conns = [await asyncio.open_connection("127.0.0.1", emu.port) for _ in range(conc)]
        go = asyncio.Event()
        tasks = [asyncio.create_task(raw_stream(emu.port, "/v1/completions", body, connected=c, go=go))
                 for c in conns]
        await asyncio.sleep(0)
        go.set()
        return await asyncio.gather(*tasks)

    asyncio.run(round_(2))  # warm up
    server_ttft, client_ttft, itls = [], [], []
    for _ in range(3):
        for t0, events in asyncio.run(round_(16)):
            content = [(t, e) for t, e in events if e and e["choices"] and e["choices"][0]["text"]]
            assert len(content) == 6
            timing = [e for _, e in events if e][-1]["emulator_timing"]
            server_ttft.append(timing["ttft_ms"])
            itls.extend(timing["itl_ms"])
            client_ttft.append((content[0][0] - t0) * 1000)
    # The server stamps each chunk just before its write. On an idle machine the median is
    # 40.0 ms, p90 40.5, the client's median 41-43 ms; a CI runner shared with other jobs
    # made its p75 43.7. So the upper bounds are sized against what they guard, a prefill
    # the fixed profile serializes (the k-th of 16 requests at k x 40 ms, a p75 of 480),
    # not against the timer's accuracy on a loaded machine; never early holds on any.
    server_ttft.sort()
    client_ttft.sort()
    assert server_ttft[0] >= 40 - 0.1, server_ttft[:3]  # never early
    assert statistics.median(server_ttft) <= 50, server_ttft
    assert server_ttft[int(0.75 * len(server_ttft))] <= 55, server_ttft[-8:]
    assert 38 <= statistics.median(client_ttft) <= 55, client_ttft
    assert client_ttft[int(0.75 * len(client_ttft))] <= 60, client_ttft[-8:]
    assert statistics.median(itls) == pytest.approx(8, abs=1.0)


def test_quick_profile_prefill_is_serialized(emu_factory):
    emu = emu_factory("--backend", "none", "--log-level", "warning",
                      "--config-json", '{"prefill_base_ms": 10}')
    body = {"model": MODEL, "prompt": random_ids(500, 71), "max_tokens": 2, "stream": True}

    async def burst(n):
        conns = [await asyncio.open_connection("127.0.0.1", emu.port) for _ in range(n)]
        go = asyncio.Event()
        tasks = [asyncio.create_task(raw_stream(emu.port, "/v1/completions", body, connected=c, go=go))
                 for c in conns]
        await asyncio.sleep(0)
        go.set()
        return await asyncio.gather(*tasks)

    timings = sorted((timing_of([e for _, e in ev]) for _, ev in asyncio.run(burst(6))),
                     key=lambda t: t["arrival_perf_s"] + t["ttft_ms"] / 1000)
    # first tokens counted from the burst's first arrival (service runs on a virtual clock
    # from there): one prefill at a time, the k-th waits for k earlier ~10 ms prefills
    t0 = min(t["arrival_perf_s"] for t in timings)
    firsts = [(t["arrival_perf_s"] - t0) * 1000 + t["ttft_ms"] for t in timings]
    for k, t in enumerate(firsts):
        assert t >= 10 * (k + 1) - 0.1, firsts
    assert firsts[-1] <= 6 * 10.3 + 15, firsts
    assert timings[-1]["queue_ms"] >= 45


def test_sigterm_exits_zero(emu_factory):
    emu = emu_factory("--backend", "cpu")
    assert emu.stop() == 0
    assert "shutting down" in emu.log()


def test_sigterm_during_a_stream_exits_zero_promptly(emu_factory):
    emu = emu_factory("--backend", "none")
    with httpx.stream("POST", emu.url + "/v1/completions",
                      json={"model": MODEL, "prompt": "ba", "max_tokens": 5000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # streaming has begun
        t = time.monotonic()
        emu.proc.send_signal(signal.SIGTERM)
        assert emu.proc.wait(10) == 0
        assert time.monotonic() - t < 5
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    assert "1 requests aborted" in emu.log()


def test_fault_injection_errors_and_crash(emu_factory):
    emu = emu_factory("--config-json", '{"error_rate": 1.0}')
    r = httpx.post(emu.url + "/v1/completions", json={"model": MODEL, "prompt": "ba"})
    assert r.status_code == 500 and r.json()["error"]["code"] == 500
    emu2 = emu_factory("--config-json", '{"crash_after": 2}')
    for _ in range(2):
        assert httpx.post(emu2.url + "/v1/completions",
                          json={"model": MODEL, "prompt": "ba", "max_tokens": 1}).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.post(emu2.url + "/v1/completions", json={"model": MODEL, "prompt": "ba", "max_tokens": 1})
    assert emu2.proc.wait(10) == 3


def test_fault_injection_stall(emu_factory):
    emu = emu_factory("--profile", "fixed", "--fixed-ttft-ms", "10",
                      "--config-json", '{"stall_ms": 50, "stall_every": 2}')
    body = {"model": MODEL, "prompt": "ba", "max_tokens": 1, "stream": True}
    first, second = (timing_of(stream(emu.url, body))["ttft_ms"] for _ in range(2))
    assert 9.9 <= first <= 20, first
    assert 59.9 <= second <= 70, second


def test_bad_cli_arguments_exit_2():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "pytest_kvcache.emulator", "--backend", "tape"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr
