"""Run folders -> flat rows: the CSV, the plots, the compare command and the Pareto frontier.

A *run folder* is what one pytest session writes (``--kv-results-dir``): ``run.json``
(the session: server, gate, items) and one JSON file per item under a folder named
after its scenario file. Rows use the seed README's CSV columns first
(``folder,file,phase,iteration,input_len,kvcache,modality,bandwidth,arcc,direction,
mean_ttft_ms,std_ttft_ms,mean_itl_ms,total_token_throughput``), then ours.

Two granularities: one row per item and trial (``iteration`` = the trial number, the
figures of its measured round), or one row per item (``iteration`` empty, the figures
of every usable trial's measured round pooled, as the item JSON's top level has them).

Nothing here imports pytest or matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from ..errors import KVCacheError
from .json_report import RESULT_SCHEMA_VERSION

__all__ = [
    "CSV_COLUMNS",
    "SEED_COLUMNS",
    "RUN_FILE",
    "ItemDoc",
    "ResultsError",
    "RunFolder",
    "filter_rows",
    "find_runs",
    "item_rows",
    "load_run",
    "modality",
    "pareto_frontier",
    "pareto_frontiers",
    "run_slowdown",
    "write_csv",
]

#: The columns of the seed's ``compare_offloading.py`` CSV, in its order.
SEED_COLUMNS: tuple[str, ...] = (
    "folder", "file", "phase", "iteration", "input_len", "kvcache", "modality", "bandwidth", "arcc", "direction",
    "mean_ttft_ms", "std_ttft_ms", "mean_itl_ms", "total_token_throughput",
)
#: Every column we write: the seed's, then ours.
CSV_COLUMNS: tuple[str, ...] = SEED_COLUMNS + (
    "item", "scenario", "backend", "concurrency", "output_len", "num_prompts", "trials", "usable",
    "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms", "mean_e2el_ms",
    "request_throughput", "output_throughput", "completed", "failed", "status", "verdict",
    "server", "gpu", "vllm_version", "lmcache_version", "labels", "emulator_slowdown",
)
#: The session file of a run folder.
RUN_FILE = "run.json"
_Row = TypeVar("_Row", bound=Mapping[str, Any])

#: Backend name -> storage medium, as the seed's script maps them (none -> HBM: no offload).
_MODALITY = {
    "none": "HBM", "cpu": "CPU", "disk": "Local Disk", "gds": "GDS", "redis": "Redis",
    "lmcache_server": "LMCache server", "mooncake": "Mooncake", "native": "vLLM native",
}
#: The labels that have their own column; others go to ``labels`` as k=v;k=v.
_LABEL_COLUMNS = ("bandwidth", "arcc", "direction")


class ResultsError(KVCacheError):
    """A run folder or result file that cannot be read; the message names it."""


def modality(backend: str, labels: Mapping[str, str] | None = None) -> str:
    """The medium of a backend (HBM, CPU, Local Disk, GDS, ...); a ``modality`` label wins."""
    if labels and labels.get("modality"):
        return str(labels["modality"])
    return _MODALITY.get(backend, backend)


@dataclass
class ItemDoc:
    """One item JSON file of a run folder."""

    path: Path  # absolute
    rel: str  # relative to the run folder, with forward slashes
    doc: dict

    @property
    def labels(self) -> dict[str, str]:
        """``label.<key>`` entries of the server info, and a top-level ``labels`` mapping."""
        server = self.doc.get("server") or {}
        out = {k[len("label."):]: str(v) for k, v in server.items() if k.startswith("label.")}
        extra = self.doc.get("labels")
        if isinstance(extra, Mapping):
            out.update({str(k): str(v) for k, v in extra.items()})
        return out


@dataclass
class RunFolder:
    """A run folder: its session file (if any) and its item files in a stable order."""

    path: Path
    name: str
    session: dict = field(default_factory=dict)
    items: list[ItemDoc] = field(default_factory=list)


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def _is_item_doc(data: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(data, dict) and "schema_version" in data and "scenario" in data and "item" in data


def load_run(path: Path, name: str | None = None) -> RunFolder:
    """Read one run folder; a file that is not JSON, or of a newer schema, is an error naming it."""
    path = Path(path)
    if not path.is_dir():
        raise ResultsError(f"{path}: no such folder")
    run = RunFolder(path=path, name=name or path.name)
    session_file = path / RUN_FILE
    if session_file.is_file():
        data = _read_json(session_file)
        if not isinstance(data, dict):
            raise ResultsError(f"{session_file}: expected a JSON object")
        run.session = data
    order = {n: i for i, n in enumerate(run.session.get("items", []))}
    # A reused folder may hold an earlier session's files: read this session's only.
    wanted = set(run.session.get("item_files") or ())
    docs = []
    for file in sorted(path.rglob("*.json")):
        rel = file.relative_to(path).as_posix()
        if file == session_file or rel.startswith("logs/") or file.name.startswith("."):
            continue
        if wanted and rel not in wanted:
            continue
        data = _read_json(file)
        if not _is_item_doc(data):
            continue  # another tool's JSON (pytest-benchmark's, say) is not ours to read
        version = data.get("schema_version")
        if not isinstance(version, int) or version > RESULT_SCHEMA_VERSION:
            raise ResultsError(f"{file}: schema_version {version!r} is not one this pytest-kvcache reads "
                               f"(up to {RESULT_SCHEMA_VERSION}); upgrade pytest-kvcache")
        docs.append(ItemDoc(path=file, rel=rel, doc=data))
    docs.sort(key=lambda d: (order.get(d.doc.get("item"), len(order)), d.rel))
    run.items = docs
    return run


def find_runs(paths: Sequence[Path]) -> list[RunFolder]:
    """Run folders named on the command line: a run folder itself, or a folder of them
    (like ``kvcache-results/``). Names are made unique (the parent is prefixed when two
    runs share a name)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ResultsError(f"{p}: no such folder")
        if not p.is_dir():
            raise ResultsError(f"{p}: not a folder; name run folders (what --kv-results-dir wrote)")
        if (p / RUN_FILE).is_file():
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and (c / RUN_FILE).is_file())
        if children:
            found.extend(children)
        elif any(_is_item_doc(_peek(f)) for f in p.rglob("*.json")):
            found.append(p)  # a run folder whose session file is missing (an interrupted run)
        else:
            raise ResultsError(f"{p}: no pytest-kvcache results here (no {RUN_FILE} and no item JSON files); "
                               "name the folder --kv-results-dir wrote, or a folder of such folders")
    names: dict[str, int] = {}
    for p in found:
        names[p.name] = names.get(p.name, 0) + 1
    runs = []
    seen = set()
    for p in found:
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        name = p.name if names[p.name] == 1 else f"{p.parent.name}/{p.name}"
        runs.append(load_run(p, name=name))
    return runs


def _peek(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_slowdown(run: RunFolder) -> float | None:
    """The ``--emulator-slowdown`` of a run that rehearsed a regression (None for a real
    run): from ``run.json``'s settings, else from its header line (older run folders)."""
    import re

    value = _num((run.session.get("settings") or {}).get("emulator_slowdown"))
    if value is None:
        header = " ".join(str(line) for line in run.session.get("header") or ())
        found = re.search(r"slowdown ([0-9.]+(?:e[-+]?\d+)?)", header)
        value = _num(found.group(1)) if found else None
    return value if value not in (None, 1.0) else None


def item_rows(run: RunFolder, per_trial: bool = True) -> list[dict]:
    """The rows of one run folder (see the module docstring for the two granularities)."""
    rows = []
    slowdown = run_slowdown(run)
    for item in run.items:
        doc = item.doc
        scenario = doc.get("scenario") or {}
        if doc.get("kind") == "storage":
            continue  # no inference figures; storage items have their own table (report/storage.py)
        server = doc.get("server") or {}
        labels = item.labels
        backend = str(scenario.get("backend", ""))
        trials = doc.get("trials") or []
        common = {
            "folder": run.name,
            "file": item.rel,
            "phase": scenario.get("phase", ""),
            "input_len": scenario.get("input_len"),
            "kvcache": backend,
            "modality": modality(backend, labels),
            **{k: labels.get(k, "") for k in _LABEL_COLUMNS},
            "item": _item_name(doc),
            "scenario": Path(str(scenario.get("file", ""))).stem,
            "backend": backend,
            "concurrency": scenario.get("concurrency"),
            "output_len": scenario.get("output_len"),
            "num_prompts": scenario.get("num_prompts"),
            "trials": len(trials),
            "usable": doc.get("usable_trials", sum(1 for t in trials if t.get("usable"))),
            "status": doc.get("status", ""),
            "verdict": (doc.get("verdict") or {}).get("zone") or "",
            "server": server.get("server", ""),
            "gpu": server.get("gpu", ""),
            "vllm_version": server.get("vllm_version", ""),
            "lmcache_version": server.get("lmcache_version", ""),
            "labels": ";".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _LABEL_COLUMNS),
            "emulator_slowdown": slowdown,
        }
        measure = scenario.get("measure_round") or "warm"
        if per_trial:
            for t in trials:
                rounds = t.get("rounds") or {}
                figures = rounds.get(measure) or (list(rounds.values())[-1] if rounds else {})
                rows.append(_row(common, figures, iteration=int(t.get("index", 0)) + 1,
                                 usable=1 if t.get("usable") else 0))
        else:
            rows.append(_row(common, doc, iteration="", usable=common["usable"]))
    return rows


def _item_name(doc: Mapping) -> str:
    nodeid = str(doc.get("item", ""))
    return nodeid.split("::")[-1]


def _row(common: dict, figures: Mapping, iteration, usable) -> dict:
    row = dict(common, iteration=iteration, usable=usable)
    for col in CSV_COLUMNS:
        if col not in row:
            row[col] = _num(figures.get(col))
    return {col: row.get(col) for col in CSV_COLUMNS}


def _parse_filter_value(column: str, value: str):
    if column == "input_len":
        from ..scenarios import parse_token_count

        return parse_token_count(value)
    return value.strip().lower()


def filter_rows(rows: Iterable[dict], filters: Mapping[str, Sequence[str]]) -> list[dict]:
    """Keep rows whose column matches one of the wanted values, for every column given.

    Matching ignores case; ``input_len`` accepts 1k/10k forms; ``backend`` matches the
    backend name or the ``kvcache`` column.
    """
    wanted = {column: {_parse_filter_value(column, v) for v in given} for column, given in filters.items() if given}
    out = []
    for row in rows:
        ok = True
        for column, values in wanted.items():
            if column == "input_len":
                ok = row.get("input_len") in values
            else:
                ok = str(row.get(column) or "").lower() in values
            if not ok:
                break
        if ok:
            out.append(row)
    return out


def pareto_frontier(rows: Sequence[_Row], x: str = "mean_ttft_ms", y: str = "total_token_throughput",
                    x_lower_is_better: bool = True, y_higher_is_better: bool = True) -> list[_Row]:
    """Rows not dominated by another: none has x at least as good and y at least as good,
    with one strictly better. Rows missing either figure are left out. Sorted by x."""
    sx = 1.0 if x_lower_is_better else -1.0
    sy = -1.0 if y_higher_is_better else 1.0
    pts = [(sx * float(r[x]), sy * float(r[y]), i) for i, r in enumerate(rows)
           if _num(r.get(x)) is not None and _num(r.get(y)) is not None]
    # Sweep by x (ties: better y first); keep a point when its y beats every y seen so far.
    pts.sort()
    frontier = []
    best_y = math.inf
    prev = None
    for px, py, i in pts:
        if py < best_y:
            frontier.append(i)
            best_y = py
            prev = (px, py)
        elif prev is not None and (px, py) == prev:
            frontier.append(i)  # an exact duplicate of a frontier point is not dominated either
    return sorted((rows[i] for i in frontier), key=lambda r: (float(r[x]) * sx, float(r[y]) * sy))


def pareto_frontiers(rows: Sequence[dict], x: str = "mean_ttft_ms", y: str = "total_token_throughput") -> list[dict]:
    """The frontier of each phase, phase after phase: a multi-turn or shared-prefix item
    is another workload, never a point that dominates (or is dominated by) a prefill one."""
    phases: dict[str, list[dict]] = {}
    for row in rows:
        phases.setdefault(str(row.get("phase") or ""), []).append(row)
    return [r for members in phases.values() for r in pareto_frontier(members, x=x, y=y)]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Write the rows (the seed's columns first); figures with 6 significant digits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    tmp.replace(path)
    return path
