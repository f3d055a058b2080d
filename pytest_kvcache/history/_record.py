"""What the history keeps of one item's measurement in one session (no pytest here).

An :class:`ItemRun` is written for every item of every session, whether or not the
baselines were updated (pytest-benchmark's autosave is the convention): the series on
which change points are found. ``attempt`` 0 is the item's run; 1, 2, ... are the
confirmation runs the gate asked for in the same session (see docs/statistics.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..decision import Zone
from ..identity import testbed_id

__all__ = ["HISTORY_FILE_SCHEMA_VERSION", "ItemRun", "testbed_id"]

#: Version of the ``history.json`` file a run folder carries (see ``history import``).
HISTORY_FILE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ItemRun:
    """One measurement of one item in one session."""

    session_id: str  # one per pytest session, shared by its items (and xdist workers)
    time: str  # ISO 8601, UTC, when the session started
    item: str  # the baseline key, e.g. "seed_prefill/prefill[cpu-10k-c16]"
    attempt: int  # 0: the item's run; 1, 2, ...: confirmation runs of the same session
    testbed: Mapping[str, str]  # what must match for two runs to be compared
    software: Mapping[str, str]  # the software under test (provenance, compared across)
    commit: str | None  # the deployment's or the test repository's commit, when known
    baseline_updated: bool  # this run was stored as (part of) the item's baseline
    status: str  # compared | baseline-updated | skipped | failed | measured
    zone: Zone | None  # the item's worst verdict zone; None when not compared
    #: the metrics the item is judged on, with the direction that is better ("lower"/"higher")
    metrics: tuple[tuple[str, str], ...]
    #: per trial: {"index": int, "usable": bool, "summary": {metric: value or None}}
    trials: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    @property
    def testbed_id(self) -> str:
        return testbed_id(self.testbed)

    def usable_values(self, metric: str) -> list[float]:
        """The metric's values over the usable trials (missing and non-positive dropped)."""
        values = []
        for trial in self.trials:
            value = trial.get("summary", {}).get(metric) if trial.get("usable") else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                values.append(float(value))
        return values

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "time": self.time, "item": self.item, "attempt": self.attempt,
            "testbed": dict(self.testbed), "software": dict(self.software), "commit": self.commit,
            "baseline_updated": self.baseline_updated, "status": self.status,
            "zone": self.zone.value if self.zone else None,
            "metrics": [list(m) for m in self.metrics],
            "trials": [dict(t) for t in self.trials],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemRun:
        """Inverse of :meth:`to_dict`; raises ValueError naming the first bad field."""
        def need(name: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
                raise ValueError(f"field {name!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
            return value

        def strings(name: str) -> dict[str, str]:
            value = need(name, dict)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise ValueError(f"field {name!r} must map strings to strings")
            return dict(value)

        commit = data.get("commit")
        if commit is not None and not isinstance(commit, str):
            raise ValueError(f"field 'commit' is {commit!r}, expected a string or null")
        zone = data.get("zone")
        if zone is not None and (not isinstance(zone, str) or Zone.named(zone) is None):
            raise ValueError(f"field 'zone' is {zone!r}, expected one of {', '.join(z.value for z in Zone)} or null")
        metrics = need("metrics", list)
        if not all(isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m)
                   for m in metrics):
            raise ValueError("field 'metrics' must be a list of [metric, direction] pairs")
        trials = need("trials", list)
        if not all(isinstance(t, dict) for t in trials):
            raise ValueError("field 'trials' must be a list of objects")
        return cls(session_id=need("session_id", str), time=need("time", str), item=need("item", str),
                   attempt=need("attempt", int), testbed=strings("testbed"), software=strings("software"),
                   commit=commit, baseline_updated=bool(need("baseline_updated", bool)),
                   status=need("status", str), zone=Zone(zone) if zone else None,
                   metrics=tuple((m[0], m[1]) for m in metrics), trials=tuple(trials))

