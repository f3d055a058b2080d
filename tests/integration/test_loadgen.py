"""The load generator against the reference server (a real subprocess with known timings)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
from functools import partial

import pytest

from pytest_kvcache import loadgen
from pytest_kvcache._sockio import kernel_stamps_available
from pytest_kvcache.servers._process import free_port
from pytest_kvcache.workloads import Prompt
from pytest_kvcache.testing import start_reference_server
from helpers.loadgen import MODEL, prompts


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    server = start_reference_server(tmp_path_factory.mktemp("ref"), "--ttft-ms", "40", "--itl-ms", "8", model=MODEL)
    yield server
    server.stop()


@pytest.fixture
def make_server(kv_reference_server):
    return partial(kv_reference_server, model=MODEL)


async def round_(url: str, ps: list[Prompt], warmup: bool = False, timings: dict | None = None,
                 on_done=None, kernel_stamps: bool = True, **spec_kw) -> loadgen.RoundResult:
    spec_kw.setdefault("timeout_s", 30)
    spec = loadgen.LoadSpec(model=MODEL, **spec_kw)
    pool = loadgen.open_pool(url, spec.max_concurrency, kernel_stamps=kernel_stamps)
    try:
        if warmup:
            await loadgen.run_round(pool, spec, ps[: spec.max_concurrency], "warmup")
        return await loadgen.run_round(pool, spec, ps, "measure", on_done, server_timings=timings)
    finally:
        pool.close()


def errors_vs_truth(result, timings: dict) -> tuple[float, float]:
    """(median client TTFT - median true TTFT, median client ITL - median true ITL), ms."""
    ttft, true_ttft, itl, true_itl = [], [], [], []
    for r in result.records:
        assert r.success, r.error
        t = timings[r.index]
        chunks = t["chunk_perf_s"]
        ttft.append(r.ttft)
        true_ttft.append(chunks[0] - t["arrival_perf_s"])
        itl.extend(r.itls)
        true_itl.extend(b - a for a, b in itertools.pairwise(chunks))
        assert len(r.chunk_times) == len(chunks) == 32
    return ((statistics.median(ttft) - statistics.median(true_ttft)) * 1e3,
            (statistics.median(itl) - statistics.median(true_itl)) * 1e3)


def accuracy(url: str, concurrency: int, n: int, ttft_ms: float, itl_ms: float | None) -> None:
    """Timing on a shared 2-core machine is at the mercy of other processes: pass when one
    of three rounds meets the bounds, and show every attempt otherwise. The bounds here
    are the floor CI must always meet; benchmarks/bench_client.py prints the figures
    against the tighter targets (1 ms at 16, 8 ms at 128) on a quiet machine."""
    attempts = []
    for attempt in range(3):
        timings: dict = {}
        result = asyncio.run(round_(url, prompts(n, seed=attempt), warmup=True, timings=timings,
                                    max_concurrency=concurrency))
        assert result.failed == 0
        d_ttft, d_itl = errors_vs_truth(result, timings)
        attempts.append((round(d_ttft, 3), round(d_itl, 3), result.invalid_reason))
        if abs(d_ttft) <= ttft_ms and (itl_ms is None or abs(d_itl) <= itl_ms):
            return
    pytest.fail(f"client error vs server truth (TTFT ms, ITL ms, invalid reason) per attempt: {attempts}; "
                f"load average {os.getloadavg()[0]:.1f}")


def test_accuracy_at_16(ref) -> None:
    accuracy(ref.url, 16, 32, ttft_ms=2.0, itl_ms=0.5)


def test_accuracy_at_128(ref) -> None:
    accuracy(ref.url, 128, 128, ttft_ms=12.0, itl_ms=None)


def test_records_and_summary(ref) -> None:
    result = asyncio.run(round_(ref.url, prompts(8, output_len=5), max_concurrency=8))
    assert result.complete and result.failed == 0
    for r in result.records:
        assert r.output_tokens == 5 and r.chunk_tokens == (1,) * 5 and r.prompt_tokens_reported == 256
        assert 0.039 < r.ttft < 0.2
    s = result.summary
    assert s["completed"] == 8 and s["total_output_tokens"] == 40
    assert s["loop_lag_p99_ms"] is not None and s["configured_concurrency"] == 8


def test_chat_api(ref) -> None:
    result = asyncio.run(round_(ref.url, prompts(4, input_len=10, output_len=3), max_concurrency=4, api="chat"))
    assert result.complete
    assert all(r.output_tokens == 3 and len(r.chunk_times) == 3 for r in result.records)
    assert all(r.prompt_tokens_reported == 10 + 3 + 2 for r in result.records)


def test_faults_become_failed_records(make_server) -> None:
    server = make_server("--ttft-ms", "5", "--itl-ms", "1", "--error-every", "5", "--cut-after-chunks", "3",
                         "--cut-every", "7", "--malformed-every", "11")
    result = asyncio.run(round_(server.url, prompts(30, input_len=20, output_len=8), max_concurrency=1))
    assert not result.complete
    errors = {r.index + 1: r.error for r in result.records}  # server seq = order with concurrency 1
    for seq, err in errors.items():
        if seq % 5 == 0:
            assert err.startswith("HTTP 500") and "injected" in err, (seq, err)
        elif seq % 7 == 0:
            assert "closed by the server mid-response" in err, (seq, err)
        elif seq % 11 == 0:
            assert "malformed SSE event" in err, (seq, err)
        else:
            assert err is None, (seq, err)
    assert result.failed == 6 + 4 + 2  # 5, 10, .., 30; 7, 14, 21, 28; 11, 22
    assert result.summary["failed"] == result.failed


def test_stall_beyond_timeout(make_server) -> None:
    server = make_server("--ttft-ms", "5", "--itl-ms", "1", "--stall-every", "2", "--stall-s", "3")
    t = time.monotonic()
    result = asyncio.run(round_(server.url, prompts(4, input_len=10, output_len=4), max_concurrency=4,
                                timeout_s=1.0))
    assert time.monotonic() - t < 5
    assert not result.complete
    failed = sorted(r.index for r in result.records if not r.success)
    assert len(failed) == 2
    assert all(result.records[i].error.startswith("timeout") for i in failed)


def test_dead_server_gives_failed_records() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = asyncio.run(round_(url, prompts(3, input_len=5, output_len=2), max_concurrency=2))
    assert result.failed == 3 and not result.complete
    assert all("connection" in r.error.lower() for r in result.records)


def test_tokens_per_chunk_with_continuous_usage(make_server) -> None:
    server = make_server("--ttft-ms", "10", "--itl-ms", "5", "--tokens-per-chunk", "4")
    result = asyncio.run(round_(server.url, prompts(4, input_len=30, output_len=10), max_concurrency=4))
    assert result.complete
    for r in result.records:
        assert r.chunk_tokens == (4, 4, 2) and r.output_tokens == 10
        assert len(r.chunk_times) == 3
        assert r.tpot == pytest.approx((r.e2el - r.ttft) / 9)
        assert 0.004 < r.tpot * 9 / 2 < 0.008  # two 5 ms gaps spread over 9 tokens
    assert result.summary["total_output_tokens"] == 40


def test_queue_time_and_slots(ref) -> None:
    result = asyncio.run(round_(ref.url, prompts(16, input_len=20, output_len=4), max_concurrency=4))
    assert result.complete, result.invalid_reason
    recs = result.records
    assert all(r.start >= r.scheduled for r in recs)
    assert all(r.queue_wait < 0.02 for r in recs[:4])  # not queued (a loaded machine may be slow)
    assert all(r.queue_wait > 0.06 for r in recs[4:])  # waited for a whole request (40 + 3 * 8 ms)
    # never more than 4 in flight: each start comes after a slot was freed
    events = sorted([(r.start, 1) for r in recs] + [(r.end, -1) for r in recs], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 4
    s = result.summary
    assert s["delivered_concurrency"] is not None and 0.95 <= s["concurrency_ratio"] <= 1.0
    assert s["max_queue_ms"] > 30


def test_request_rate_round(ref) -> None:
    ps = prompts(10, input_len=10, output_len=2)
    offsets = loadgen._arrival_offsets(10, 50.0, seed=3)
    result = asyncio.run(round_(ref.url, ps, max_concurrency=10, request_rate=50.0, seed=3))
    assert result.complete, result.invalid_reason
    t0 = result.records[0].scheduled
    assert [r.scheduled - t0 for r in result.records] == pytest.approx(offsets, abs=1e-9)
    s = result.summary
    assert s["configured_request_rate"] == 50.0
    assert s["request_rate_ratio"] == pytest.approx(1.0, abs=0.05)


def test_lag_guard_makes_the_round_invalid(ref) -> None:
    def block() -> None:
        time.sleep(0.06)  # a callback that hogs the event loop

    # reads stamped in Python: a stamp can be late by the lag, so the lag itself invalidates
    user = asyncio.run(round_(ref.url, prompts(8, input_len=10, output_len=4), max_concurrency=2,
                              on_done=block, kernel_stamps=False))
    assert user.failed == 0 and not user.complete
    assert "event loop lagged" in user.invalid_reason
    # kernel stamps stay right under lag; what the lag cost, requests not in flight, still shows
    kernel = asyncio.run(round_(ref.url, prompts(8, input_len=10, output_len=4), max_concurrency=2,
                                on_done=block))
    if kernel.client_stamps == "kernel":
        assert not kernel.complete and "event loop lagged" not in kernel.invalid_reason
        assert "requests in flight" in kernel.invalid_reason
        assert kernel.summary["loop_lag_p99_ms"] > 40


async def first_chunk_while_the_loop_is_held(url: str, kernel: bool) -> tuple[float, float, str]:
    """(client TTFT, the server's true TTFT, how reads were stamped) for one request whose
    whole response arrives while the client's event loop is held."""
    pool = loadgen.open_pool(url, 1, kernel_stamps=kernel)
    try:
        await pool.open()
        conn = await pool.acquire()
        body = json.dumps({"model": MODEL, "prompt": "ba be bi", "max_tokens": 1, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        start = conn.send(pool.request_bytes("/v1/completions", body))
        # hold the loop on purpose: TTFT is 40 ms, the response waits in the socket
        time.sleep(0.12)  # noqa: ASYNC251
        await asyncio.wait_for(conn.wait(), 10)
        events, _ = conn.events()
        stamps = [stamp for stamp, event in events if b'"text"' in event]
        timing = next(json.loads(e[6:]) for _, e in events if b"server_timing" in e)["server_timing"]
        stamped = "kernel" if conn.kernel_stamps else "user"
    finally:
        pool.close()
    return stamps[0] - start, timing["chunk_perf_s"][0] - timing["arrival_perf_s"], stamped


@pytest.mark.skipif(not kernel_stamps_available(), reason="the kernel stamps TCP reads on Linux")
def test_kernel_stamps_keep_ttft_true_while_the_client_is_busy(ref) -> None:
    ttft, truth, stamped = asyncio.run(first_chunk_while_the_loop_is_held(ref.url, kernel=True))
    assert stamped == "kernel"
    assert abs(ttft - truth) < 0.01, (ttft, truth)


def test_user_stamps_are_late_by_what_holds_the_client(ref) -> None:
    ttft, truth, stamped = asyncio.run(first_chunk_while_the_loop_is_held(ref.url, kernel=False))
    assert stamped == "user"
    assert ttft - truth > 0.06, (ttft, truth)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-stamps", "user-stamps"])
def test_a_round_records_how_it_stamped_reads(ref, kernel: bool) -> None:
    async def run() -> loadgen.RoundResult:
        pool = loadgen.open_pool(ref.url, 2, kernel_stamps=kernel)
        try:
            return await loadgen.run_round(pool, loadgen.LoadSpec(model=MODEL, max_concurrency=2, timeout_s=30),
                                           prompts(4, output_len=3), "measured")
        finally:
            pool.close()

    result = asyncio.run(run())
    assert result.failed == 0
    assert result.client_stamps == ("kernel" if kernel and kernel_stamps_available() else "user")


def test_the_round_ends_with_the_last_byte_not_with_decoding(ref, monkeypatch) -> None:
    decode = loadgen._decode

    def slow_decode(*args):
        result = yield from decode(*args)
        time.sleep(0.1)  # a client that takes long to decode what already arrived
        return result

    monkeypatch.setattr(loadgen, "_decode", slow_decode)
    started = time.perf_counter()
    result = asyncio.run(round_(ref.url, prompts(4, input_len=10, output_len=3), max_concurrency=4))
    assert result.failed == 0
    assert time.perf_counter() - started >= 0.4  # the four decodes ran inside the round
    last_byte = max(r.chunk_times[-1] for r in result.records)
    first_start = min(r.start for r in result.records)
    assert result.duration <= last_byte - first_start + 0.05
    assert result.summary["output_throughput"] == pytest.approx(12 / result.duration)
