"""The figures of a storage run, with the seed's names (seed 002, MLPerf Storage kv-cache.py).

``storage_throughput_tokens_per_sec`` = tokens the users read and wrote / total storage
I/O time (the sum of every tier read and write, demotions and promotions included);
wall-clock throughput divides by the trial's elapsed time instead and is reported beside
it, never instead. ``read_bytes``/``write_bytes`` are the users' volumes, the same for
every hierarchy on one trace; ``tier_read_bytes``/``tier_write_bytes`` add what the
tiers moved among themselves, and ``bandwidth_bytes_per_sec`` is those over the I/O time. A trial that did not complete
every request is marked incomplete, named in ``excluded`` and left out of the summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SCHEMA_VERSION", "LatencyFigures", "StorageResult", "StorageSummary", "TierFigures", "TrialResult",
           "latency_figures", "summarize", "tier_names"]

SCHEMA_VERSION = 1


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class LatencyFigures:
    count: int
    mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def latency_figures(seconds: Sequence[float]) -> LatencyFigures:
    if not seconds:
        return LatencyFigures(0, None, None, None, None)
    ordered = sorted(s * 1000 for s in seconds)
    return LatencyFigures(len(ordered), statistics.fmean(ordered), _percentile(ordered, 50),
                          _percentile(ordered, 95), _percentile(ordered, 99))


@dataclass(frozen=True)
class TierFigures:
    kind: str
    description: str
    capacity_bytes: int
    capacity_blocks: int
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int
    hits: int
    misses: int
    evictions: int
    demotions: int
    promotions: int
    read_latency: LatencyFigures
    write_latency: LatencyFigures


@dataclass(frozen=True)
class TrialResult:
    trial: int
    requests_expected: int
    requests_completed: int
    failures: tuple[str, ...]
    tokens: float
    storage_io_s: float
    storage_throughput_tokens_per_sec: float | None
    bandwidth_bytes_per_sec: float | None
    elapsed_s: float
    wall_clock_throughput_tokens_per_sec: float | None
    read_bytes: int
    write_bytes: int
    read_write_ratio: float | None
    tier_read_bytes: int
    tier_write_bytes: int
    tiers: tuple[TierFigures, ...]
    operations: dict[str, LatencyFigures]

    @property
    def complete(self) -> bool:
        return self.requests_completed == self.requests_expected

    @property
    def shortfall(self) -> str:
        """What an incomplete trial lacks: the requests it completed, and the first failure."""
        why = f" ({self.failures[0]})" if self.failures else ""
        return f"completed {self.requests_completed} of {self.requests_expected} requests{why}"

    @property
    def incomplete_reason(self) -> str:
        return f"trial {self.trial + 1}: {self.shortfall}"  # counted from 1, as every item's trials are named


@dataclass(frozen=True)
class StorageSummary:
    """Means over the complete trials (None where no trial completed)."""

    trials_used: int
    excluded: tuple[str, ...]
    storage_throughput_tokens_per_sec: float | None
    storage_throughput_std: float | None
    bandwidth_bytes_per_sec: float | None
    wall_clock_throughput_tokens_per_sec: float | None
    read_bytes: float | None
    write_bytes: float | None
    read_write_ratio: float | None
    tier_read_p95_ms: dict[str, float | None]
    tier_write_p95_ms: dict[str, float | None]
    tier_evictions: dict[str, float | None]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def tier_names(trial: TrialResult) -> list[str]:
    """Tier labels unique within a hierarchy: ``cpu``, or ``cpu.1`` for a second cpu tier."""
    names: list[str] = []
    for tier in trial.tiers:
        names.append(tier.kind if tier.kind not in names else f"{tier.kind}.{len(names)}")
    return names


def summarize(trials: Sequence[TrialResult]) -> StorageSummary:
    used = [t for t in trials if t.complete]
    excluded = tuple(t.incomplete_reason for t in trials if not t.complete)
    throughputs = [t.storage_throughput_tokens_per_sec for t in used if t.storage_throughput_tokens_per_sec]
    names = tier_names(trials[0]) if trials else []
    per_tier = {name: [t.tiers[i] for t in used] for i, name in enumerate(names)}
    return StorageSummary(
        trials_used=len(used), excluded=excluded,
        storage_throughput_tokens_per_sec=_mean(throughputs),
        storage_throughput_std=statistics.stdev(throughputs) if len(throughputs) > 1 else None,
        bandwidth_bytes_per_sec=_mean([t.bandwidth_bytes_per_sec for t in used]),
        wall_clock_throughput_tokens_per_sec=_mean([t.wall_clock_throughput_tokens_per_sec for t in used]),
        read_bytes=_mean([t.read_bytes for t in used]), write_bytes=_mean([t.write_bytes for t in used]),
        read_write_ratio=_mean([t.read_write_ratio for t in used]),
        tier_read_p95_ms={n: _mean([f.read_latency.p95_ms for f in fs]) for n, fs in per_tier.items()},
        tier_write_p95_ms={n: _mean([f.write_latency.p95_ms for f in fs]) for n, fs in per_tier.items()},
        tier_evictions={n: _mean([f.evictions for f in fs]) for n, fs in per_tier.items()},
    )


@dataclass(frozen=True)
class StorageResult:
    """One storage item: its configuration, every trial and the summary of the complete ones."""

    name: str
    config: dict[str, Any]
    trials: tuple[TrialResult, ...]
    summary: StorageSummary

    def to_dict(self) -> dict[str, Any]:
        trials = [{**dataclasses.asdict(t), "complete": t.complete} for t in self.trials]
        return {"schema_version": SCHEMA_VERSION, "name": self.name, "config": self.config,
                "trials": trials, "summary": dataclasses.asdict(self.summary)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
