"""A run folder's ``history.json``: the session's item runs, kept even when the store was not
reachable, so that ``history import`` can add them later (no pytest here)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .._atomic import write_json_atomic
from ..errors import HistoryError
from ._record import HISTORY_FILE_SCHEMA_VERSION, ItemRun
from ._store import json_safe, parse_time

__all__ = ["HISTORY_FILE_NAME", "load_run_folder", "write_run_file"]

HISTORY_FILE_NAME = "history.json"


def write_run_file(run_dir: Path, runs: Sequence[ItemRun]) -> Path:
    """Write ``run_dir/history.json`` atomically (a reader sees the old file or the new one).
    Raises OSError when the folder cannot be written, HistoryError when a run is not JSON."""
    path = Path(run_dir) / HISTORY_FILE_NAME
    try:
        write_json_atomic(path, {"schema_version": HISTORY_FILE_SCHEMA_VERSION,
                                 "runs": [json_safe(run.to_dict()) for run in runs]})
    except TypeError as exc:
        raise HistoryError(f"{path} not written: an item run is not JSON: {exc}") from None
    return path


def load_run_folder(run_dir: Path) -> list[ItemRun]:
    """The item runs of ``run_dir/history.json``; HistoryError naming the folder or file when
    the folder or the file is missing, or the file is not a history file this version reads."""
    run_dir = Path(run_dir)
    path = run_dir / HISTORY_FILE_NAME
    if not run_dir.is_dir():
        raise HistoryError(f"run folder {run_dir} does not exist or is not a folder: give a folder that "
                           "--kv-results-dir wrote")
    if not path.is_file():
        raise HistoryError(f"{path} not found: {run_dir} is not the run folder of a session that kept its history "
                           f"(every session writes {HISTORY_FILE_NAME} at its end)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HistoryError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistoryError(f"{path} is not valid JSON ({exc}): take it again from the run's artifact, or leave "
                           "the folder out") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not isinstance(version, int) \
            or isinstance(version, bool):
        raise HistoryError(f"{path} is not a pytest-kvcache history file: expected an object with an integer "
                           "'schema_version' and a 'runs' list")
    if version > HISTORY_FILE_SCHEMA_VERSION:
        raise HistoryError(f"{path} was written by a newer pytest-kvcache (history file version {version}, this "
                           f"one reads {HISTORY_FILE_SCHEMA_VERSION}): upgrade pytest-kvcache")
    if version < HISTORY_FILE_SCHEMA_VERSION:
        raise HistoryError(f"{path} has history file version {version}, which no pytest-kvcache wrote")
    runs = []
    for i, entry in enumerate(data["runs"]):
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            run = ItemRun.from_dict(entry)
            parse_time(run.time)
        except ValueError as exc:
            raise HistoryError(f"{path}: runs[{i}]: {exc}: take the file again from the run's artifact, or leave "
                               "the folder out") from None
        runs.append(run)
    return runs
