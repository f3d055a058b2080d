"""Replays a KV access trace against a tier hierarchy: users, trials, figures.

Each trial opens fresh tiers, replays every request (one user per conversation group,
``users`` threads; a user sends its conversation's turns in order, ``think_time_s``
apart, which lengthens the wall clock and not the storage I/O time), checks that every
block read back equals what was written, and turns the hierarchy's counters into a
:class:`~.results.TrialResult`. A read that misses every tier is recomputed: the block
is written again, as a server would after a prefill. A request not started before
``trial_timeout_s`` or one that failed leaves the trial incomplete (docs/measuring.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random as _random
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hierarchy import Hierarchy, TierCounters
from .results import StorageResult, TierFigures, TrialResult, latency_figures, summarize
from .tiers import TierSpec, open_tier
from .trace import KVRequest, TraceSpec, build_trace

__all__ = ["MISTRAL_7B_TOKEN_BYTES", "StorageConfig", "config_record", "run_storage", "run_trial"]

#: Mistral-7B: 32 layers x 8 KV heads x 128 head_dim x 2 (K, V) x 2 bytes (fp16)
MISTRAL_7B_TOKEN_BYTES = 131_072
#: how tier operations are timed (storage.hierarchy), recorded with every result
CLOCKS = "RAM tiers: thread CPU time; other tiers: wall clock"


@dataclass(frozen=True)
class StorageConfig:
    """One storage item: the hierarchy (tiers in order), the trace and how it is replayed."""

    name: str
    tiers: tuple[TierSpec, ...]
    trace: TraceSpec = TraceSpec()
    token_bytes: int = MISTRAL_7B_TOKEN_BYTES
    users: int = 4
    trials: int = 3
    promote: str = "none"
    trial_timeout_s: float = 60.0
    think_time_s: float = 0.0
    scratch_dir: str | None = None
    gds_path: str | None = None
    seed: int = 0

    @property
    def block_bytes(self) -> int:
        return self.trace.block_tokens * self.token_bytes


@dataclass
class _UserLog:
    completed: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    failures: list[str] = field(default_factory=list)
    operations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class _Blocks:
    """Each key's bytes: a 16-byte digest of the key over a per-trial random body, so
    that reading back another block's bytes is caught."""

    def __init__(self, block_bytes: int, seed: int) -> None:
        self.body = _random.Random(seed).randbytes(block_bytes)

    def of(self, key: str) -> bytes:
        return hashlib.blake2b(key.encode(), digest_size=16).digest() + self.body[16:]


def _access(hierarchy: Hierarchy, blocks: _Blocks, operation: str, key: str) -> tuple[int, int]:
    """Bytes (read, written) for the user: a read that misses is recomputed and written."""
    expected = blocks.of(key)
    if operation.endswith("_write"):
        hierarchy.write(key, expected)
        return 0, len(expected)
    data = hierarchy.read(key)
    if data is None:
        hierarchy.write(key, expected)
        return 0, len(expected)
    if data != expected:
        raise AssertionError(f"block {key} read back differs from what was written")
    return len(data), 0


def _replay_user(hierarchy: Hierarchy, blocks: _Blocks, requests: list[KVRequest], deadline: float,
                 think_time_s: float) -> _UserLog:
    log = _UserLog()
    previous = None
    for request in requests:
        if request.conversation == previous and think_time_s:
            time.sleep(think_time_s)  # the user reads the answer before the next turn
        previous = request.conversation
        if time.perf_counter() > deadline:
            log.failures.append("trial timeout before the request started")
            break
        try:
            for operation, key in request.accesses:
                start = time.perf_counter()
                read, written = _access(hierarchy, blocks, operation, key)
                log.operations[operation].append(time.perf_counter() - start)
                log.read_bytes += read
                log.write_bytes += written
        except (OSError, KeyError, AssertionError, RuntimeError) as exc:
            log.failures.append(f"conversation {request.conversation}: {exc}")
            continue
        log.completed += 1
    return log


def _tier_figures(hierarchy: Hierarchy) -> tuple[TierFigures, ...]:
    out = []
    for tier, c in zip(hierarchy.tiers, hierarchy.counters):
        out.append(TierFigures(
            kind=tier.kind, description=tier.description, capacity_bytes=tier.spec.capacity_bytes,
            capacity_blocks=tier.slots, reads=c.reads, writes=c.writes, read_bytes=c.read_bytes,
            write_bytes=c.write_bytes, hits=c.hits, misses=c.misses, evictions=c.evictions, demotions=c.demotions,
            promotions=c.promotions, read_latency=latency_figures(c.read_latencies),
            write_latency=latency_figures(c.write_latencies)))
    return tuple(out)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _trial_result(trial: int, config: StorageConfig, hierarchy: Hierarchy, logs: list[_UserLog],
                  expected: int, elapsed: float) -> TrialResult:
    counters: list[TierCounters] = hierarchy.counters
    tier_bytes = sum(c.read_bytes + c.write_bytes for c in counters)
    io_s = sum(sum(c.read_latencies) + sum(c.write_latencies) for c in counters)
    read_bytes = sum(log.read_bytes for log in logs)
    write_bytes = sum(log.write_bytes for log in logs)
    tokens = (read_bytes + write_bytes) / config.token_bytes
    operations: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        for name, values in log.operations.items():
            operations[name].extend(values)
    return TrialResult(
        trial=trial, requests_expected=expected, requests_completed=sum(log.completed for log in logs),
        failures=tuple(f for log in logs for f in log.failures), tokens=tokens, storage_io_s=io_s,
        storage_throughput_tokens_per_sec=_ratio(tokens, io_s),
        bandwidth_bytes_per_sec=_ratio(tier_bytes, io_s), elapsed_s=elapsed,
        wall_clock_throughput_tokens_per_sec=_ratio(tokens, elapsed), read_bytes=read_bytes,
        write_bytes=write_bytes, read_write_ratio=_ratio(read_bytes, write_bytes),
        tier_read_bytes=sum(c.read_bytes for c in counters), tier_write_bytes=sum(c.write_bytes for c in counters),
        tiers=_tier_figures(hierarchy),
        operations={name: latency_figures(values) for name, values in sorted(operations.items())})


def run_trial(config: StorageConfig, requests: list[KVRequest], trial: int, folder: Path) -> TrialResult:
    """One trial on fresh tiers; the tiers are closed (files removed, keys deleted) after."""
    tiers = []
    try:
        for spec in config.tiers:
            tiers.append(open_tier(spec, config.block_bytes, folder, config.gds_path))
        hierarchy = Hierarchy(tiers, config.promote)
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    users = max(1, min(config.users, len({r.conversation for r in requests}) or 1))
    per_user: list[list[KVRequest]] = [[] for _ in range(users)]
    for request in requests:
        per_user[request.conversation % users].append(request)
    blocks = _Blocks(config.block_bytes, config.seed * 1000 + trial)
    try:
        start = time.perf_counter()
        deadline = start + config.trial_timeout_s
        with ThreadPoolExecutor(users, thread_name_prefix="kv-storage-user") as pool:
            logs = list(pool.map(lambda reqs: _replay_user(hierarchy, blocks, reqs, deadline, config.think_time_s),
                                 per_user))
        elapsed = time.perf_counter() - start
        return _trial_result(trial, config, hierarchy, logs, len(requests), elapsed)
    finally:
        hierarchy.close()


def run_storage(config: StorageConfig) -> StorageResult:
    """Every trial of one storage item, and their summary."""
    requests = build_trace(config.trace)
    if not requests:
        raise ValueError(f"{config.name}: the trace has no request (raise max_context_tokens or conversations)")
    results = []
    with tempfile.TemporaryDirectory(prefix="kv-storage-", dir=config.scratch_dir) as scratch:
        for trial in range(config.trials):
            results.append(run_trial(config, requests, trial, Path(scratch)))
    return StorageResult(config.name, config_record(config, len(requests)), tuple(results), summarize(results))


def config_record(config: StorageConfig, requests: int) -> dict[str, Any]:
    """The configuration as a result records it (and the testbed hashes it): the trace's
    request count and the block size added, without where a gds tier's file was (its
    description names the file, its file system and how kvikio moved the bytes)."""
    record = dataclasses.asdict(config)
    del record["gds_path"]
    record["block_bytes"] = config.block_bytes
    record["requests"] = requests
    record["clocks"] = CLOCKS  # runs timed otherwise are not comparable with these
    return record


