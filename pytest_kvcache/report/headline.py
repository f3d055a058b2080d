"""What the regression gate's headline says, shared by ``report.html`` and ``summary.md``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

__all__ = ["GateState", "gate_state"]


class GateState(enum.Enum):
    """The gate's outcome as a run folder's ``run.json`` tells it, worst first."""

    INTERRUPTED = "interrupted"  # the run was cut short: not every item was judged
    FAILED = "failed"
    PASSED = "passed"  # at least one comparison judged, none failing
    NOT_COMPARED = "not-compared"  # items had baselines, none could be judged
    NO_COMPARISON = "no-comparison"  # nothing had a baseline


def gate_state(session: Mapping[str, Any]) -> GateState:
    """The state of the gate of a session's document (its ``gate`` may be absent)."""
    gate = session.get("gate") or {}
    if session.get("interrupted"):
        return GateState.INTERRUPTED
    if gate.get("failed"):
        return GateState.FAILED
    if gate.get("judged"):
        return GateState.PASSED
    if gate.get("not_compared"):
        return GateState.NOT_COMPARED
    return GateState.NO_COMPARISON
