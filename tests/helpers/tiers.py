"""Outcomes with figures per tier, for the tier table's tests: a storage item's hierarchy,
an LMCache multi-process item's rounds (telemetry from the /metrics pages captured on LMCache
0.5.6, tests/unit/data/lmcache_mp_0.5.6) and an emulator item's hit tokens per tier."""

from __future__ import annotations

import math
from pathlib import Path

from pytest_kvcache.models import CaseResult, ItemOutcome, RoundResult, ScenarioCase, TrialResult
from pytest_kvcache.storage.results import LatencyFigures, StorageResult, TierFigures, summarize
from pytest_kvcache.storage.results import TrialResult as StorageTrial
from pytest_kvcache.telemetry import Snapshot, TelemetrySource, parse_metrics
from pytest_kvcache.telemetry import summarize as summarize_telemetry

LMCACHE_PAGES = Path(__file__).resolve().parents[1] / "unit" / "data" / "lmcache_mp_0.5.6"


def lmcache_rounds(l2: str) -> dict[str, dict[str, float]]:
    """The telemetry of the captured cold and warm rounds of the ``disk`` or ``redis`` backend."""
    start, cold, warm = (Snapshot(metrics={"u": parse_metrics(p.read_text())})
                         for p in sorted(LMCACHE_PAGES.glob(f"{l2}-*.txt")))
    source = TelemetrySource()
    return {"cold": summarize_telemetry(source, start, cold), "warm": summarize_telemetry(source, cold, warm)}


def case(name: str, backend: str, phase: str = "prefill") -> ScenarioCase:
    scenario, _, case_id = name.partition("[")
    return ScenarioCase(scenario=scenario, path="s.yaml", phase=phase, case_id=case_id.rstrip("]"), backend=backend,
                        input_len=2000, concurrency=1, output_len=1, num_prompts=4, dataset="random",
                        rounds=("cold", "warm"), measure_round="warm", trials=2, seed=0, api="completions",
                        request_rate=math.inf, thresholds=())


def inference_outcome(name: str, backend: str, rounds: list[dict[str, dict[str, float]]]) -> ItemOutcome:
    """An item whose trials' rounds carry ``rounds``' telemetry (round name -> telemetry, per trial)."""
    c = case(name, backend)
    trials = tuple(TrialResult(index=i, measure_round="warm", rounds=tuple(
        RoundResult(round=r, records=(), duration=1.0, summary={}, max_loop_lag_ms=0.0, telemetry=t)
        for r, t in trial.items())) for i, trial in enumerate(rounds))
    return ItemOutcome(nodeid=f"scenarios/s.yaml::{name}", case=c, result=CaseResult(case=c, trials=trials, server={}),
                       status="baseline-updated")


def _tier(kind: str, reads: int, hits: int, evictions: int, read_ms: float) -> TierFigures:
    return TierFigures(kind=kind, description=kind, capacity_bytes=1 << 22, capacity_blocks=8, reads=reads,
                       writes=reads // 2, read_bytes=reads << 19, write_bytes=(reads // 2) << 19, hits=hits,
                       misses=reads - hits, evictions=evictions, demotions=evictions, promotions=0,
                       read_latency=LatencyFigures(reads, read_ms, read_ms, read_ms * 2, read_ms * 3),
                       write_latency=LatencyFigures(reads // 2, 1.0, 1.0, 2.0, 3.0))


def storage_result(name: str = "tiers[cpu+disk-u2]", complete: tuple[bool, ...] = (True, True)) -> StorageResult:
    """A cpu+disk hierarchy of two trials: 40 and 60 reads of 512 KiB blocks from cpu."""
    trials = tuple(StorageTrial(
        trial=i, requests_expected=10, requests_completed=10 if done else 9, failures=() if done else ("lost",),
        tokens=1000.0, storage_io_s=0.5, storage_throughput_tokens_per_sec=2000.0, bandwidth_bytes_per_sec=1e8,
        elapsed_s=1.0, wall_clock_throughput_tokens_per_sec=1000.0, read_bytes=1 << 24, write_bytes=1 << 23,
        read_write_ratio=2.0, tier_read_bytes=1 << 24, tier_write_bytes=1 << 23,
        tiers=(_tier("cpu", 40 + 20 * i, 30 + 10 * i, 4, 0.5), _tier("disk", 10, 8, 0, 2.0)), operations={})
        for i, done in enumerate(complete))
    return StorageResult(name=name, config={"tiers": [{"kind": "cpu"}, {"kind": "disk"}],
                                            "trace": {"block_tokens": 4}}, trials=trials, summary=summarize(trials))
