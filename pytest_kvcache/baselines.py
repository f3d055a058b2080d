"""Stored baselines: one JSON file per scenario item, keyed by a fingerprint.

Layout: the caller's item key (for example ``seed-prefill/prefill[cpu-10k-c16]``) maps
to ``<root>/seed-prefill/prefill[cpu-10k-c16].json`` (:meth:`BaselineStore.path_for`).
``/`` separates directories; letters, digits and ``-_.[],=+@`` are kept as they are;
any other character (space, ``\\ : * ? " < > |``, control characters, non-ASCII) is
replaced by ``_``, a segment that is empty or starts with ``.`` gets a ``_`` prefix,
and an over-long segment is cut. Whenever anything was replaced or cut, ``~`` and the
first 10 hex digits of the key's SHA-256 are appended to the file name, so two keys
never share a file. The file also stores the key, and :meth:`BaselineStore.load`
refuses a file whose stored key differs from the one asked for.

File shape (``schema_version`` 1)::

    {"schema_version": 1, "key": "...", "fingerprint": {"gpu": "...", ...},
     "history": [run, run, ...]}

``fingerprint`` is a flat str -> str dict built by the caller (GPU model and count,
driver, vLLM/LMCache versions, model, server-config hash, workload hash...). Each run is
an opaque JSON-able dict from the caller, stored as given (key order kept), oldest
first.

Writes (:meth:`BaselineStore.append`) hold an exclusive ``fcntl.flock`` on a sibling
lock file ``.<file name>.lock`` for the whole read-modify-write, so pytest-xdist workers
(separate processes) appending to the same key serialize, and write atomically: a temp
file in the same directory, flushed and fsynced, then ``os.replace``. A corrupt file is
never repaired or overwritten: it raises :class:`BaselineCorruptError` and stays
byte-for-byte as it was. The lock files stay behind (empty); ignore them in git
(``baselines/**/.*.lock``).

This module does not import pytest. POSIX only (fcntl).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import write_text_atomic
from .errors import BaselineCorruptError, FingerprintMismatchError

__all__ = [
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineStore",
    "fingerprint_diff",
    "key_to_relpath",
]

SCHEMA_VERSION: int = 1
_FIELDS = ("schema_version", "key", "fingerprint", "history")
_UNSAFE = re.compile(r"[^A-Za-z0-9\-_.\[\],=+@]")
_MAX_SEGMENT = 150


@dataclass(frozen=True)
class Baseline:
    """A stored baseline: its key, file, fingerprint and run history (oldest first)."""

    key: str
    path: Path
    fingerprint: dict[str, str]
    history: tuple[dict[str, Any], ...]
    schema_version: int = SCHEMA_VERSION

    @property
    def latest(self) -> dict[str, Any] | None:
        """The most recent run, or None for an empty history."""
        return self.history[-1] if self.history else None


def key_to_relpath(key: str) -> Path:
    """The relative file path for an item key (see the module docstring)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"baseline key must be a non-empty string, got {key!r}")
    changed = False
    segments: list[str] = []
    for seg in key.split("/"):
        safe = _UNSAFE.sub("_", seg)
        if not safe or safe.startswith("."):
            safe = "_" + safe
        if len(safe) > _MAX_SEGMENT:
            safe = safe[:_MAX_SEGMENT]
        changed = changed or safe != seg
        segments.append(safe)
    name = segments[-1]
    if changed:
        name += "~" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    segments[-1] = name + ".json"
    return Path(*segments)


def fingerprint_diff(stored: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """One line per differing key: ``"vllm_version: stored 0.10.1, now 0.11.0"``.

    Keys present on one side only are included, with ``(absent)`` for the missing
    value. Order: the stored fingerprint's keys, then keys new in ``current``.
    """
    lines: list[str] = []
    keys = list(stored) + [k for k in current if k not in stored]
    for k in keys:
        a = stored.get(k)
        b = current.get(k)
        if a != b or (k in stored) != (k in current):
            sa = "(absent)" if k not in stored else str(a)
            sb = "(absent)" if k not in current else str(b)
            lines.append(f"{k}: stored {sa}, now {sb}")
    return lines


def _check_fingerprint(fingerprint: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint must be a dict of str -> str, got {type(fingerprint).__name__}")
    out: dict[str, str] = {}
    for k, v in fingerprint.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"fingerprint must map str -> str, got {k!r}: {v!r}")
        out[k] = v
    return out


def _validate(path: Path, key: str, data: Any) -> Baseline:
    """Check a parsed file; raise BaselineCorruptError saying what is wrong."""

    def bad(problem: str) -> BaselineCorruptError:
        return BaselineCorruptError(path, problem)

    if not isinstance(data, dict):
        raise bad(f"top level is {type(data).__name__}, expected an object")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise bad("missing field(s) " + ", ".join(repr(f) for f in missing))
    extra = [f for f in data if f not in _FIELDS]
    if extra:
        raise bad("unexpected field(s) " + ", ".join(repr(f) for f in extra))
    version = data["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad(f"schema_version is {version!r}, expected the integer {SCHEMA_VERSION}")
    if version != SCHEMA_VERSION:
        raise bad(f"schema_version {version} is not supported (expected {SCHEMA_VERSION})")
    if not isinstance(data["key"], str):
        raise bad(f"'key' is {type(data['key']).__name__}, expected a string")
    if data["key"] != key:
        raise bad(f"it holds key {data['key']!r}, expected {key!r}")
    fp = data["fingerprint"]
    if not isinstance(fp, dict):
        raise bad(f"'fingerprint' is {type(fp).__name__}, expected an object")
    for k, v in fp.items():
        if not isinstance(v, str):
            raise bad(f"fingerprint[{k!r}] is {type(v).__name__}, expected a string")
    history = data["history"]
    if not isinstance(history, list):
        raise bad(f"'history' is {type(history).__name__}, expected a list")
    for i, run in enumerate(history):
        if not isinstance(run, dict):
            raise bad(f"history[{i}] is {type(run).__name__}, expected an object")
    return Baseline(
        key=key,
        path=path,
        fingerprint=dict(fp),
        history=tuple(history),
        schema_version=version,
    )


def _read(path: Path, key: str) -> Baseline | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BaselineCorruptError(path, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BaselineCorruptError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineCorruptError(
            path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    return _validate(path, key, data)


def _dumps(key: str, fingerprint: dict[str, str], history: list[dict[str, Any]]) -> str:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "fingerprint": fingerprint,
        "history": history,
    }
    return json.dumps(doc, indent=1, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n"


class BaselineStore:
    """Baseline files under ``root`` (the repository's ``baselines/`` directory)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BaselineStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``'s baseline (it may not exist)."""
        return self.root / key_to_relpath(key)

    def lock_path_for(self, key: str) -> Path:
        """The sibling lock file used by :meth:`append`: ``.<file name>.lock``."""
        p = self.path_for(key)
        return p.with_name(f".{p.name}.lock")

    def load(self, key: str) -> Baseline | None:
        """The stored baseline, or None when there is no file.

        Raises BaselineCorruptError for unreadable JSON, a wrong schema_version,
        missing, unexpected or mistyped fields, or a file holding another key.
        Reads without the lock: writers replace the file atomically, so a reader sees
        either the old or the new file, never a partial one.
        """
        return _read(self.path_for(key), key)

    def append(
        self,
        key: str,
        fingerprint: Mapping[str, str],
        run: Mapping[str, Any],
        *,
        max_history: int = 20,
        reset: bool = False,
    ) -> Baseline:
        """Add ``run`` to ``key``'s history and return the baseline as written.

        Under an exclusive lock: read the current file (a corrupt one raises
        BaselineCorruptError and is left untouched); with a different fingerprint
        raise FingerprintMismatchError unless ``reset``; with ``reset`` the history
        becomes ``[run]`` (and the fingerprint the new one); else the run is appended
        and only the last ``max_history`` runs kept. The file is written atomically.
        """
        import fcntl

        fp = _check_fingerprint(fingerprint)
        if not isinstance(run, Mapping):
            raise TypeError(f"run must be a dict, got {type(run).__name__}")
        run_d = dict(run)
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history must be an integer >= 1, got {max_history!r}")
        try:  # fail before taking the lock if the run cannot be stored
            json.dumps(run_d, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"baseline {key!r}: run is not JSON-serializable: {exc}") from exc

        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path_for(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            existing = _read(path, key)
            if existing is None or reset:
                history = [run_d]
            else:
                if existing.fingerprint != fp:
                    raise FingerprintMismatchError(
                        key, path, fingerprint_diff(existing.fingerprint, fp)
                    )
                history = list(existing.history) + [run_d]
                history = history[-max_history:]
            write_text_atomic(path, _dumps(key, fp, history))
        finally:
            os.close(lock_fd)  # closing releases the flock
        return Baseline(
            key=key,
            path=path,
            fingerprint=fp,
            history=tuple(history),
            schema_version=SCHEMA_VERSION,
        )
