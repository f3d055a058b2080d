"""Change points of history series, with what changed around them (no pytest here).

The statistics are :mod:`pytest_kvcache.changepoints`' (imported where used); this module
says which session came first after a change, and what its software and commit were.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._store import HistoryStore, Series

if TYPE_CHECKING:
    from ..changepoints import ChangePoint

__all__ = ["MIN_CHANGE_PCT", "HistoryChange", "recent_change_points"]

#: Changes smaller than this (percent) are not reported: a series that is very steady
#: (an emulator, a fixed-timing server) makes even a 0.2% shift significant, and no one
#: acts on it; ``history --min-change`` sets it per call.
MIN_CHANGE_PCT = 1.0


@dataclass(frozen=True)
class HistoryChange:
    """A change point of one series (item x metric x testbed)."""

    item: str
    metric: str
    testbed_id: str
    direction: str  # the better direction of the metric: "lower" or "higher"
    index: int  # the position in the series of the first point after the change
    run: str  # the session id of the first point after the change
    time: str  # that session's time
    before: float  # the mean of the segment before the change
    after: float  # and after it
    change_pct: float
    p: float
    software_before: Mapping[str, str]  # of the last point before the change
    software_after: Mapping[str, str]  # of the first point after it
    commit_before: str | None
    commit_after: str | None

    @property
    def worse(self) -> bool:
        """The change goes the metric's worse way."""
        return self.after > self.before if self.direction == "lower" else self.after < self.before

    @classmethod
    def of(cls, series: Series, point: ChangePoint) -> HistoryChange:
        last, first = series.points[point.index - 1], series.points[point.index]
        return cls(item=series.item, metric=series.metric, testbed_id=series.testbed_id, direction=series.direction,
                   index=point.index, run=first.session_id, time=first.time, before=point.mean_before,
                   after=point.mean_after, change_pct=point.change_pct, p=point.p,
                   software_before=dict(last.software), software_after=dict(first.software),
                   commit_before=last.commit, commit_after=first.commit)

    def describe(self) -> str:
        """One line: the item, the metric's change, the run it came with, and what changed then."""
        software = [f"{name} {self.software_before.get(name, '-')} -> {self.software_after.get(name, '-')}"
                    for name in sorted({*self.software_before, *self.software_after})
                    if self.software_before.get(name) != self.software_after.get(name)]
        if self.commit_before != self.commit_after:
            software.append(f"commit {(self.commit_before or '-')[:12]} -> {(self.commit_after or '-')[:12]}")
        return (f"{self.item} {self.metric} {self.change_pct:+.1f}% ({'worse' if self.worse else 'better'}) since "
                f"run {self.run} of {self.time}: {self.before:.4g} -> {self.after:.4g}, p={self.p:.2g}; "
                + (", ".join(software) or "same software and commit"))

    def to_dict(self) -> dict[str, Any]:
        """The ``history --json`` element."""
        return {"item": self.item, "metric": self.metric, "testbed_id": self.testbed_id, "run": self.run,
                "time": self.time, "index": self.index, "before": self.before, "after": self.after,
                "change_pct": self.change_pct, "direction": self.direction, "worse": self.worse, "p": self.p,
                "software_before": dict(self.software_before), "software_after": dict(self.software_after),
                "commit_before": self.commit_before, "commit_after": self.commit_after}


def recent_change_points(store: HistoryStore, items: Sequence[str], testbed_ids: Collection[str], *, last: int,
                         max_p: float = 0.001, min_change_pct: float = MIN_CHANGE_PCT) -> list[HistoryChange]:
    """The change points that happened within the last ``last`` sessions of each series of
    these items (exact names) on these testbeds, for a session to report at its end.

    ``detect`` runs on each whole series, so a change point has the same p and means here as
    in the ``history`` command; a change point is kept when its first point after the change
    is one of the series' last ``last`` points (with ``last=1``: the change came with the
    latest session). Sorted by item, metric, testbed id and index.
    """
    from ..changepoints import detect

    if last < 1:
        raise ValueError(f"last={last}: give at least 1 session")
    wanted = set(testbed_ids)
    found = []
    for series in store.series(items=items):
        if series.testbed_id in wanted:
            start = len(series.points) - last
            found += [HistoryChange.of(series, point)
                      for point in detect(series.values, max_p=max_p, min_change_pct=min_change_pct)
                      if point.index >= start]
    return found
