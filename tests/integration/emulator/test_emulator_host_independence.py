"""The emulator's served times follow its model, not the host: the real tier I/O runs
inside the modeled window and is reported beside it (``emulator:tier_io_*``), the FIFO
scheduler runs on a virtual clock, and the quick profile gives seed 001's shape at 10k
tokens (warm TTFT against no offload: cpu -47%, disk -38%).

A slow host is stood in for by ``read_delay_ms`` (every chunk read back sleeps that much
longer).  Figures from the model (``emulator_timing.modeled_ms``, the profile) are
asserted exactly; served ones are compared within one run, with margins, and measured up
to three times where a busy machine can spoil one measurement.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest
from helpers.emulator import MODEL, random_ids, ttft_of, wait_for

from pytest_kvcache.emulator.costmodel import PROFILES
from pytest_kvcache.emulator.prefix_cache import PrefixCache
from pytest_kvcache.emulator.tiers import CpuTier
from pytest_kvcache.telemetry import Snapshot, TelemetrySource, parse_metrics, summarize

TEN_K = 10_000
CHUNKS_10K = TEN_K // 256  # 39 whole chunks, 9984 tokens


def chunk_file(disk, ids: list[int], index: int):
    """The file of chunk ``index`` of ``ids`` in a disk tier of the test model."""
    keys = PrefixCache(CpuTier(1), namespace=MODEL).keys(ids)
    return disk / (keys[index].hex() + ".kvchunk")


def fill(emu, prompts: list[list[int]]) -> None:
    """A cold request per prompt, then wait until every chunk is in the tier (not in
    the write buffer), so that later requests really read the tier back."""
    before = emu.metric("emulator:tier_chunks")
    for ids in prompts:
        ttft_of(emu.url, ids)
    wait_for(lambda: emu.metric("emulator:tier_chunks") >= before + sum(len(i) // 256 for i in prompts))


def lateness_ms(t: dict) -> float:
    """How long after its modeled deadline (service start + modeled time) a first token left."""
    return t["ttft_ms"] - t["queue_ms"] - t["modeled_ms"]


async def _one(port: int, data: bytes) -> dict:
    """POST a completion; its ``emulator_timing``, with ``client_ttft_ms`` added (from the
    send to the first event's arrival, as the plugin measures it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data)
    sent = time.perf_counter()
    raw = b""
    first = None
    while chunk := await reader.read(65536):
        raw += chunk
        if first is None and b"data: {" in raw:
            first = time.perf_counter()
    writer.close()
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    timing = events[-1]["emulator_timing"]
    timing["client_ttft_ms"] = (first - sent) * 1000
    return timing


async def _closed_loop(port: int, bodies: list[bytes], concurrency: int) -> list[dict]:
    """Send ``bodies`` with ``concurrency`` requests in flight (a new one as each ends), as
    the plugin's rounds do; the bodies are encoded beforehand so the client keeps up."""
    todo = list(enumerate(bodies))
    out: list[dict] = [{}] * len(bodies)

    async def client() -> None:
        while todo:
            i, data = todo.pop(0)
            out[i] = await _one(port, data)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return out


def closed_loop(emu, prompts: list[list[int]], concurrency: int) -> list[dict]:
    bodies = [json.dumps({"model": MODEL, "prompt": ids, "max_tokens": 1, "stream": True}).encode()
              for ids in prompts]
    return asyncio.run(_closed_loop(emu.port, bodies, concurrency))


# -- the tier's real I/O runs inside the modeled window ------------------------------------
def test_slow_tier_reads_within_the_model_do_not_show(emu_factory, tmp_path):
    """A host whose reads are ten times slower serves the same warm TTFT while its reads
    fit in the modeled window; the time they took is counted beside the model."""
    common = ("--backend", "disk", "--log-level", "warning", "--slowdown", "3")
    fast = emu_factory(*common, "--disk-path", str(tmp_path / "fast"))
    slow = emu_factory(*common, "--disk-path", str(tmp_path / "slow"), "--config-json", '{"read_delay_ms": 0.1}')
    prompts = [random_ids(TEN_K, 700 + i) for i in range(7)]
    for emu in (fast, slow):
        fill(emu, prompts)
    modeled = 3 * PROFILES["quick"].ttft_model_ms("disk", TEN_K, CHUNKS_10K * 256, 0)  # 14.9 ms
    delay_ms = CHUNKS_10K * 0.1  # 3.9 ms of sleeping in each read of the slow one
    for _ in range(3):
        io_before = slow.metric("emulator:tier_io_seconds_total")
        overruns_before = slow.metric("emulator:tier_io_overruns_total")
        served: dict[str, list[float]] = {"fast": [], "slow": []}
        io: dict[str, list[float]] = {"fast": [], "slow": []}
        for ids in prompts:
            for name, emu in (("fast", fast), ("slow", slow)):
                t = ttft_of(emu.url, ids)
                assert t["cached_tokens"] == CHUNKS_10K * 256
                assert t["modeled_ms"] == pytest.approx(modeled, abs=2e-4)
                served[name].append(t["ttft_ms"])
                io[name].append(t["tier_io_ms"])
        assert min(io["slow"]) >= delay_ms
        assert statistics.median(io["slow"]) > statistics.median(io["fast"]) + 0.8 * delay_ms, io
        io_grew = slow.metric("emulator:tier_io_seconds_total") - io_before
        assert io_grew >= len(prompts) * delay_ms / 1000
        med = {name: statistics.median(v) for name, v in served.items()}
        # before the change the slow one served ~4 ms later; now both at the deadline
        if (abs(med["slow"] - med["fast"]) < 0.5 and med["slow"] < modeled + 1.0
                and slow.metric("emulator:tier_io_overruns_total") == overruns_before):
            break
    assert abs(med["slow"] - med["fast"]) < 0.5, (med, served)
    assert modeled - 0.01 <= med["slow"] < modeled + 1.0, (med, modeled)
    assert slow.metric("emulator:tier_io_overruns_total") == overruns_before


def test_reads_outlasting_the_model_delay_the_response_and_are_counted(emu_factory, tmp_path):
    """When the real read takes longer than the modeled window, the first token waits for
    it: late by about the overrun, which ``/metrics`` counts."""
    emu = emu_factory("--backend", "disk", "--disk-path", str(tmp_path / "kv"), "--log-level", "warning",
                      "--slowdown", "2", "--config-json", '{"read_delay_ms": 0.75}')
    modeled = 2 * PROFILES["quick"].ttft_model_ms("disk", TEN_K, CHUNKS_10K * 256, 0)  # 9.9 ms
    for attempt in range(3):
        prompts = [random_ids(TEN_K, 720 + 10 * attempt + i) for i in range(4)]
        fill(emu, prompts)
        before = {name: emu.metric(name) for name in ("emulator:tier_io_overruns_total",
                                                      "emulator:tier_io_overrun_seconds_total",
                                                      "emulator:tier_io_seconds_total")}
        assert attempt or before["emulator:tier_io_overruns_total"] == 0  # cold requests read nothing
        warm = [ttft_of(emu.url, ids) for ids in prompts]
        grew = {name: emu.metric(name) - value for name, value in before.items()}
        for t in warm:
            assert t["modeled_ms"] == pytest.approx(modeled, abs=2e-4)
            assert t["tier_io_ms"] >= CHUNKS_10K * 0.75  # 29 ms of reading
            assert t["tier_io_overrun_ms"] > 10
        assert grew["emulator:tier_io_overruns_total"] == len(prompts)
        assert grew["emulator:tier_io_overrun_seconds_total"] == pytest.approx(
            sum(t["tier_io_overrun_ms"] for t in warm) / 1000, abs=1e-5)
        assert grew["emulator:tier_io_seconds_total"] == pytest.approx(sum(t["tier_io_ms"] for t in warm) / 1000,
                                                                      abs=1e-5)
        # late by the overrun (plus the loop's own lateness), never early
        extra = [lateness_ms(t) - t["tier_io_overrun_ms"] for t in warm]
        if all(-0.05 <= x < 2.0 for x in extra):
            break
    assert all(-0.05 <= x < 2.0 for x in extra), (extra, warm)


def test_chunk_failing_verification_is_recomputed_and_charged(emu_factory, tmp_path):
    """A chunk corrupted on disk ends the hit: it and the chunks after it are recomputed,
    the model charges that prefill (the load of the whole hit was tried), and the served
    TTFT grows by it; the chunk is offloaded again."""
    disk = tmp_path / "kv"
    emu = emu_factory("--backend", "disk", "--disk-path", str(disk), "--log-level", "warning", "--slowdown", "2")
    q = PROFILES["quick"]
    bad = 19  # chunks 0-18 verify
    for attempt in range(3):
        ids = random_ids(TEN_K, 740 + attempt)
        fill(emu, [ids])
        warm = ttft_of(emu.url, ids)
        path = chunk_file(disk, ids, bad)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF  # same length, wrong bytes: the CRC catches it
        path.write_bytes(bytes(raw))
        hurt = ttft_of(emu.url, ids)
        assert warm["cached_tokens"] == CHUNKS_10K * 256
        assert hurt["cached_tokens"] == bad * 256
        expected = 2 * (q.prefill_ms(TEN_K - bad * 256, TEN_K) + q.load_ms("disk", CHUNKS_10K * 256)
                        + q.store_ms("disk", 256))
        assert hurt["modeled_ms"] == pytest.approx(expected, abs=2e-4)
        recompute = 2 * (q.prefill_ms(TEN_K - bad * 256, TEN_K) - q.prefill_ms(TEN_K - CHUNKS_10K * 256, TEN_K))
        restore = 2 * q.store_ms("disk", 256)
        assert hurt["modeled_ms"] - warm["modeled_ms"] == pytest.approx(recompute + restore, abs=4e-4)
        wait_for(lambda held=(attempt + 1) * CHUNKS_10K: emu.metric("emulator:tier_chunks") == held)
        again = ttft_of(emu.url, ids)  # the chunk was offloaded again
        assert again["cached_tokens"] == CHUNKS_10K * 256
        if hurt["ttft_ms"] - warm["ttft_ms"] > 0.8 * recompute and lateness_ms(hurt) < 1.0:
            break
    assert hurt["ttft_ms"] - warm["ttft_ms"] > 0.8 * recompute, (warm, hurt, recompute)
    assert lateness_ms(hurt) < 1.0, hurt
    assert "failed verification" in emu.log()


def test_batched_scheduler_overlaps_the_reads_with_its_steps(emu_factory, tmp_path):
    """The batched (vLLM-like) scheduler: steps last their modeled time; a read that fits
    in the steps does not show, one that outlasts them delays the first token by about
    the overrun, and a chunk failing verification is prefilled in further steps."""
    common = ("--backend", "disk", "--profile", "a100-qwen2.5-7b", "--slowdown", "0.1", "--log-level", "warning")
    servers = {name: emu_factory(*common, "--disk-path", str(tmp_path / name),
                                 "--config-json", json.dumps({"read_delay_ms": delay}))
               for name, delay in (("fast", 0.0), ("slow", 0.1), ("late", 1.0))}
    prompts = [random_ids(8000, 900 + i) for i in range(5)]
    for emu in servers.values():
        fill(emu, prompts)
    for _ in range(3):
        before = {name: emu.metric("emulator:tier_io_overruns_total") for name, emu in servers.items()}
        warm = {name: [ttft_of(emu.url, ids) for ids in prompts] for name, emu in servers.items()}
        overruns = {name: emu.metric("emulator:tier_io_overruns_total") - before[name]
                    for name, emu in servers.items()}
        for runs in warm.values():
            for t in runs:
                assert t["cached_tokens"] == 7936
                assert t["modeled_ms"] == pytest.approx(warm["fast"][0]["modeled_ms"], abs=2e-4)  # one step
        assert all(t["tier_io_ms"] >= 31 * 0.1 for t in warm["slow"])
        served = {name: statistics.median(t["ttft_ms"] for t in runs) for name, runs in warm.items()}
        late = [lateness_ms(t) - t["tier_io_overrun_ms"] for t in warm["late"]]
        if (abs(served["slow"] - served["fast"]) < 0.5 and all(-0.05 <= x < 2.0 for x in late)
                and overruns["slow"] == 0):
            break
    assert abs(served["slow"] - served["fast"]) < 0.5, served
    assert overruns["slow"] == 0
    assert all(t["tier_io_overrun_ms"] > 8 for t in warm["late"])  # 31 ms of reading, a 17 ms step
    assert all(-0.05 <= x < 2.0 for x in late), late
    assert overruns["late"] == len(prompts)
    # a corrupt chunk: the hit ends before it, the rest is prefilled in more steps
    ids = prompts[0]
    path = chunk_file(tmp_path / "fast", ids, 10)
    path.write_bytes(path.read_bytes()[:100])
    hurt = ttft_of(servers["fast"].url, ids)
    assert hurt["cached_tokens"] == 10 * 256
    assert hurt["modeled_ms"] > warm["fast"][0]["modeled_ms"] + 0.1 * 12  # at least another step


# -- the FIFO scheduler's virtual clock ----------------------------------------------------
def test_fifo_service_starts_at_the_previous_deadline_without_drift(emu_factory):
    """Back-to-back requests: each service starts exactly when the previous one's modeled
    time ends (not when the loop got round to it), so the N-th first token leaves at the
    sum of the N modeled times, however long the loop took in between."""
    emu = emu_factory("--backend", "none", "--log-level", "warning", "--config-json", '{"prefill_base_ms": 12}')
    n = 10
    body = {"model": MODEL, "prompt": random_ids(1000, 760), "max_tokens": 1, "stream": True}
    data = json.dumps(body).encode()

    async def burst() -> list[dict]:
        return list(await asyncio.gather(*(_one(emu.port, data) for _ in range(n))))

    for _ in range(3):
        timings = sorted(asyncio.run(burst()), key=lambda t: t["arrival_perf_s"] + t["queue_ms"] / 1000)
        starts = [t["arrival_perf_s"] * 1000 + t["queue_ms"] for t in timings]
        deadlines = [s + t["modeled_ms"] for s, t in zip(starts, timings)]
        for k in range(1, n):  # the model's clock: exact
            arrival = timings[k]["arrival_perf_s"] * 1000
            assert starts[k] == pytest.approx(max(arrival, deadlines[k - 1]), abs=1e-3)
        # all queued behind the first (a busy machine may spread a burst out: measure again)
        chained = all(t["arrival_perf_s"] * 1000 < d for t, d in zip(timings[1:], deadlines))
        # served: each first token within the loop's lateness of its deadline, the last at
        # the sum of the modeled times: no drift however many came before it
        firsts = [t["arrival_perf_s"] * 1000 + t["ttft_ms"] for t in timings]
        drift = firsts[-1] - (starts[0] + sum(t["modeled_ms"] for t in timings))
        late = [f - d for f, d in zip(firsts, deadlines)]
        if chained and -0.01 <= drift < 1.0 and max(late) < 2.0:
            break
    assert chained, timings
    assert -0.01 <= drift < 1.0, (drift, late)
    assert max(late) < 2.0, late


# -- the seeds' shape ------------------------------------------------------------------------
def test_quick_profile_seed001_shape_at_10k_concurrency_16(emu_factory, tmp_path):
    """Seed 001 at 10k tokens, 50 prompts, concurrency 16: warm-round median TTFT against no
    offload about -47% for cpu and -38% for disk (gds between them), on the model always,
    and served within a few percent; the cold round's offload writes cost the responses
    nothing beyond the model, and hardly a read outlasts it.

    Served at ``--slowdown 4`` (every modeled time four times longer, the same shape): at
    1 the emulator's own work for a 10k-token request (~2.5 ms of CPU: the HTTP exchange
    and parsing the body) fills half the 4.25 ms window of a warm cpu request, and on a
    2-core machine that other jobs keep busy, the stalls they cause (a few ms) put it
    behind the model now and then; the shape holds at 1 on a machine to itself."""
    q = PROFILES["quick"]
    none = q.ttft_model_ms("none", TEN_K, 0, 0)
    warm = {t: q.ttft_model_ms(t, TEN_K, CHUNKS_10K * 256, 0) for t in ("cpu", "gds", "disk")}
    ratio_model = {t: w / none for t, w in warm.items()}
    cold_model = {t: q.ttft_model_ms(t, TEN_K, 0, CHUNKS_10K * 256) / none for t in ("cpu", "disk")}
    assert ratio_model["cpu"] == pytest.approx(0.53, abs=0.01)
    assert ratio_model["disk"] == pytest.approx(0.62, abs=0.01)
    assert ratio_model["cpu"] + 0.05 < ratio_model["gds"] < ratio_model["disk"] < 0.7

    common = ("--log-level", "warning", "--slowdown", "4")
    servers = {"none": emu_factory("--backend", "none", *common), "cpu": emu_factory("--backend", "cpu", *common)}
    for tier in ("disk", "gds"):
        servers[tier] = emu_factory("--backend", tier, "--disk-path", str(tmp_path / tier), *common)
    prompts = [random_ids(TEN_K, 800 + i) for i in range(50)]
    for emu in servers.values():  # warm up the code paths (a miss, a hit)
        closed_loop(emu, [random_ids(TEN_K, 799)] * 2, 1)

    def measure(attempt: int) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
        """Median TTFT (the client's) of the cold and warm rounds, overruns of the warm
        round, median modeled TTFT of the warm round."""
        cold_med, warm_med, overruns, modeled = {}, {}, {}, {}
        batch = [[7 + attempt] + ids[1:] for ids in prompts]  # new chunk keys each attempt
        for name, emu in servers.items():
            held = emu.metric("emulator:tier_chunks") if name != "none" else 0
            cold = closed_loop(emu, batch, 16)
            if name != "none":
                wait_for(lambda emu=emu, held=held: emu.metric("emulator:tier_chunks") == held + 50 * CHUNKS_10K, 60)
            before = emu.metric("emulator:tier_io_overruns_total")
            hot = closed_loop(emu, batch, 16)
            overruns[name] = emu.metric("emulator:tier_io_overruns_total") - before
            assert all(t["cached_tokens"] == (0 if name == "none" else CHUNKS_10K * 256) for t in hot)
            cold_med[name] = statistics.median(t["client_ttft_ms"] for t in cold)
            warm_med[name] = statistics.median(t["client_ttft_ms"] for t in hot)
            modeled[name] = statistics.median(t["modeled_ms"] for t in hot)
        return cold_med, warm_med, overruns, modeled

    for attempt in range(3):
        cold_med, warm_med, overruns, modeled = measure(attempt)
        for name in ("cpu", "gds", "disk"):
            assert modeled[name] / modeled["none"] == pytest.approx(ratio_model[name], rel=1e-4)
        served = {name: warm_med[name] / warm_med["none"] for name in ("cpu", "gds", "disk")}
        cold_ratio = {name: cold_med[name] / cold_med["none"] for name in ("cpu", "disk")}
        ok = (abs(served["cpu"] - ratio_model["cpu"]) < 0.03 and abs(served["disk"] - ratio_model["disk"]) < 0.03
              and served["cpu"] < served["gds"] < 1.0 and served["cpu"] < served["disk"] < 1.0
              and all(abs(cold_ratio[t] - cold_model[t]) < 0.03 for t in cold_ratio)
              and max(overruns.values()) <= 5)
        if ok:
            break
    summary = (served, ratio_model, warm_med, cold_med, overruns)
    assert served["cpu"] == pytest.approx(ratio_model["cpu"], abs=0.03), summary
    assert served["disk"] == pytest.approx(ratio_model["disk"], abs=0.03), summary
    assert served["cpu"] < served["gds"] < 1.0 and served["cpu"] < served["disk"] < 1.0, summary
    # the cold round's writes (a writer thread; disk: 39 files a request) cost nothing served
    assert all(cold_ratio[t] == pytest.approx(cold_model[t], abs=0.03) for t in cold_ratio), summary
    # a read outlasts its window only when the machine stalls the emulator (other jobs)
    assert max(overruns.values()) <= 5, summary


# -- reporting --------------------------------------------------------------------------------
def test_round_telemetry_carries_the_tier_io_counters(emu_factory, tmp_path):
    """The plugin's per-round telemetry keeps the host's I/O counters (deltas)."""
    emu = emu_factory("--backend", "disk", "--disk-path", str(tmp_path / "kv"), "--log-level", "warning")
    ids = random_ids(3000, 780)
    fill(emu, [ids])
    source = TelemetrySource(metrics_urls=(emu.url + "/metrics",))
    before = Snapshot(metrics={emu.url: parse_metrics(httpx.get(emu.url + "/metrics").text)})
    timing = ttft_of(emu.url, ids)
    after = Snapshot(metrics={emu.url: parse_metrics(httpx.get(emu.url + "/metrics").text)})
    out = summarize(source, before, after)
    assert out["emulator:tier_io_seconds_total"] == pytest.approx(timing["tier_io_ms"] / 1000, abs=1e-5)
    assert out["emulator:tier_io_seconds_total"] > 0
    assert out["emulator:tier_io_overruns_total"] == 0
    assert out["emulator:tier_io_overrun_seconds_total"] == 0
