"""The emulator's request faults (``--error-rate``, ``--crash-after``, ``--stall-ms``/``--stall-every``),
seeded by ``--seed``; the offload faults are the tier's (``corrupt_rate``, ``offload_disabled``)."""

from __future__ import annotations

import logging
import os
import random
import sys

from .metrics import Stats
from .settings import Settings

__all__ = ["Faults"]

log = logging.getLogger("pytest_kvcache.emulator")


class Faults:
    """What the fault knobs do to request ``seq`` (counted from 1 as requests arrive)."""

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.s = settings
        self.stats = stats
        self._rng = random.Random(settings.seed ^ 0x5EED)

    def fails(self, seq: int) -> bool:
        """Whether request ``seq`` is answered 500; past ``crash_after`` the process exits (status 3)."""
        s = self.s
        if s.crash_after and seq > s.crash_after:
            log.error("fault injection: crashing after %d requests", s.crash_after)
            sys.stderr.flush()
            os._exit(3)
        if s.error_rate and self._rng.random() < s.error_rate:
            self.stats.failed += 1
            return True
        return False

    def stall_s(self, seq: int) -> float:
        """How late (seconds) request ``seq``'s first token comes."""
        s = self.s
        if s.stall_every and s.stall_ms and seq % s.stall_every == 0:
            return s.slowdown * s.stall_ms / 1000.0
        return 0.0
