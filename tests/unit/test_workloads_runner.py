"""The runner with the new workloads: multi-turn sub-rounds, warm-up, percentiles, goodput."""

from __future__ import annotations

import asyncio

import pytest

from pytest_kvcache import runner as runner_mod
from pytest_kvcache.loadgen import LoadSpec
from pytest_kvcache.models import RoundResult
from pytest_kvcache.runner import CaseRunner
from pytest_kvcache.scenarios import parse_scenario
from pytest_kvcache.workloads import Prompt


MODEL = "ref-test-model"


def _round_of_turns(monkeypatch, turn_summaries):
    """The summary ``CaseRunner._round`` makes of turns whose ``run_round`` summaries
    (the client's guard figures) are given."""
    summaries = iter(turn_summaries)

    async def fake_run_round(pool, spec, prompts, round_name, on_request_done=None):
        return RoundResult(round=round_name, records=(), duration=1.0, max_loop_lag_ms=1.0,
                           summary={"p99_ttft_ms": 5.0, **next(summaries)})

    monkeypatch.setattr(runner_mod, "run_round", fake_run_round)
    case = parse_scenario({"name": "s", "phase": "multiturn", "matrix": {"backend": ["none"]}, "input_len": 10,
                           "num_prompts": 2}, "s.yaml").cases[0]
    prompts = [Prompt("x", 10, 4, turn=turn) for turn in range(len(turn_summaries)) for _ in range(2)]
    runner = CaseRunner(percentiles=(50,))
    return asyncio.run(runner._round(None, LoadSpec(model=MODEL), prompts, "warm", lambda: None, case)).summary


def guard(concurrency, ratio, scheduled, delivered, lateness, lag):
    return {"configured_concurrency": 4, "delivered_concurrency": concurrency, "concurrency_ratio": ratio,
            "configured_request_rate": 10.0, "scheduled_request_rate": scheduled,
            "delivered_request_rate": delivered, "request_rate_ratio": delivered / scheduled,
            "p99_arrival_lateness_ms": lateness, "loop_lag_p99_ms": lag}


def test_multiturn_guard_figures_come_from_the_worst_turn(monkeypatch):
    """Issue #3: a round sent in turns is as trustworthy as its worst turn, so each guard
    figure comes from the turn where it was worst (with the figures its ratio is made
    of), not from the last turn."""
    summary = _round_of_turns(monkeypatch, [
        guard(3.96, 0.99, 10.0, 6.0, 40.0, 1.0),  # turn 0: the rate fell short
        guard(2.0, 0.5, 10.0, 9.9, 2.0, 9.0),  # turn 1: concurrency fell short, the loop lagged
        guard(None, None, 8.0, 8.0, 1.0, 2.0),  # turn 2: fine; nobody waited for a slot
    ])
    assert (summary["concurrency_ratio"], summary["delivered_concurrency"]) == (0.5, 2.0)
    assert (summary["request_rate_ratio"], summary["delivered_request_rate"],
            summary["scheduled_request_rate"]) == (0.6, 6.0, 10.0)
    assert summary["p99_arrival_lateness_ms"] == 40.0 and summary["loop_lag_p99_ms"] == 9.0
    assert summary["configured_concurrency"] == 4 and summary["configured_request_rate"] == 10.0
    assert summary["turns"] == 3 and "p99_ttft_ms" not in summary  # percentiles as asked


def test_single_round_keeps_every_guard_figure(monkeypatch):
    summary = _round_of_turns(monkeypatch, [guard(None, None, 10.0, 9.9, 3.0, 1.0)])
    assert summary["p99_arrival_lateness_ms"] == 3.0 and summary["concurrency_ratio"] is None
    assert summary["request_rate_ratio"] == pytest.approx(0.99) and "turns" not in summary


def test_an_interrupt_while_the_loop_is_built_leaves_nothing_half_done():
    """A Ctrl-C that lands while asyncio builds the run's loop (a CI run printed a half-built
    loop's finalizer traceback and a coroutine never awaited): it is delivered once the loop
    exists, the loop is closed, the coroutine too. In a fresh process, as a run's: a signal
    blocked in one thread may still be taken by another thread of a process."""
    import subprocess
    import sys

    script = """
import asyncio, inspect, os, signal
from pytest_kvcache import runner
built = []
new_event_loop = asyncio.events.new_event_loop
def interrupted_while_building():
    os.kill(os.getpid(), signal.SIGINT)
    built.append(new_event_loop())
    return built[-1]
asyncio.runners.events.new_event_loop = interrupted_while_building
async def work():
    return 1
coro = work()
try:
    runner._run_async(coro)
except KeyboardInterrupt:
    print("interrupted", len(built), built[0].is_closed(), inspect.getcoroutinestate(coro))
"""
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "interrupted 1 True CORO_CLOSED" and done.stderr == "", (done.stdout, done.stderr)
