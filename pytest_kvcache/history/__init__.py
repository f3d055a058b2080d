"""The history of every run: one :class:`ItemRun` per item and session, in a store that
many processes may write at once, read back as series on which change points are found.

The store is an SQLite file by default (``<rootdir>/.kvcache/history.sqlite``) or a
PostgreSQL database for a team (:func:`open_history` takes the URL); each run folder also
carries its runs in ``history.json`` (:func:`write_run_file`, :func:`load_run_folder`), so
``python -m pytest_kvcache history import`` can add them later. See docs/history.md.
No pytest here; sqlite3 and psycopg are imported by the store that uses them.
"""

from ._changes import MIN_CHANGE_PCT, HistoryChange, recent_change_points
from ._files import HISTORY_FILE_NAME, load_run_folder, write_run_file
from ._open import URL_FORMS, check_history_url, default_history_path, open_history
from ._record import HISTORY_FILE_SCHEMA_VERSION, ItemRun, testbed_id
from ._store import SCHEMA_VERSION, HistoryStore, Series, SeriesPoint, build_series, parse_time

__all__ = [
    "HISTORY_FILE_NAME",
    "HISTORY_FILE_SCHEMA_VERSION",
    "MIN_CHANGE_PCT",
    "SCHEMA_VERSION",
    "URL_FORMS",
    "HistoryChange",
    "HistoryStore",
    "ItemRun",
    "Series",
    "SeriesPoint",
    "build_series",
    "check_history_url",
    "default_history_path",
    "load_run_folder",
    "open_history",
    "parse_time",
    "recent_change_points",
    "testbed_id",
    "write_run_file",
]
