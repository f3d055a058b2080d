"""Which store a history URL names (no pytest here)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..errors import HistoryError
from ._postgres import PSYCOPG_MISSING, PostgresHistoryStore
from ._store import HistoryStore, redact_url

__all__ = ["URL_FORMS", "check_history_url", "default_history_path", "open_history"]

#: The accepted forms, for messages and help texts.
URL_FORMS = ("a file path, sqlite:///PATH (relative to the rootdir; sqlite:////PATH for an absolute one), "
             "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or postgres://...), or none")


def default_history_path(rootdir: Path) -> Path:
    """Where the history is when no URL is given: ``<rootdir>/.kvcache/history.sqlite``."""
    return Path(rootdir) / ".kvcache" / "history.sqlite"


def _target(url: str, rootdir: Path) -> tuple[str, str | Path] | None:
    """("sqlite", path) or ("postgresql", url); None for none. HistoryError for a bad URL."""
    text = url.strip()
    if text.lower() == "none":
        return None
    if not text:
        raise HistoryError(f"history URL {url!r} is empty: give {URL_FORMS}")
    scheme, sep, rest = text.partition("://")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        scheme = scheme.lower()
        if scheme in ("postgresql", "postgres"):
            return "postgresql", text
        if scheme != "sqlite":
            raise HistoryError(f"history URL {redact_url(text)!r}: unknown scheme {scheme!r}; give {URL_FORMS}")
        if not rest.startswith("/") or not rest[1:]:
            raise HistoryError(f"history URL {text!r}: an SQLite URL is sqlite:///PATH (three slashes, no host; "
                               "four for an absolute path)")
        path = Path(rest[1:])
    else:
        path = Path(text).expanduser()
    return "sqlite", path if path.is_absolute() else Path(rootdir) / path


def check_history_url(url: str) -> None:
    """Raise HistoryError when :func:`open_history` would refuse ``url`` as written, or when
    it names PostgreSQL and psycopg is not installed; opens and connects to nothing."""
    target = _target(url, Path("."))
    if target is not None and target[0] == "postgresql" and importlib.util.find_spec("psycopg") is None:
        raise HistoryError(f"history URL {redact_url(url)} {PSYCOPG_MISSING}")


def open_history(url: str | None, *, rootdir: Path, create: bool = True) -> HistoryStore | None:
    """Open the history store ``url`` names, or None for ``none`` (the history off).

    ``url``: a file path or ``sqlite:///PATH`` (SQLite; a relative path is relative to
    ``rootdir``), ``postgresql://...`` or ``postgres://...`` (PostgreSQL, through psycopg 3),
    ``none``; None means :func:`default_history_path`. With ``create`` false a store that does
    not exist yet is an error instead of being created (for commands that only read).
    Raises HistoryError naming the URL or file and the fix.
    """
    target = ("sqlite", default_history_path(rootdir)) if url is None else _target(url, rootdir)
    if target is None:
        return None
    kind, where = target
    if kind == "postgresql":
        return PostgresHistoryStore(str(where), create=create)
    from ._sqlite import SQLiteHistoryStore

    return SQLiteHistoryStore(Path(where), create=create)
