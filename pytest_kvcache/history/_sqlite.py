"""The history in one SQLite file: the default, for one machine.

Several processes may write at once (two pytest runs, xdist, a ``history import``): the
file is in WAL mode (readers never wait for a writer), each write takes the write lock up
front (``BEGIN IMMEDIATE``), SQLite's busy timeout waits for a lock held by another
process, and a "database is locked" that still comes through is retried until a deadline.
WAL needs the file on a local filesystem; a team sharing a history uses PostgreSQL.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import HistoryError
from ._store import INSERT_SQL, META_TABLE, RUNS_TABLE, SCHEMA_SQL, SCHEMA_VERSION, HistoryStore, check_schema_version

__all__ = ["SQLiteHistoryStore"]

_T = TypeVar("_T")
#: Seconds SQLite itself waits for another connection's lock before saying "locked".
_BUSY_TIMEOUT_S = 15.0


def _is_locked(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


class SQLiteHistoryStore(HistoryStore):
    """The history in the SQLite file ``path``, created (with its folder) unless ``create`` is
    false; ``timeout``: seconds a read or write retries while other writers hold the lock."""

    def __init__(self, path: Path, *, create: bool = True, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self._timeout = timeout
        if self.path.exists() and not self.path.is_file():
            raise HistoryError(f"history database {self.path} is not a file: give the path of an SQLite file")
        if not self.path.exists():
            if not create:
                raise HistoryError(f"no history database at {self.path}: run pytest sessions with the history on "
                                   "(the default) first, or give the store's path or URL")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HistoryError(f"cannot create the folder of history database {self.path}: {exc.strerror}; "
                                   "give a writable path, or none to turn the history off") from exc
        try:
            self._conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open history database {self.path}: {exc}; check the path and its "
                               "permissions, or give none to turn the history off") from exc
        try:
            self._prepare(create)
        except BaseException:
            self._conn.close()
            raise

    def _error(self, exc: sqlite3.Error, doing: str) -> HistoryError:
        if _is_locked(exc):
            return HistoryError(f"history database {self.path} stayed locked by other writers for "
                                f"{self._timeout:.0f} s while {doing}: retry later (is a process stuck "
                                "holding it?)")
        text = str(exc)
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return HistoryError(f"{self.path} is not a pytest-kvcache history database or is corrupt (SQLite: "
                                f"{text}): move it away (a new history then starts there) or restore it from a "
                                "backup")
        return HistoryError(f"history database {self.path}: SQLite error while {doing}: {text}")

    def _retrying(self, action: Callable[[], _T], doing: str) -> _T:
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        while True:
            try:
                return action()
            except sqlite3.Error as exc:
                if not _is_locked(exc) or time.monotonic() + delay > deadline:
                    raise self._error(exc, doing) from exc
            time.sleep(delay * (0.5 + random.random()))  # jitter: writers that collided drift apart
            delay = min(2 * delay, 0.25)

    def _tables(self) -> set[str]:
        rows = self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name for (name,) in rows if not name.startswith("sqlite_")}

    def _create(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if META_TABLE not in self._tables():  # another process may have created it meanwhile
                for statement in SCHEMA_SQL:
                    conn.execute(statement)
                conn.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES ('schema_version', ?) "
                             "ON CONFLICT (key) DO NOTHING", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _prepare(self, create: bool) -> None:
        tables = self._retrying(self._tables, "reading its tables")
        if META_TABLE not in tables:
            if tables:
                raise HistoryError(f"{self.path} is an SQLite database but not a pytest-kvcache history (its "
                                   f"tables: {', '.join(sorted(tables))}): give another path")
            if not create:
                raise HistoryError(f"{self.path} holds no history yet: run pytest sessions with the history on "
                                   "first, or give the store's path or URL")
        # WAL only once the file is known to be ours (or empty): it changes the file for good
        self._retrying(lambda: self._conn.execute("PRAGMA journal_mode = WAL").fetchone(), "switching to WAL")
        if META_TABLE not in tables:
            self._retrying(self._create, "creating the tables")
        elif RUNS_TABLE not in tables:
            raise HistoryError(f"{self.path} is damaged (table {RUNS_TABLE} is missing): move it away (a new "
                               "history then starts there) or restore it from a backup")
        row = self._retrying(lambda: self._conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = "
                                                        "'schema_version'").fetchone(), "reading its version")
        check_schema_version(row[0] if row else None, str(self.path))

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        return self._retrying(lambda: self._conn.execute(sql, params).fetchall(), "reading")

    def _insert(self, rows: list[tuple]) -> int:
        conn = self._conn

        def write() -> int:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(INSERT_SQL, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return conn.total_changes - before  # rows skipped ON CONFLICT are not changes

        return self._retrying(write, f"recording {len(rows)} item run(s)")

    def _glob_sql(self, pattern: str) -> tuple[str, str]:
        return "item GLOB ?", pattern.replace("[", "[[]")  # "[" literal; GLOB's * and ? are the glob's

    def close(self) -> None:
        self._conn.close()
