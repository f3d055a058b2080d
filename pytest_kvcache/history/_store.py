"""The history store's shared part: the schema, reading runs back, and series (no pytest here).

One table holds one row per item run, keyed on (session_id, item, attempt); the testbed,
software, metrics and trials are JSON text, so the same schema serves SQLite and
PostgreSQL. The backends (``_sqlite.py``, ``_postgres.py``) bring the connection, the
transaction with its retries, and the dialect's pattern matching.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..decision import Zone
from ..errors import HistoryError
from ._record import ItemRun

__all__ = [
    "INSERT_SQL",
    "META_TABLE",
    "RUNS_TABLE",
    "SCHEMA_SQL",
    "SCHEMA_VERSION",
    "HistoryStore",
    "Series",
    "SeriesPoint",
    "build_series",
    "check_schema_version",
    "json_safe",
    "json_text",
    "parse_time",
    "redact_url",
]

#: Version of the tables below; a store records it in its meta table.
SCHEMA_VERSION = 1
# Prefixed names: a team's PostgreSQL database may hold other applications' tables.
META_TABLE = "kvcache_history_meta"
RUNS_TABLE = "kvcache_item_runs"

#: The schema, valid in SQLite and PostgreSQL alike. ``utc_time`` is ``time`` in one fixed
#: format, so that ordering and ``since`` compare text.
SCHEMA_SQL = (
    f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (
        session_id TEXT NOT NULL,
        item TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        time TEXT NOT NULL,
        utc_time TEXT NOT NULL,
        testbed_id TEXT NOT NULL,
        testbed TEXT NOT NULL,
        software TEXT NOT NULL,
        git_commit TEXT,
        baseline_updated INTEGER NOT NULL,
        status TEXT NOT NULL,
        zone TEXT,
        metrics TEXT NOT NULL,
        trials TEXT NOT NULL,
        PRIMARY KEY (session_id, item, attempt))""",
    f"CREATE INDEX IF NOT EXISTS {RUNS_TABLE}_item_time ON {RUNS_TABLE} (item, utc_time)",
    f"CREATE INDEX IF NOT EXISTS {RUNS_TABLE}_time ON {RUNS_TABLE} (utc_time)",
    f"CREATE INDEX IF NOT EXISTS {RUNS_TABLE}_testbed_time ON {RUNS_TABLE} (testbed_id, utc_time)",
)

_COLUMNS = ("session_id", "item", "attempt", "time", "utc_time", "testbed_id", "testbed", "software", "git_commit",
            "baseline_updated", "status", "zone", "metrics", "trials")
#: The row insert, idempotent on the key; ``?`` placeholders (the PostgreSQL backend swaps them).
INSERT_SQL = (f"INSERT INTO {RUNS_TABLE} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
              "ON CONFLICT (session_id, item, attempt) DO NOTHING")
_SELECT = ("SELECT session_id, item, attempt, time, testbed, software, git_commit, baseline_updated, status, zone, "
           f"metrics, trials FROM {RUNS_TABLE}")


def parse_time(text: str) -> datetime:
    """An ItemRun's ISO 8601 time, as an aware datetime (a time without offset is UTC)."""
    # fromisoformat takes a trailing Z from Python 3.11 only
    moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _utc_key(moment: datetime) -> str:
    """Fixed-width UTC text: sorts as the times do. A naive datetime is local time."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None: they are not JSON, and a missing value is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """Strict, compact JSON, non-finite numbers written as null."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere: the slow walk only then
        return json.dumps(json_safe(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"))


def check_schema_version(value: object, location: str) -> None:
    """Refuse a store whose schema this code does not read. (Version 1 is the first: when the
    schema changes, the migrations from older versions go where older ones are refused now.)"""
    try:
        version = int(str(value))
    except ValueError:
        raise HistoryError(f"{location} is not a pytest-kvcache history database (its schema_version is "
                           f"{value!r}): move it away, or point the history URL at another store") from None
    if version > SCHEMA_VERSION:
        raise HistoryError(f"{location} was written by a newer pytest-kvcache (history schema version {version}, "
                           f"this one reads {SCHEMA_VERSION}): upgrade pytest-kvcache (pip install -U "
                           "pytest-kvcache), or point the history URL at another store")
    if version < SCHEMA_VERSION:
        raise HistoryError(f"{location} has history schema version {version}, older than any this pytest-kvcache "
                           f"can migrate (it reads {SCHEMA_VERSION}): move it away to start a new history")


def _row(run: ItemRun) -> tuple:
    try:
        utc_time = _utc_key(parse_time(run.time))
    except ValueError:
        raise HistoryError(f"item run {run.item!r} of session {run.session_id!r}: time {run.time!r} is not "
                           "ISO 8601 (e.g. 2024-05-01T02:00:00Z)") from None
    if run.attempt < 0:
        raise HistoryError(f"item run {run.item!r} of session {run.session_id!r}: attempt {run.attempt} < 0")
    try:
        nested = (json_text(run.testbed), json_text(run.software), json_text([list(m) for m in run.metrics]),
                  json_text(list(run.trials)))
    except TypeError as exc:
        raise HistoryError(f"item run {run.item!r} of session {run.session_id!r} is not JSON: {exc}") from None
    return (run.session_id, run.item, run.attempt, run.time, utc_time, run.testbed_id, nested[0], nested[1],
            run.commit, int(run.baseline_updated), run.status, run.zone.value if run.zone else None, nested[2],
            nested[3])


def _item_run(row: Sequence[Any]) -> ItemRun:
    (session_id, item, attempt, time, testbed, software, commit, baseline_updated, status, zone, metrics,
     trials) = row
    return ItemRun(session_id=session_id, time=time, item=item, attempt=int(attempt), testbed=json.loads(testbed),
                   software=json.loads(software), commit=commit, baseline_updated=bool(baseline_updated),
                   status=status, zone=Zone(zone) if zone else None,
                   metrics=tuple((m[0], m[1]) for m in json.loads(metrics)), trials=tuple(json.loads(trials)))


@dataclass(frozen=True)
class SeriesPoint:
    """One session's value of a series: the geometric mean of the usable trials of all its attempts."""

    session_id: str
    time: str  # the session's ISO 8601 time, as recorded
    value: float
    trials: int  # how many usable trial values the mean is over
    software: Mapping[str, str]  # of the session's first attempt
    commit: str | None


@dataclass(frozen=True)
class Series:
    """One metric of one item on one testbed, a point per session in time order."""

    item: str
    testbed_id: str
    testbed: Mapping[str, str]  # as the latest run recorded it
    metric: str
    direction: str  # the better direction, "lower" or "higher", as the latest run judged it
    points: tuple[SeriesPoint, ...]

    @property
    def values(self) -> list[float]:
        return [p.value for p in self.points]


def build_series(runs: Sequence[ItemRun], *, metrics: Collection[str] | None = None) -> list[Series]:
    """Series from item runs ordered as :meth:`HistoryStore.runs` returns them, sorted by
    (item, metric, testbed id). Only the metrics an ItemRun lists form series; a session
    without a usable value of the metric has no point."""
    sessions: dict[tuple[str, str, str], dict[str, list[ItemRun]]] = {}
    latest: dict[tuple[str, str, str], tuple[Mapping[str, str], str]] = {}
    for run in runs:
        for metric, direction in run.metrics:
            if metrics is not None and metric not in metrics:
                continue
            key = (run.item, metric, run.testbed_id)
            sessions.setdefault(key, {}).setdefault(run.session_id, []).append(run)  # dicts keep time order
            latest[key] = (run.testbed, direction)
    result = []
    for key in sorted(sessions):
        item, metric, tid = key
        points = []
        for attempts in sessions[key].values():
            values = [v for run in attempts for v in run.usable_values(metric)]
            if values:
                first = min(attempts, key=lambda r: r.attempt)
                points.append(SeriesPoint(session_id=first.session_id, time=first.time,
                                          value=math.exp(math.fsum(math.log(v) for v in values) / len(values)),
                                          trials=len(values), software=dict(first.software), commit=first.commit))
        if points:
            testbed, direction = latest[key]
            result.append(Series(item=item, testbed_id=tid, testbed=dict(testbed), metric=metric,
                                 direction=direction, points=tuple(points)))
    return result


class HistoryStore(ABC):
    """A history of item runs; open one with :func:`open_history`. Use it as a context manager
    or call :meth:`close`. One store object belongs to one thread."""

    #: Where the store is, for messages: a file path, or a URL without its password.
    location: str

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        """Rows of one read (``?`` placeholders); database errors as HistoryError."""

    @abstractmethod
    def _insert(self, rows: list[tuple]) -> int:
        """INSERT_SQL for every row in one transaction (retried as the backend needs); the rows new."""

    @abstractmethod
    def _glob_sql(self, pattern: str) -> tuple[str, str]:
        """A WHERE condition on ``item`` (one placeholder) and its parameter, matching the glob."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection; the store is not usable after."""

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def record(self, runs: Sequence[ItemRun]) -> int:
        """Write a session's item runs in one transaction; a run whose (session_id, item,
        attempt) is already there is left as it is. Returns how many runs were new."""
        rows = sorted((_row(run) for run in runs), key=lambda r: (r[0], r[1], r[2]))  # one lock order for all
        return self._insert(rows) if rows else 0

    def runs(self, *, item_glob: str | None = None, since: datetime | None = None, testbed_id: str | None = None,
             items: Collection[str] | None = None) -> list[ItemRun]:
        """Item runs ordered by time, then session, item and attempt. ``item_glob``: ``*`` any
        text, ``?`` one character, all else literal (``[`` too: item names carry brackets).
        ``since``: runs at or after it (a naive datetime is local time). ``items``: exact names."""
        where, params = [], []
        if item_glob is not None:
            clause, param = self._glob_sql(item_glob)
            where.append(clause)
            params.append(param)
        if since is not None:
            where.append("utc_time >= ?")
            params.append(_utc_key(since))
        if testbed_id is not None:
            where.append("testbed_id = ?")
            params.append(testbed_id)
        if items is not None:
            if not items:
                return []
            names = sorted(set(items))
            where.append(f"item IN ({', '.join('?' for _ in names)})")
            params.extend(names)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + \
            " ORDER BY utc_time, session_id, item, attempt"
        return [_item_run(row) for row in self._query(sql, params)]

    def series(self, *, item_glob: str | None = None, since: datetime | None = None, testbed_id: str | None = None,
               items: Collection[str] | None = None, metrics: Collection[str] | None = None) -> list[Series]:
        """Every (item, metric, testbed) series of the runs :meth:`runs` selects, sorted by item,
        metric and testbed id; ``metrics`` keeps those metrics only."""
        return build_series(self.runs(item_glob=item_glob, since=since, testbed_id=testbed_id, items=items),
                            metrics=metrics)
