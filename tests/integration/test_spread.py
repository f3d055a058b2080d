"""One round's load spread over client processes (spread.py), against the reference server
and through the plugin (--kv-client-processes)."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers.kvproject import make_project, run_pytest
from helpers.loadgen import MODEL, prompts

from pytest_kvcache import loadgen
from pytest_kvcache.spread import ClientProcessError, ClientProcesses
from pytest_kvcache.testing import start_reference_server


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    server = start_reference_server(tmp_path_factory.mktemp("ref"), "--ttft-ms", "20", "--itl-ms", "2", model=MODEL)
    yield server
    server.stop()


def spread_round(url: str, processes: int, concurrency: int, ps, timings: dict | None = None, **spec_kw):
    async def run():
        clients = ClientProcesses(url, concurrency, processes)
        try:
            # the suite's client floor (tests/conftest.py): these tests check how the slots are
            # spread, and a starved CI runner must not trip the delivered-concurrency guard
            floors = {"min_concurrency_ratio": 0.5, "min_rate_ratio": 0.5}
            spec = loadgen.LoadSpec(model=MODEL, max_concurrency=concurrency, timeout_s=30, **{**floors, **spec_kw})
            return await clients.run_round(spec, ps, "measured", server_timings=timings)
        finally:
            clients.close()

    return asyncio.run(run())


def max_in_flight(records) -> int:
    events = sorted([(r.start, 1) for r in records] + [(r.chunk_times[-1], -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_two_processes_send_one_round_as_one_client_would(ref) -> None:
    ps = prompts(24, input_len=32, output_len=6)
    timings: dict = {}
    result = spread_round(ref.url, 2, 8, ps, timings)
    assert result.failed == 0 and result.invalid_reason is None
    assert [r.index for r in result.records] == list(range(24))
    assert all(r.output_tokens == 6 and r.prompt_tokens_reported == 32 for r in result.records)
    assert result.summary["client_processes"] == 2
    assert result.summary["configured_concurrency"] == 8
    assert result.summary["completed"] == 24 and result.summary["total_output_tokens"] == 144
    assert max_in_flight(result.records) == 8  # the cap holds over both processes together
    # each record got the server's truth of its own request back
    assert sorted(timings) == list(range(24))
    for r in result.records:
        truth = timings[r.index]
        assert len(truth["chunk_perf_s"]) == len(r.chunk_times)
        assert r.start <= truth["arrival_perf_s"] <= truth["chunk_perf_s"][0] <= r.chunk_times[0]
    assert result.duration >= max(r.chunk_times[-1] for r in result.records) - min(r.start for r in result.records)


def test_a_request_rate_keeps_the_round_s_one_seeded_schedule(ref) -> None:
    ps = prompts(20, input_len=16, output_len=2)
    result = spread_round(ref.url, 2, 4, ps, request_rate=200.0, seed=7)
    assert result.failed == 0
    offsets = loadgen._arrival_offsets(20, 200.0, 7)
    first = min(r.scheduled for r in result.records)
    assert [r.scheduled - first for r in result.records] == pytest.approx(offsets, abs=1e-9)
    assert result.summary["configured_request_rate"] == 200.0
    assert result.summary["request_rate_ratio"] is not None


def test_a_dead_client_process_is_named() -> None:
    async def run():
        clients = ClientProcesses("http://127.0.0.1:9", 2, 2)
        spec = loadgen.LoadSpec(model=MODEL, max_concurrency=2, timeout_s=5)
        try:
            await asyncio.get_running_loop().run_in_executor(None, clients._start)
            clients._workers[1][0].kill()
            await clients.run_round(spec, prompts(2, input_len=4, output_len=1), "measured")
        finally:
            clients.close()

    with pytest.raises(ClientProcessError, match=r"client process 2 \(pid \d+\) died"):
        asyncio.run(run())


SCENARIO = """
name: small
phase: prefill
matrix:
  backend: [none]
  input_len: [100]
  concurrency: [4]
  output_len: [4]
num_prompts: 8
rounds: [cold]
trials: 1
"""


def test_the_plugin_sends_rounds_from_client_processes(tmp_path) -> None:
    project = make_project(tmp_path, SCENARIO)
    done = run_pytest(project, f"--kv-results-dir={tmp_path / 'out'}", "--kv-client-processes", "2")
    output = done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "out" / "small").glob("*.json")
    cold = json.loads(result.read_text())["trials"][0]["rounds"]["cold"]
    assert cold["client_processes"] == 2
    assert cold["completed"] == 8 and cold["failed"] == 0, output
    # the item passes unless the client's guard found this (shared, loaded) machine too slow
    assert done.returncode == 0 or cold["invalid_reason"], output
