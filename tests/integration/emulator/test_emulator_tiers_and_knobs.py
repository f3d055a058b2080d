"""Redis tier, knobs for testing the plugin, seed profiles, vLLM-like scheduling, and the
seeds' qualitative results (001: warm < cold for cpu, disk, redis in that order, no gain
for none; 004: a small overhead on pure misses; TTFT rising with length and concurrency).

Orderings are checked on the model's own figures (``emulator_timing.modeled_ms``) where
possible, and on served TTFTs only with wide margins, measured in one run.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers.emulator import (
    MODEL,
    ROOT,
    free_port,
    random_ids,
    raw_stream,
    stream,
    timing_of,
    ttft_of,
    wait_for,
)

from pytest_kvcache.emulator.costmodel import (
    PROFILES,
)
from pytest_kvcache.emulator.prefix_cache import PrefixCache
from pytest_kvcache._resp import RespClient, RespError
from pytest_kvcache.emulator.tiers import RedisTier, make_tier

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


# -- a real redis-server -------------------------------------------------------------------
class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                RespClient(self.url).call("PING")
                break
            except RespError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def client(self) -> RespClient:
        return RespClient(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def body_of(ids, max_tokens: int = 1) -> dict:
    return {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "stream": True}


@needs_redis
def test_resp_client_round_trip(redis_server):
    c = redis_server.client()
    assert c.call("PING") == b"PONG"
    blob = bytes(range(256)) * 10 + b"\r\n$-1\r\n"
    assert c.call("SET", "kvem-test-k", blob) == b"OK"
    assert c.call("GET", "kvem-test-k") == blob
    assert c.call("GET", "kvem-test-missing") is None
    assert c.call("DEL", "kvem-test-k", "kvem-test-missing") == 1
    with pytest.raises(RespError):
        c.call("NOSUCHCOMMAND")
    assert c.call("PING") == b"PONG"  # the connection survives an error reply
    with pytest.raises(RespError):
        RespClient(f"redis://127.0.0.1:{free_port()}", timeout=1).call("PING")


@needs_redis
def test_redis_tier_lru_verification_and_rebuild(redis_server):
    prefix = f"kvem@unit-{time.monotonic_ns()}@"
    tier = RedisTier(redis_server.url, capacity_bytes=3 * 100, prefix=prefix)
    cache = PrefixCache(tier, chunk_size=4, kv_bytes_per_token=25, payload_scale=1.0)
    assert cache.payload_len == 100
    keys = cache.keys(list(range(20)))  # 5 chunks, room for 3
    assert cache.store(keys) == 5
    assert len(tier) == 3 and tier.usage() == 300
    assert cache.lookup(keys) == 0  # the first chunks were evicted (LRU)
    assert [tier.contains(k) for k in keys] == [False, False, True, True, True]
    c = redis_server.client()
    names = c.call("KEYS", prefix.replace("@", "?") + "*")
    assert len(names) == 3 and all(n.endswith(b"kv_bytes") for n in names)
    assert cache.load(keys[2:]) == (3, [])
    # a corrupt value is a miss and is evicted
    c.call("SET", tier._rkey(keys[3]), b"garbage-garbage-garbage")
    assert cache.load(keys[2:]) == (1, [])
    assert not tier.contains(keys[3])
    # a new tier on the same server finds the chunks (emulator restart)
    again = RedisTier(redis_server.url, capacity_bytes=3 * 100, prefix=prefix)
    assert sorted(again._index) == sorted(k for k in keys if tier.contains(k))
    again.clear()
    assert c.call("KEYS", prefix.replace("@", "?") + "*") == []
    with pytest.raises(ValueError):
        make_tier("redis", capacity_bytes=10)


def _command_calls(client: RespClient) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (``INFO commandstats``)."""
    info = client.call("INFO", "commandstats").decode()
    return {line.split(":")[0][len("cmdstat_"):]: int(line.split("calls=")[1].split(",")[0])
            for line in info.splitlines() if line.startswith("cmdstat_")}


@needs_redis
def test_redis_tier_moves_a_request_in_one_round_trip_per_batch(redis_server, monkeypatch):
    """Issue #6: a request's chunks are read with one MGET and written with one MSET per
    batch of ``REDIS_BATCH`` (as LMCache's connector fetches a lookup's chunks at once),
    with LMCache's semantics kept: a corrupt chunk still ends the hit and is evicted."""
    from pytest_kvcache.emulator import tiers

    tier = RedisTier(redis_server.url, capacity_bytes=10**6, prefix=f"kvem@batch-{time.monotonic_ns()}@")
    cache = PrefixCache(tier, chunk_size=4, kv_bytes_per_token=25, payload_scale=1.0)
    keys = cache.keys(list(range(40)))  # 10 chunks
    c = redis_server.client()
    c.call("CONFIG", "RESETSTAT")
    assert cache.store(keys) == 10
    assert cache.load(keys) == (10, [])
    calls = _command_calls(c)
    assert calls.get("mset") == 1 and calls.get("mget") == 1, calls
    assert "get" not in calls and "set" not in calls, calls

    monkeypatch.setattr(tiers, "REDIS_BATCH", 4)
    c.call("SET", tier._rkey(keys[5]), b"garbage-garbage-garbage")
    c.call("CONFIG", "RESETSTAT")
    assert cache.load(keys) == (5, [])  # chunks 0-4 read, chunk 5's frame corrupt
    assert _command_calls(c).get("mget") == 2  # the batch after the bad chunk is never fetched
    assert not tier.contains(keys[5]) and tier.contains(keys[6])
    tier.clear()


def test_help_documents_knobs_and_profiles():
    out = subprocess.run([sys.executable, "-m", "pytest_kvcache.emulator", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    for word in ("--offload-disabled", "--jitter", "--slowdown-prefill", "--slowdown-decode", "--slowdown-load",
                 "--redis-url", "redis", "a100-qwen2.5-7b", "h100x8-deepseek-v3", "max_num_batched_tokens"):
        assert word in out, word


@pytest.mark.parametrize("args", [
    ["--backend", "redis"],
    ["--backend", "redis", "--redis-url", "redis://127.0.0.1:{port:redis}"],
    ["--redis-url", "http://x"],
    ["--jitter", "1.5"],
    ["--slowdown-decode", "0"],
    ["--config-json", '{"jitter": -0.1}'],
    ["--config-json", '{"scheduler": "lifo"}'],
])
def test_bad_new_arguments_exit_2(args):
    r = subprocess.run([sys.executable, "-m", "pytest_kvcache.emulator", "--port", "1", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert r.returncode == 2, (args, r.stderr)


# -- the redis tier in the emulator --------------------------------------------------------
@needs_redis
def test_redis_backend_real_get_set_and_restart(emu_factory, redis_server):
    emu = emu_factory("--backend", "redis", "--redis-url", redis_server.url)
    ids = random_ids(3000, 31)
    cold = ttft_of(emu.url, ids)
    warm = ttft_of(emu.url, ids)
    assert cold["cached_tokens"] == 0
    assert warm["cached_tokens"] == 3000 // 256 * 256 == 2816
    c = redis_server.client()
    names = c.call("KEYS", f"kvem?{MODEL}?256?*")
    assert len(names) == 11 and all(n.endswith(b"kv_bytes") for n in names)
    assert emu.metric("lmcache:num_hit_tokens_total") == 2816
    assert emu.metric("lmcache:remote_storage_usage") == 11 * 256 * 57_344
    assert "LMCache INFO: Retrieved 2816 out of total 3000 tokens" in emu.log()
    emu.stop()
    # a new emulator on the same Redis hits at once
    emu2 = emu_factory("--backend", "redis", "--redis-url", redis_server.url)
    assert ttft_of(emu2.url, ids)["cached_tokens"] == 2816
    assert httpx.post(emu2.url + "/reset_prefix_cache").status_code == 200
    assert c.call("KEYS", f"kvem?{MODEL}?256?*") == []
    assert ttft_of(emu2.url, ids)["cached_tokens"] == 0


@needs_redis
def test_redis_backend_wiring_of_the_plugin(emu_factory, tmp_path):
    """``provision('redis', 'emulator')`` names the same redis-server service as the vLLM path;
    started from its rendered argv, the emulator gets its URL and hits."""
    from pytest_kvcache.backends import provision

    config = provision("redis", "emulator", tmp_path)
    assert config.port_names() == ["redis"]
    port = free_port()
    rendered = config.render({"redis": port})
    (spec,) = rendered.services
    assert spec.argv[0] == "redis-server" and str(port) in spec.argv and spec.ready == "redis"
    proc = subprocess.Popen(list(spec.argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                RespClient(f"redis://127.0.0.1:{port}").call("PING")
                break
            except RespError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        args = [a.replace("{port:redis}", str(port)) for a in config.emulator_args]
        assert "--redis-url" in args
        emu = emu_factory(*args)
        ids = random_ids(600, 41)
        ttft_of(emu.url, ids)
        assert ttft_of(emu.url, ids)["cached_tokens"] == 512
        emu.stop()
    finally:
        proc.terminate()
        proc.wait(10)


# -- knobs ---------------------------------------------------------------------------------
def test_offload_disabled_recomputes_silently_but_reports_queries(emu_factory):
    emu = emu_factory("--backend", "cpu", "--offload-disabled")
    ids = random_ids(3000, 51)
    cold = ttft_of(emu.url, ids)
    warm = ttft_of(emu.url, ids)
    assert cold["cached_tokens"] == warm["cached_tokens"] == 0
    assert warm["modeled_ms"] == pytest.approx(cold["modeled_ms"], rel=1e-6)
    assert emu.metric("vllm:external_prefix_cache_queries_total") == 6000
    assert emu.metric("vllm:external_prefix_cache_hits_total") == 0
    assert emu.metric("lmcache:num_requested_tokens_total") == 6000
    assert emu.metric("lmcache:num_stored_tokens_total") == 0
    assert emu.metric("emulator:tier_chunks") == 0
    assert "LMCache hit tokens: 0" in emu.log()
    # the same through --config-json
    emu2 = emu_factory("--backend", "cpu", "--config-json", '{"offload_disabled": true}')
    ttft_of(emu2.url, ids)
    assert ttft_of(emu2.url, ids)["cached_tokens"] == 0


def test_jitter_is_seeded_deterministic_and_bounded(emu_factory):
    def run(*args: str) -> list[float]:
        emu = emu_factory("--backend", "none", "--log-level", "warning", *args)
        out = [ttft_of(emu.url, random_ids(2000, 61 + i))["modeled_ms"] for i in range(6)]
        emu.stop()
        return out

    plain = run()
    a = run("--jitter", "0.3", "--seed", "7")
    b = run("--config-json", '{"jitter": 0.3}', "--seed", "7")
    c = run("--jitter", "0.3", "--seed", "8")
    assert a == b
    assert a != c
    assert len(set(plain)) == 1
    for x in a + c:
        assert 0.7 * plain[0] - 1e-6 <= x <= 1.3 * plain[0] + 1e-6
    assert max(a) / min(a) > 1.02  # it does vary


def test_slowdown_per_phase(emu_factory):
    ids = random_ids(10_000, 71)
    base = emu_factory("--backend", "cpu", "--log-level", "warning")
    pre = emu_factory("--backend", "cpu", "--log-level", "warning", "--slowdown-prefill", "2")
    load = emu_factory("--backend", "cpu", "--log-level", "warning", "--config-json", '{"slowdown_load": 3}')
    figures = {}
    for name, emu in (("base", base), ("pre", pre), ("load", load)):
        figures[name] = (ttft_of(emu.url, ids)["modeled_ms"], ttft_of(emu.url, ids)["modeled_ms"])
    q = PROFILES["quick"]
    prefill_cold, prefill_warm = q.prefill_ms(10_000, 10_000), q.prefill_ms(16, 10_000)
    cold_io = q.load_ms("cpu", 0) + q.store_ms("cpu", 9984)
    warm_io = q.load_ms("cpu", 9984)
    assert figures["base"] == pytest.approx((prefill_cold + cold_io, prefill_warm + warm_io), rel=1e-4)
    assert figures["pre"] == pytest.approx((2 * prefill_cold + cold_io, 2 * prefill_warm + warm_io), rel=1e-4)
    assert figures["load"] == pytest.approx((prefill_cold + 3 * cold_io, prefill_warm + 3 * warm_io), rel=1e-4)
    # decode: the intervals double (served, generous margins)
    dec = emu_factory("--backend", "none", "--log-level", "warning", "--slowdown-decode", "2")
    plain = emu_factory("--backend", "none", "--log-level", "warning")
    body = body_of(random_ids(100, 72), max_tokens=12)
    itl_plain = statistics.median(timing_of(stream(plain.url, body))["itl_ms"])
    itl_dec = statistics.median(timing_of(stream(dec.url, body))["itl_ms"])
    assert 1.6 < itl_dec / itl_plain < 2.5, (itl_plain, itl_dec)
    # the fixed profile: prefill scales the TTFT, decode the ITL
    fx = emu_factory("--profile", "fixed", "--slowdown-prefill", "2", "--slowdown-decode", "0.5")
    t = timing_of(stream(fx.url, body))
    assert t["modeled_ms"] == pytest.approx(80.0)
    assert 70 < t["ttft_ms"] < 120
    assert 2.5 < statistics.median(t["itl_ms"]) < 8


# -- scheduling like vLLM ------------------------------------------------------------------
async def _concurrent(port: int, bodies: list[dict]) -> list[dict]:
    go = asyncio.Event()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in bodies]
    tasks = [asyncio.create_task(raw_stream(port, "/v1/completions", b, connected=c, go=go))
             for b, c in zip(bodies, conns)]
    await asyncio.sleep(0.05)
    go.set()
    out = []
    for t in tasks:
        _, events = await t
        out.append([e for _, e in events if e is not None][-1]["emulator_timing"])
    return out


def test_batched_scheduler_budget_queue_and_concurrency(emu_factory):
    emu = emu_factory("--backend", "none", "--profile", "a100-qwen2.5-7b", "--slowdown", "0.02",
                      "--log-level", "warning", "--config-json", '{"max_num_seqs": 3}')
    single = ttft_of(emu.url, random_ids(4000, 80))
    p = PROFILES["a100-qwen2.5-7b"]
    one_step = 0.02 * (p.step_base_ms + p.prefill_ms(4000, 4000) - p.prefill_base_ms)
    assert single["modeled_ms"] == pytest.approx(one_step, rel=1e-3)
    # 6 at once, 3 may run: the last three wait in the queue; TTFT grows with concurrency
    bodies = [body_of(random_ids(4000, 81 + i), max_tokens=2) for i in range(6)]
    timings = asyncio.run(_concurrent(emu.port, bodies))
    ttfts = [t["ttft_ms"] for t in timings]
    assert statistics.mean(ttfts) > 2.0 * single["ttft_ms"], (ttfts, single)
    assert sum(t["queue_ms"] > 0.5 * single["ttft_ms"] for t in timings) >= 3, timings
    # chunked prefill: a prompt longer than the token budget takes several steps
    long = ttft_of(emu.url, random_ids(20_000, 90))
    assert long["modeled_ms"] > 2.5 * single["modeled_ms"]


# -- the seeds' qualitative results --------------------------------------------------------
@needs_redis
def test_seed001_warm_below_cold_cpu_disk_redis_in_order_none_no_gain(emu_factory, redis_server, tmp_path):
    """Seed 001 (Qwen2.5-7B on A100): warm TTFT < cold for cpu, disk, redis, in that order
    of benefit; no gain without offload.  Modeled figures strictly, served with margins."""
    common = ("--profile", "a100-qwen2.5-7b", "--slowdown", "0.05", "--log-level", "warning")
    servers = {
        "none": emu_factory("--backend", "none", *common),
        "cpu": emu_factory("--backend", "cpu", *common),
        "disk": emu_factory("--backend", "disk", "--disk-path", str(tmp_path / "disk"), *common),
        "redis": emu_factory("--backend", "redis", "--redis-url", redis_server.url, *common),
    }
    ratio_model, ratio_served = {}, {}
    for name, emu in servers.items():
        ttft_of(emu.url, random_ids(2000, 100))  # warm up code paths
        cold_m, warm_m, cold_s, warm_s = [], [], [], []
        for seed in (101, 102, 103):
            ids = random_ids(8000, seed)
            cold, warm = ttft_of(emu.url, ids), ttft_of(emu.url, ids)
            assert warm["cached_tokens"] == (0 if name == "none" else 7936)
            cold_m.append(cold["modeled_ms"])
            warm_m.append(warm["modeled_ms"])
            cold_s.append(cold["ttft_ms"])
            warm_s.append(warm["ttft_ms"])
        ratio_model[name] = statistics.median(warm_m) / statistics.median(cold_m)
        ratio_served[name] = statistics.median(warm_s) / statistics.median(cold_s)
    assert ratio_model["none"] == pytest.approx(1.0, abs=1e-6)
    assert ratio_model["cpu"] < ratio_model["disk"] < ratio_model["redis"] < 0.9, ratio_model
    assert ratio_served["cpu"] < ratio_served["redis"], ratio_served
    assert ratio_served["disk"] < ratio_served["redis"], ratio_served
    assert ratio_served["redis"] < 0.85, ratio_served
    assert ratio_served["none"] > 0.85, ratio_served


@needs_redis
def test_quick_profile_warm_redis_at_10k_beats_recompute_in_tier_order(emu_factory, redis_server, tmp_path):
    """Issue #6: under the default ``quick`` profile a warm 10k-token prompt served from
    redis beats recomputing it without offload, and the order of benefit stays cpu > disk
    > redis.  Served TTFT medians of requests taken in turns; every tier is filled first
    (a cold round) and its writes are waited for, so no write overlaps a timed read."""
    servers = {
        "none": emu_factory("--backend", "none", "--log-level", "warning"),
        "cpu": emu_factory("--backend", "cpu", "--log-level", "warning"),
        "disk": emu_factory("--backend", "disk", "--disk-path", str(tmp_path / "disk"), "--log-level", "warning"),
        "redis": emu_factory("--backend", "redis", "--redis-url", redis_server.url, "--log-level", "warning"),
    }
    warm_up = random_ids(10_000, 599)
    prompts = [random_ids(10_000, 600 + i) for i in range(15)]
    chunks = 10_000 // 256
    for name, emu in servers.items():
        ttft_of(emu.url, warm_up)
        ttft_of(emu.url, warm_up)  # a hit where there is a tier: both code paths warm
        if name != "none":
            assert httpx.post(emu.url + "/reset_prefix_cache").status_code == 200  # redis is shared
            for ids in prompts:
                assert ttft_of(emu.url, ids)["cached_tokens"] == 0
            wait_for(lambda emu=emu: emu.metric("emulator:tier_chunks") == len(prompts) * chunks)

    def medians(names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        """Median served and modeled TTFT per server; each prompt visits them in turn,
        in alternating order, so drift of the machine reaches every series alike."""
        served: dict[str, list[float]] = {n: [] for n in names}
        modeled: dict[str, list[float]] = {n: [] for n in names}
        for i, ids in enumerate(prompts):
            for name in names if i % 2 == 0 else names[::-1]:
                timing = ttft_of(servers[name].url, ids)
                assert timing["cached_tokens"] == (0 if name == "none" else chunks * 256)
                served[name].append(timing["ttft_ms"])
                modeled[name].append(timing["modeled_ms"])
        return ({n: statistics.median(v) for n, v in served.items()},
                {n: statistics.median(v) for n, v in modeled.items()})

    # none against redis as a pair: with four servers taking turns every request came out
    # ~0.7 ms slower on a 2-core VM (CPU caches), about the margin under test
    # The served margin is ~0.5-1 ms on 2 shared cores: like the other timing tests, up to
    # three measurements (the modeled order is exact every time).
    for _ in range(3):
        served, modeled = medians(["none", "redis"])
        assert modeled["redis"] < modeled["none"], modeled
        if served["redis"] < served["none"]:
            break
    assert served["redis"] < served["none"], served
    for _ in range(3):  # the same for the tiers' order: a busy neighbour may blur one measurement
        served, modeled = medians(["cpu", "disk", "redis"])
        assert modeled["cpu"] < modeled["disk"] < modeled["redis"], modeled
        if served["cpu"] < served["disk"] < served["redis"]:
            break
    assert served["cpu"] < served["disk"] < served["redis"], served


def test_seed004_small_overhead_on_pure_misses(emu_factory):
    """Seed 004 (Qwen3-8B on RTX 4090): with offload, pure cache misses cost a little more
    than without (+3% to +15% there); with reuse the warm TTFT falls far below."""
    common = ("--profile", "rtx4090-qwen3-8b", "--slowdown", "0.05", "--log-level", "warning")
    off = emu_factory("--backend", "none", *common)
    on = emu_factory("--backend", "cpu", *common)
    for n in (1024, 8192):
        for seed in range(3):
            ids = random_ids(n, 200 + seed + n)
            a, b = ttft_of(off.url, ids), ttft_of(on.url, ids)
            assert b["cached_tokens"] == 0
            assert 1.0 < b["modeled_ms"] / a["modeled_ms"] < 1.15, (n, a, b)
    ids = random_ids(8192, 200 + 8192)  # seen above: now a hit
    assert ttft_of(on.url, ids)["modeled_ms"] < 0.5 * ttft_of(off.url, ids)["modeled_ms"]


def test_ttft_rises_with_input_length(emu_factory):
    for profile, slowdown in (("quick", "1"), ("h100-mistral-7b", "0.05")):
        emu = emu_factory("--backend", "none", "--profile", profile, "--slowdown", slowdown, "--log-level",
                          "warning")
        ttft_of(emu.url, random_ids(1000, 300))
        model, served = [], []
        for i, n in enumerate((1000, 8000, 32000)):
            t = ttft_of(emu.url, random_ids(n, 301 + i))
            model.append(t["modeled_ms"])
            served.append(t["ttft_ms"])
        assert model[0] < model[1] < model[2], (profile, model)
        assert served[0] < served[2], (profile, served)


def test_waterfall_backend_hits_priced_by_the_tier_holding_them(emu_factory, tmp_path):
    # RAM for ~4 chunks of 256 tokens (Qwen2.5-7B KV: 14.7 MB a chunk)
    emu = emu_factory("--backend", "waterfall", "--disk-path", str(tmp_path / "wf"), "--cpu-size-gb", "0.06",
                      "--log-level", "warning")
    cpu = emu_factory("--backend", "cpu", "--log-level", "warning")
    disk = emu_factory("--backend", "disk", "--disk-path", str(tmp_path / "d"), "--log-level", "warning")
    small = random_ids(1000, 500)  # 3 chunks: fit in RAM
    big = random_ids(6000, 501)  # 23 chunks: most end on disk
    out = {}
    for name, emu_ in (("wf", emu), ("cpu", cpu), ("disk", disk)):
        ttft_of(emu_.url, small)
        out[name, "small"] = ttft_of(emu_.url, small)
        ttft_of(emu_.url, big)
        out[name, "big"] = ttft_of(emu_.url, big)
    assert out["wf", "small"]["cached_tokens"] == 768 and out["wf", "big"]["cached_tokens"] == 5888
    assert out["wf", "small"]["modeled_ms"] == pytest.approx(out["cpu", "small"]["modeled_ms"], rel=1e-6)
    assert out["cpu", "big"]["modeled_ms"] < out["wf", "big"]["modeled_ms"] < out["disk", "big"]["modeled_ms"]
    assert emu.metric("lmcache:local_disk_usage") > 0 and emu.metric("lmcache:local_cpu_usage") > 0
    assert list((tmp_path / "wf").glob("*.kvchunk"))


def test_batched_prefill_slows_decode_streams_cold_not_warm(emu_factory):
    """Chunked prefill shares steps with decodes: a cold 8k prefill stretches the intervals
    of a stream decoding beside it; the same prompt warm (cpu offload) hardly does."""
    emu = emu_factory("--backend", "cpu", "--profile", "a100-qwen2.5-7b", "--slowdown", "0.05",
                      "--log-level", "warning")
    long_ids = random_ids(8000, 600)

    async def beside(seed: int) -> list[float]:
        dec = asyncio.create_task(raw_stream(emu.port, "/v1/completions",
                                             body_of(random_ids(100, seed), max_tokens=150)))
        await asyncio.sleep(0.03)
        await raw_stream(emu.port, "/v1/completions", body_of(long_ids))
        _, events = await dec
        return [e for _, e in events if e is not None][-1]["emulator_timing"]["itl_ms"]

    cold = asyncio.run(beside(601))
    warm = asyncio.run(beside(602))
    p = PROFILES["a100-qwen2.5-7b"]
    prefill = 0.05 * (p.prefill_ms(8000, 8000) - p.prefill_base_ms)  # ~44 ms
    assert max(cold) > 0.6 * prefill, (max(cold), prefill)
    assert max(warm) < 0.3 * prefill, (max(warm), prefill)
