"""The history in a PostgreSQL database, through psycopg 3: for a team or a CI fleet.

Every runner records into the same tables at once: each record is one transaction of
``INSERT ... ON CONFLICT DO NOTHING`` with its rows in key order (so two writers of
overlapping sessions cannot deadlock), retried on a deadlock or serialization failure,
and once on a fresh connection when the connection broke (the insert is idempotent, so a
retry never doubles a row). Creating the tables takes an advisory lock: two first
runners do not race on ``CREATE TABLE``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import HistoryError
from ._store import (
    INSERT_SQL,
    META_TABLE,
    RUNS_TABLE,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    HistoryStore,
    check_schema_version,
    redact_url,
)

__all__ = ["PSYCOPG_MISSING", "PostgresHistoryStore"]

#: What a PostgreSQL URL says without psycopg.
PSYCOPG_MISSING = 'needs psycopg 3: pip install "pytest-kvcache[postgresql]"'

#: pg_advisory_lock key of schema creation (any fixed number: "kvcache" in ASCII)
_SCHEMA_LOCK = 0x6B766361636865
_CONNECT_TIMEOUT_S = 10
_RETRIES = 5


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresHistoryStore(HistoryStore):
    """The history in the PostgreSQL database of ``url`` (``postgresql://USER@HOST:PORT/DB``,
    any libpq URL); its tables are created unless ``create`` is false."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            import psycopg
        except ImportError:
            raise HistoryError(f"history URL {redact_url(url)} {PSYCOPG_MISSING}") from None
        self._psycopg = psycopg
        self._url = url
        self.location = redact_url(url)
        self._conn = self._connect("connecting")
        try:
            self._prepare(create)
        except BaseException:
            self._conn.close()
            raise

    def _error(self, exc: BaseException, doing: str) -> HistoryError:
        if isinstance(exc, self._psycopg.OperationalError):
            return HistoryError(f"PostgreSQL history at {self.location} unreachable while {doing}: "
                                f"{_one_line(exc)}; start the server or fix the URL (or give none to turn the "
                                "history off)")
        return HistoryError(f"PostgreSQL history at {self.location}: error while {doing}: {_one_line(exc)}")

    def _connect(self, doing: str) -> Any:
        psycopg = self._psycopg
        try:
            given = psycopg.conninfo.conninfo_to_dict(self._url)
        except psycopg.ProgrammingError as exc:
            raise HistoryError(f"history URL {self.location} is not a valid PostgreSQL URL ({_one_line(exc)}): "
                               "use postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE") from None
        extra = {k: v for k, v in (("connect_timeout", _CONNECT_TIMEOUT_S), ("application_name", "pytest-kvcache"))
                 if k not in given}
        try:
            # no server-side prepared statements: they fail behind PgBouncer's transaction pooling
            return psycopg.connect(self._url, autocommit=True, prepare_threshold=None, **extra)
        except psycopg.Error as exc:
            raise self._error(exc, doing) from exc

    def _connection(self, doing: str) -> Any:
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect(doing)
        return self._conn

    def _prepare(self, create: bool) -> None:
        def regclass(conn: Any, name: str) -> bool:
            return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

        try:
            conn = self._conn
            if not regclass(conn, META_TABLE):
                if not create:
                    raise HistoryError(f"PostgreSQL database {self.location} holds no pytest-kvcache history: "
                                       "run pytest sessions recording into it first, or check the URL")
                # A session lock, taken before the transaction: a transaction that began before it
                # was granted could still see the catalog without the tables another runner made.
                conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
                try:
                    with conn.transaction():
                        if not regclass(conn, META_TABLE):  # another runner may have created it meanwhile
                            if regclass(conn, RUNS_TABLE):
                                raise HistoryError(f"PostgreSQL database {self.location} has a table {RUNS_TABLE} "
                                                   f"but no {META_TABLE}: it is not pytest-kvcache's; give another "
                                                   "database")
                            for statement in SCHEMA_SQL:
                                conn.execute(statement)
                            conn.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES ('schema_version', %s) "
                                         "ON CONFLICT (key) DO NOTHING", (str(SCHEMA_VERSION),))
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
            row = conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
        except self._psycopg.Error as exc:
            raise self._error(exc, "opening the history") from exc
        check_schema_version(row[0] if row else None, f"PostgreSQL database {self.location}")

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        try:
            return self._connection("reading").execute(sql.replace("?", "%s"), params).fetchall()
        except self._psycopg.Error as exc:
            raise self._error(exc, "reading") from exc

    def _insert(self, rows: list[tuple]) -> int:
        psycopg = self._psycopg
        doing = f"recording {len(rows)} item run(s)"
        conflicts = 0
        reconnected = False
        while True:
            try:
                conn = self._connection(doing)
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(INSERT_SQL.replace("?", "%s"), rows)
                    return cur.rowcount  # psycopg >= 3.1: the sum over the rows; conflicts count 0
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                conflicts += 1
                if conflicts == _RETRIES:
                    raise self._error(exc, doing) from exc
                time.sleep(0.05 * 2 ** conflicts)
            except psycopg.OperationalError as exc:
                if reconnected or not (self._conn.broken or self._conn.closed):
                    raise self._error(exc, doing) from exc
                reconnected = True  # a dropped connection (idle, a restarted server): once more on a new one
            except psycopg.Error as exc:
                raise self._error(exc, doing) from exc

    def _glob_sql(self, pattern: str) -> tuple[str, str]:
        like = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return "item LIKE ? ESCAPE '\\'", like.replace("*", "%").replace("?", "_")

    def close(self) -> None:
        self._conn.close()
