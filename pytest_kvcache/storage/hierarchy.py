"""Ordered tiers with LRU waterfall eviction, and the per-tier counters of one trial.

A block is written to the first tier that has room for blocks at all. When a tier is
full its least recently used block moves down one tier (a demotion: read here, written
there, the room made there first); the last tier drops it. A read looks in the tiers
in order; under ``none`` (the default) a block stays in the tier it was found in, its
place in that tier's LRU order refreshed; under ``top`` a block found lower is promoted
to the first tier, which may demote others. With upper tiers smaller than the trace's
reuse distance, ``top`` thrashes: each lower hit costs a promotion and a cascade of
demotions, and RAM over disk can do more disk I/O than the disk alone. Every tier
read and write is timed and counted: the sum of these times is the trial's storage
I/O time (docs/measuring.md). One lock serializes the hierarchy's operations, so a
latency is the tier's own, never a wait for another user. A RAM tier's operation is a
copy, CPU work, and is timed by its thread's CPU time: its wall clock would also count
the turns other users' threads take at the interpreter lock and the scheduler gives
other processes, which on a shared runner moved a RAM hierarchy's storage throughput
by a factor of two from one run to the next. Every other tier waits on a device or a
server and is timed by the wall clock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .tiers import Tier

__all__ = ["PROMOTE_POLICIES", "Hierarchy", "TierCounters"]

PROMOTE_POLICIES = ("top", "none")


@dataclass
class TierCounters:
    """What one tier did in one trial (latencies in seconds, one per block)."""

    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    read_latencies: list[float] = field(default_factory=list)
    write_latencies: list[float] = field(default_factory=list)


class Hierarchy:
    def __init__(self, tiers: list[Tier], promote: str = "none") -> None:
        if not tiers:
            raise ValueError("a hierarchy needs at least one tier")
        if promote not in PROMOTE_POLICIES:
            raise ValueError(f"promote {promote!r}: use one of {', '.join(PROMOTE_POLICIES)}")
        if not any(tier.slots for tier in tiers):
            raise ValueError("no tier has room for one block: raise a capacity or lower the block size")
        self.tiers = tiers
        self.promote = promote
        self.counters = [TierCounters() for _ in tiers]
        self._lru: list[OrderedDict[str, None]] = [OrderedDict() for _ in tiers]
        self._lock = threading.Lock()

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = [TierCounters() for _ in self.tiers]

    def where(self, key: str) -> int | None:
        """The index of the tier holding ``key``, or None."""
        return next((i for i, lru in enumerate(self._lru) if key in lru), None)

    def keys(self, index: int) -> list[str]:
        """Tier ``index``'s keys, least recently used first."""
        return list(self._lru[index])

    def write(self, key: str, data: bytes) -> None:
        with self._lock:
            held = self.where(key)
            if held is not None:
                self._forget(held, key)
            self._place(self._first_with_room(0), key, data)

    def read(self, key: str) -> bytes | None:
        """The block's bytes, or None when no tier holds it (a miss in every tier)."""
        with self._lock:
            for index, lru in enumerate(self._lru):
                if key not in lru:
                    self.counters[index].misses += 1
                    continue
                self.counters[index].hits += 1
                data = self._timed_read(index, key)
                lru.move_to_end(key)
                top = self._first_with_room(0)
                if self.promote == "top" and index > top:
                    self._forget(index, key)
                    self.counters[index].promotions += 1
                    self._place(top, key, data)
                return data
            return None

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def _first_with_room(self, start: int) -> int:
        """The first tier from ``start`` on that can hold a block; len(tiers) if none."""
        return next((i for i in range(start, len(self.tiers)) if self.tiers[i].slots), len(self.tiers))

    def _place(self, index: int, key: str, data: bytes) -> None:
        """Writes the block into tier ``index``, demoting its LRU blocks down first."""
        if index >= len(self.tiers):
            return  # fell off the last tier
        lru = self._lru[index]
        while len(lru) >= self.tiers[index].slots:
            victim = next(iter(lru))
            self.counters[index].evictions += 1
            below = self._first_with_room(index + 1)
            if below < len(self.tiers):
                moved = self._timed_read(index, victim)
                self.counters[index].demotions += 1
                self._forget(index, victim)
                self._place(below, victim, moved)
            else:
                self._forget(index, victim)
        self._timed_write(index, key, data)
        lru[key] = None

    def _forget(self, index: int, key: str) -> None:
        del self._lru[index][key]
        self.tiers[index].delete(key)

    def _timed_read(self, index: int, key: str) -> bytes:
        clock = _clock(self.tiers[index])
        start = clock()
        data = self.tiers[index].read(key)
        counters = self.counters[index]
        counters.read_latencies.append(clock() - start)
        counters.reads += 1
        counters.read_bytes += len(data)
        return data

    def _timed_write(self, index: int, key: str, data: bytes) -> None:
        clock = _clock(self.tiers[index])
        start = clock()
        self.tiers[index].write(key, data)
        counters = self.counters[index]
        counters.write_latencies.append(clock() - start)
        counters.writes += 1
        counters.write_bytes += len(data)


def _clock(tier: Tier) -> Callable[[], float]:
    """The clock a tier's operations are timed by (see the module's notes)."""
    return time.thread_time if tier.cpu_bound else time.perf_counter
