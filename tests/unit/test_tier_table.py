"""The tier table: a storage item's tiers and the servers' (LMCache, the emulator) in the same columns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers.tiers import inference_outcome, lmcache_rounds, storage_result

from pytest_kvcache.models import CaseResult, RoundResult, TrialResult
from pytest_kvcache.report.terminal import render_summary
from pytest_kvcache.report.tiers import TIER_HEADER, tier_lines, tier_rows


def _storage_outcome(**kwargs):
    result = storage_result(**kwargs)
    case = SimpleNamespace(name=result.name, measure_round="")
    # a storage item may also carry a result: one round named "storage", no records, a flat summary
    rounds = (RoundResult(round="storage", records=(), duration=1.0, summary={"storage_throughput": 1.0},
                          max_loop_lag_ms=0.0),)
    flat = CaseResult(case=case, trials=(TrialResult(index=0, rounds=rounds, measure_round="storage"),), server={})
    return SimpleNamespace(case=case, storage=result, result=flat, status="baseline-updated", message="",
                           verdicts=[], comparisons=[], software_change="")


def _outcomes():
    lmcache = lmcache_rounds("redis")
    return [_storage_outcome(),
            inference_outcome("real[redis-2k-c1]", "redis", [lmcache, lmcache]),
            inference_outcome("seed[waterfall-1k-c1]", "waterfall", [
                {"warm": {"tier_hit_tokens:cpu": 512.0, "tier_hit_tokens:disk": 256.0}},
                {"warm": {"tier_hit_tokens:cpu": 768.0, "tier_hit_tokens:disk": 0.0}}]),
            inference_outcome("seed[none-1k-c1]", "none", [{"warm": {"prompt_tokens": 1000.0}}]),
            SimpleNamespace(case=SimpleNamespace(name="skipped[x]"), result=None, status="skipped", message="no GPU",
                            verdicts=[], comparisons=[], software_change="")]


def _by_tier(rows):
    return {(r[0], r[2]): dict(zip(TIER_HEADER, r)) for r in rows}


def test_storage_and_server_tiers_share_the_columns():
    rows = _by_tier(tier_rows(_outcomes()))
    assert list(rows) == [("tiers[cpu+disk-u2]", "cpu"), ("tiers[cpu+disk-u2]", "disk"), ("real[redis-2k-c1]", "cpu"),
                          ("real[redis-2k-c1]", "redis"), ("seed[waterfall-1k-c1]", "cpu"),
                          ("seed[waterfall-1k-c1]", "disk")]
    cpu = rows[("tiers[cpu+disk-u2]", "cpu")]  # means of the two trials: 40 and 60 reads of 512 KiB blocks
    assert (cpu["view"], cpu["reads"], cpu["writes"], cpu["hits"], cpu["hit tokens"], cpu["misses"]) == \
        ("storage", "50", "25", "35", "140", "15")
    assert (cpu["evictions"], cpu["MiB read/written"], cpu["read p95 ms"], cpu["write p95 ms"]) == \
        ("4", "25/12.5", "1", "2")
    assert (cpu["read GB/s"], cpu["trials used"]) == ("1.05", "2/2")
    redis = rows[("real[redis-2k-c1]", "redis")]  # the warm round read 5 chunks back from Redis
    assert (redis["view"], redis["reads"], redis["writes"], redis["hits"], redis["hit tokens"]) == \
        ("LMCache (warm)", "5", "0", "5", "1280")
    assert (redis["misses"], redis["MiB read/written"], redis["read p95 ms"], redis["write GB/s"]) == ("-",) * 4
    assert redis["read GB/s"] == "0.142" and redis["trials used"] == "2/2"
    assert rows[("real[redis-2k-c1]", "cpu")]["evictions"] == "10"
    emulator = rows[("seed[waterfall-1k-c1]", "cpu")]
    assert (emulator["view"], emulator["hit tokens"], emulator["reads"], emulator["read GB/s"]) == \
        ("emulator (warm)", "640", "-", "-")


def test_a_storage_item_without_complete_trials_keeps_its_tiers_without_figures():
    rows = _by_tier(tier_rows([_storage_outcome(complete=(False, False))]))
    cpu = rows[("tiers[cpu+disk-u2]", "cpu")]
    assert (cpu["reads"], cpu["read p95 ms"], cpu["MiB read/written"], cpu["trials used"]) == ("-", "-", "-", "0/2")


def _settings():
    return SimpleNamespace(server=SimpleNamespace(kind="vllm", endpoint=None, emulator_slowdown=1.0), alpha=0.05,
                           results_dir="/tmp/out")


@pytest.mark.parametrize("width", [None, 80, 120])
def test_terminal_summary_shows_the_storage_table_and_the_tier_table(width):
    lines = [text for text, _ in render_summary(_outcomes(), None, _settings(), width=width)]
    assert width is None or max(map(len, lines)) <= width
    text = "\n".join(lines)
    assert "storage phase (tokens / storage I/O time; wall-clock beside it):" in text
    assert "tiers, the storage phase and the servers side by side" in " ".join(lines)
    assert any("LMCache (warm)" in line and "redis" in line for line in lines) or width == 80
    if width is None:  # a log: every column
        assert [line.split()[:4] for line in lines if line.startswith("real[redis") and "LMCache" in line] == [
            ["real[redis-2k-c1]", "LMCache", "(warm)", "cpu"], ["real[redis-2k-c1]", "LMCache", "(warm)", "redis"]]


def test_no_tier_table_without_figures_per_tier():
    assert tier_lines(_outcomes()[3:], None) == []
