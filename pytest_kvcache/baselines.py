"""Stored baselines: one JSON file per scenario item, its runs on one testbed.

Layout: the caller's item key (for example ``seed-prefill/prefill[cpu-10k-c16]``) maps
to ``<root>/seed-prefill/prefill[cpu-10k-c16].json`` (:meth:`BaselineStore.path_for`).
``/`` separates directories; letters, digits and ``-_.[],=+@`` are kept as they are;
any other character (space, ``\\ : * ? " < > |``, control characters, non-ASCII) is
replaced by ``_``, a segment that is empty or starts with ``.`` gets a ``_`` prefix,
and an over-long segment is cut. Whenever anything was replaced or cut, ``~`` and the
first 10 hex digits of the key's SHA-256 are appended to the file name, so two keys
never share a file. The file also stores the key, and :meth:`BaselineStore.load`
refuses a file whose stored key differs from the one asked for.

File shape (``schema_version`` 2)::

    {"schema_version": 2, "key": "...", "testbed": {"gpu": "...", ...},
     "runs": [{"run_id": "...", "created": "...", "software": {...}, "commit": "...",
               "trials": [{"index": 0, "summary": {...}, "ttfts_ms": [...]}, ...]}, ...]}

The testbed (identity.py) must match for a run to be compared or appended; each run
keeps its trials grouped (the run is the unit of noise) and the software it measured.
Every trial has a ``summary``; each of its values is null (not measured) or a finite
number >= 0, and above 0 for TTFT and end-to-end latencies, throughputs and the duration
(NaN and Infinity, which Python's json accepts, are refused). A value the loader would
refuse is never written either.
Schema-1 files (one ``fingerprint``, a ``history`` of runs) are read as schema 2 and
written as schema 2 on the next update. In memory a file is a :class:`Baseline` of
:class:`BaselineRun` of :class:`BaselineTrial` (frozen; ``from_json``/``to_json`` at the
file's edge).

Writes (:meth:`BaselineStore.write`) hold an exclusive ``fcntl.flock`` on a sibling lock
file ``.<file name>.lock`` for the whole read-modify-write, so pytest-xdist workers
(separate processes) writing the same key serialize, and write atomically: a temp file
in the same directory, flushed and fsynced, then ``os.replace``. A corrupt file is never
repaired or overwritten: it raises :class:`BaselineCorruptError` and stays byte-for-byte
as it was. The lock files stay behind (empty); ignore them in git (``baselines/**/.*.lock``).

This module does not import pytest. POSIX only (fcntl).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._atomic import write_text_atomic
from .errors import BaselineCorruptError, BaselineSchemaError, TestbedMismatchError
from .identity import diff_testbeds, split_legacy_fingerprint

__all__ = [
    "MAX_RUNS",
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineRun",
    "BaselineTrial",
    "BaselineStore",
    "describe_runs",
    "key_to_relpath",
]

SCHEMA_VERSION: int = 2
#: Runs kept per baseline; the oldest go first.
MAX_RUNS: int = 20
_FIELDS = ("schema_version", "key", "testbed", "runs")
_LEGACY_FIELDS = ("schema_version", "key", "fingerprint", "history")
#: A trial's own fields; any other is kept as it is (BaselineTrial.extra)
_TRIAL_FIELDS = frozenset({"index", "summary", "ttfts_ms"})
_UNSAFE = re.compile(r"[^A-Za-z0-9\-_.\[\],=+@]")
_MAX_SEGMENT = 150
#: Metrics a measured (usable) trial cannot have at 0: TTFT and end-to-end latency
#: statistics, the throughputs and the duration. TPOT, ITL and spreads can be 0 in a real
#: measurement (tokens coalesced in one chunk); such zeros never enter a log-scale comparison.
_POSITIVE = re.compile(r"^((mean|median|p\d+(\.\d+)?)_(ttft|e2el)_ms"
                       r"|(request|output|total_token)_throughput|duration)$")
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: A baseline holds at most MAX_RUNS runs of a few trials; a file this large is not one.
_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class BaselineTrial:
    """One stored trial: its summary (metric -> value; None: not measured) and the TTFT of
    each of its successful requests."""

    summary: Mapping[str, float | None]
    index: int = 0
    ttfts_ms: tuple[float, ...] = ()
    #: the trial's other fields in the file, kept as they are
    extra: Mapping[str, Any] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        """The metric's value when it is a positive number (what a log-scale comparison takes)."""
        value = self.summary.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        return None

    @classmethod
    def from_json(cls, data: Any, *, path: Path, where: str) -> BaselineTrial:
        """A trial of a file; raises BaselineCorruptError naming ``where`` in ``path``."""
        _check_trial(path, where, data)
        return cls(summary=dict(data["summary"]), index=data.get("index", 0),
                   ttfts_ms=tuple(data.get("ttfts_ms", [])),
                   extra={k: v for k, v in data.items() if k not in _TRIAL_FIELDS})

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "summary": dict(self.summary), "ttfts_ms": list(self.ttfts_ms), **self.extra}


@dataclass(frozen=True)
class BaselineRun:
    """One stored run: its trials grouped, the software it measured, when and from where."""

    run_id: str
    created: str
    software: Mapping[str, str] = field(default_factory=dict)
    commit: str | None = None
    trials: tuple[BaselineTrial, ...] = ()

    def values(self, metric: str) -> list[float]:
        """The metric's per-trial values (missing, non-numeric and non-positive dropped)."""
        return [value for value in (trial.value(metric) for trial in self.trials) if value is not None]

    @classmethod
    def from_json(cls, data: Any, *, path: Path, where: str,
                  software: Mapping[str, str] | None = None) -> BaselineRun:
        """A run of a file (``software``: a schema-1 file's, which its runs do not hold);
        raises BaselineCorruptError naming ``where`` in ``path``."""
        if not isinstance(data, dict):
            raise BaselineCorruptError(path, f"{where} is {_kind(data)}, expected an object")
        trials = data.get("trials", [])
        if not isinstance(trials, list):
            raise BaselineCorruptError(path, f"{where}.trials is {_kind(trials)}, expected a list of objects")
        parsed = tuple(BaselineTrial.from_json(trial, path=path, where=f"{where}.trials[{i}]")
                       for i, trial in enumerate(trials))
        created = data.get("created", "")
        run_id = data.get("run_id", created)
        commit = data.get("commit")
        if not isinstance(created, str) or not isinstance(run_id, str) \
                or not (commit is None or isinstance(commit, str)):
            raise BaselineCorruptError(path, f"{where}: run_id, created and commit must be strings")
        soft = software if software is not None else _strings(path, f"{where}.software", data.get("software", {}))
        return cls(run_id=run_id, created=created, software=soft, commit=commit, trials=parsed)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "created": self.created, "software": dict(self.software),
                "commit": self.commit, "trials": [t.to_json() for t in self.trials]}


@dataclass(frozen=True)
class Baseline:
    """A stored baseline: its key, file, testbed and runs (oldest first).

    ``schema_version`` is the version of the file as it was read; :meth:`to_json` always
    writes the current one (a schema-1 file is rewritten as schema 2).
    """

    key: str
    path: Path
    testbed: Mapping[str, str]
    runs: tuple[BaselineRun, ...]
    schema_version: int = SCHEMA_VERSION

    @property
    def latest(self) -> BaselineRun | None:
        return self.runs[-1] if self.runs else None

    def metric_runs(self, metric: str) -> list[list[float]]:
        """Per-trial values of ``metric``, one list per run that has any."""
        return [values for values in (run.values(metric) for run in self.runs) if values]

    @classmethod
    def from_json(cls, data: Any, *, path: Path, key: str) -> Baseline:
        """A parsed file (schema 2, or 1 read as 2) that must hold ``key``; raises
        BaselineCorruptError saying what is wrong (BaselineSchemaError for a newer schema)."""
        version = _check_document(path, key, data)
        if version == SCHEMA_VERSION:
            testbed = _strings(path, "testbed", data["testbed"])
            listed, software = data["runs"], None
            where = "runs"
        else:
            testbed, software = split_legacy_fingerprint(_strings(path, "fingerprint", data["fingerprint"]))
            listed, where = data["history"], "history"
        if not isinstance(listed, list):
            raise BaselineCorruptError(path, f"'{where}' is {type(listed).__name__}, expected a list")
        runs = tuple(BaselineRun.from_json(run, path=path, where=f"{where}[{i}]", software=software)
                     for i, run in enumerate(listed))
        return cls(key=key, path=path, testbed=testbed, runs=runs, schema_version=version)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "key": self.key, "testbed": dict(self.testbed),
                "runs": [run.to_json() for run in self.runs]}


def describe_runs(runs: Sequence[BaselineRun]) -> str:
    """"3 runs from 2026-11-01 to 2026-11-20 (vllm_version 0.11.0)", for messages."""
    if not runs:
        return "no runs"
    days = sorted(r.created[:10] for r in runs)
    when = f"on {days[0]}" if days[0] == days[-1] else f"from {days[0]} to {days[-1]}"
    software: dict[str, list[str]] = {}
    for run in runs:
        for k, v in run.software.items():
            software.setdefault(k, []).append(v)
    named = [f"{k} {'/'.join(dict.fromkeys(vs))}" for k, vs in software.items()
             if k != "plugin_version"]
    return f"{len(runs)} run{'s' if len(runs) != 1 else ''} {when}" + (f" ({', '.join(named)})" if named else "")


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


def _strings(path: Path, name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BaselineCorruptError(path, f"'{name}' is {type(value).__name__}, expected an object")
    for k, v in value.items():
        if not isinstance(v, str):
            raise BaselineCorruptError(path, f"{name}[{k!r}] is {type(v).__name__}, expected a string")
    return dict(value)


def _kind(value: Any) -> str:
    """How a JSON value is named in messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _finite(value: Any) -> float | str:
    """The value as a float, or what is wrong with it (NaN, Infinity, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{_kind(value)} ({json.dumps(value, allow_nan=True)[:40]})"
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return "a number too large to be a measurement"
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return number


def _place(where: str, name: str | int) -> str:
    """``runs[2]``, ``summary.median_ttft_ms``, ``summary['odd name']``: a place in the file."""
    if isinstance(name, int):
        return f"{where}[{name}]"
    if _PLAIN_NAME.match(name):
        return f"{where}.{name}" if where else name
    return f"{where}[{name!r}]"


def _summary(path: Path, where: str, summary: Any) -> None:
    """Every value is null (not measured) or a finite number that is not negative; latencies
    and throughputs the gate compares on a log scale are positive (see :data:`_POSITIVE`)."""
    if not isinstance(summary, dict):
        raise BaselineCorruptError(path, f"{where} is {_kind(summary)}, expected an object of metrics")
    for name, value in summary.items():
        if value is None:
            continue
        place = _place(where, name)
        number = _finite(value)
        if isinstance(number, str):
            raise BaselineCorruptError(path, f"{place} is {number}, expected a finite number (or null)")
        if number < 0 or (number == 0 and _POSITIVE.match(name)):
            raise BaselineCorruptError(path, f"{place} is {value!r}, expected a "
                                       f"{'positive' if _POSITIVE.match(name) else 'non-negative'} number")


def _non_finite(value: Any, place: str) -> str | None:
    """The place of a NaN or Infinity inside ``value``, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return place
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next(filter(None, (_non_finite(v, _place(place, k)) for k, v in items)), None)


def _bad_text(value: Any, place: str) -> str | None:
    """The place of a string that is not Unicode text (a lone surrogate escape such as
    ``"\\ud800"``, which JSON allows and UTF-8 cannot hold), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return place
        return None
    if isinstance(value, dict):
        where = f"a name in {place or 'the top level'}"
        return next(filter(None, (_bad_text(k, where) or _bad_text(v, _place(place, k))
                                  for k, v in value.items())), None)
    if isinstance(value, list):
        return next(filter(None, (_bad_text(v, _place(place, i)) for i, v in enumerate(value))), None)
    return None


def _check_trial(path: Path, where: str, trial: Any) -> None:
    if not isinstance(trial, dict):
        raise BaselineCorruptError(path, f"{where} is {_kind(trial)}, expected an object")
    if "summary" not in trial:
        raise BaselineCorruptError(path, f"{where} has no 'summary'")
    for name in trial.keys() - _TRIAL_FIELDS:  # kept as they are, so they must be JSON
        place = _non_finite(trial[name], _place(where, name))
        if place:
            raise BaselineCorruptError(path, f"{place} is NaN or Infinity, which JSON does not allow")
    _summary(path, f"{where}.summary", trial["summary"])
    index = trial.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise BaselineCorruptError(path, f"{where}.index is {index!r}, expected a whole number >= 0")
    ttfts = trial.get("ttfts_ms", [])
    if not isinstance(ttfts, list):
        raise BaselineCorruptError(path, f"{where}.ttfts_ms is {_kind(ttfts)}, expected a list of milliseconds")
    for j, value in enumerate(ttfts):
        number = _finite(value)
        if isinstance(number, str) or number < 0:
            shown = number if isinstance(number, str) else repr(value)
            raise BaselineCorruptError(path, f"{where}.ttfts_ms[{j}] is {shown}, expected a finite number of "
                                       "milliseconds >= 0")


def _check_document(path: Path, key: str, data: Any) -> int:
    """The schema version of a parsed file, once its top level is sound and holds ``key``."""
    if not isinstance(data, dict):
        raise BaselineCorruptError(path, f"top level is {type(data).__name__}, expected an object")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BaselineCorruptError(path, f"schema_version is {version!r}, expected the integer {SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise BaselineSchemaError(path, version, SCHEMA_VERSION)
    if version not in (1, SCHEMA_VERSION):
        raise BaselineCorruptError(path, f"schema_version {version} is not one pytest-kvcache ever wrote "
                                   f"(this one reads {SCHEMA_VERSION} and 1)")
    expected = _FIELDS if version == SCHEMA_VERSION else _LEGACY_FIELDS
    missing = [f for f in expected if f not in data]
    if missing:
        raise BaselineCorruptError(path, "missing field(s) " + ", ".join(repr(f) for f in missing))
    extra = [f for f in data if f not in expected]
    if extra:
        raise BaselineCorruptError(path, "unexpected field(s) " + ", ".join(repr(f) for f in extra))
    if not isinstance(data["key"], str):
        raise BaselineCorruptError(path, f"'key' is {type(data['key']).__name__}, expected a string")
    if data["key"] != key:
        raise BaselineCorruptError(path, f"it holds key {data['key']!r}, expected {key!r}")
    return version


def _read(path: Path, key: str) -> Baseline | None:
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise BaselineCorruptError(path, f"it is {size / 2**20:.0f} MiB, more than a baseline of {MAX_RUNS} "
                                       f"runs can be (at most {_MAX_BYTES // 2**20} MiB)")
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
        raise BaselineCorruptError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except ValueError as exc:  # an integer of more than 4300 digits
        raise BaselineCorruptError(path, f"not usable JSON ({exc})") from exc
    except RecursionError:
        raise BaselineCorruptError(path, "not usable JSON (nested too deeply)") from None
    baseline = Baseline.from_json(data, path=path, key=key)
    place = _bad_text(data, "")  # it could be read, but not written back
    if place:
        raise BaselineCorruptError(path, f"{place} holds a lone surrogate escape (\\ud800-\\udfff), not text")
    return baseline


def _dumps(baseline: Baseline) -> str:
    return json.dumps(baseline.to_json(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def _check_strings(name: str, mapping: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(mapping, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in mapping.items()):
        raise TypeError(f"{name} must map str -> str, got {mapping!r}")
    return dict(mapping)


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
        """The sibling lock file used by :meth:`write`: ``.<file name>.lock``."""
        p = self.path_for(key)
        return p.with_name(f".{p.name}.lock")

    def load(self, key: str) -> Baseline | None:
        """The stored baseline, or None when there is no file.

        Raises BaselineCorruptError for unreadable JSON, an unknown schema_version
        (BaselineSchemaError for a newer one), missing, unexpected or mistyped fields, a
        value out of range (the message names its place, e.g.
        ``runs[2].trials[0].summary.median_ttft_ms``), or a file holding another key. Reads
        without the lock: writers replace the file atomically, so a reader sees either
        the old or the new file, never a partial one.
        """
        return _read(self.path_for(key), key)

    def write(self, key: str, testbed: Mapping[str, str], run: BaselineRun, *, replace: bool = False,
              max_runs: int = MAX_RUNS,
              differences: Callable[[Mapping[str, str], Mapping[str, str]], list[str]] = diff_testbeds,
              ) -> tuple[Baseline, tuple[BaselineRun, ...]]:
        """Add ``run`` to ``key``'s runs (or, with ``replace``, make it the only one).

        Under an exclusive lock: read the current file (a corrupt one raises
        BaselineCorruptError and is left untouched); a different testbed (by
        ``differences(stored, testbed)``) raises TestbedMismatchError unless ``replace``;
        the file then holds ``testbed``; only the last ``max_runs`` runs are kept.
        Returns the baseline as written and the runs it dropped (oldest first).
        """
        import fcntl

        bed = _check_strings("testbed", testbed)
        if not isinstance(run, BaselineRun):
            raise TypeError(f"run must be a BaselineRun, got {type(run).__name__}")
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"max_runs must be an integer >= 1, got {max_runs!r}")
        path = self.path_for(key)
        try:  # fail before taking the lock if the run cannot be stored
            json.dumps(run.to_json(), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"baseline {key!r}: run is not JSON-serializable: {exc}") from exc
        try:  # nor store what load() would refuse: the plugin never writes a file it cannot read
            BaselineRun.from_json(run.to_json(), path=path, where="run")
        except BaselineCorruptError as exc:
            raise ValueError(f"baseline {key!r}: the run cannot be stored: {exc.problem}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path_for(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            existing = _read(path, key)
            if existing is None or replace:
                kept, dropped = [run], tuple(existing.runs) if existing else ()
            else:
                lines = differences(existing.testbed, bed)
                if lines:
                    raise TestbedMismatchError(key, path, lines)
                runs = [*existing.runs, run]
                kept, dropped = runs[-max_runs:], tuple(runs[:-max_runs])
            written = Baseline(key=key, path=path, testbed=bed, runs=tuple(kept))
            write_text_atomic(path, _dumps(written))
        finally:
            os.close(lock_fd)  # closing releases the flock
        return written, dropped
