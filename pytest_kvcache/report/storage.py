"""The storage phase's table and tier comparison plot (storage_items.py's outcomes).

A storage item has no TTFT or token throughput of a server: its row in the verdict table
is its storage throughput against the baseline, and this table beside it shows what the
seed (seed 002) reports per hierarchy: storage and wall-clock throughput, bandwidth, the
users' read and write volumes and their ratio, and the trials excluded (each tier's
figures are rows of the tier table, report/tiers.py). Outcomes are recognised by their ``storage``
attribute (a :class:`~pytest_kvcache.storage.results.StorageResult`). Nothing here
imports pytest; matplotlib only where a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["STORAGE_HEADER", "STORAGE_PLOT", "plot_storage_tiers", "storage_cells", "storage_comparison",
           "storage_lines", "storage_rows"]

STORAGE_HEADER: tuple[str, ...] = ("item", "tiers", "storage tok/s", "wall tok/s", "bandwidth GB/s",
                                   "MiB read/written", "read:write", "trials used")
#: the plot's file name under the run's plots/ and its caption
STORAGE_PLOT = ("storage_tiers.png", "Storage phase: storage throughput per tier hierarchy (bars: mean of the "
                "complete trials, points: trials) and each tier's read p95 latency")


def _measured(outcomes: Sequence) -> list:
    return [o for o in outcomes if getattr(o, "storage", None) is not None]


def _cell(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.4g}"


def _per_tier(values: dict, unit: str, digits: str) -> str:
    return " ".join(f"{tier}={'-' if v is None else format(v, digits) + unit}" for tier, v in values.items()) or "-"


def storage_cells(outcome) -> tuple[str, str]:
    """The metric and current value of a storage item's row in the verdict table when it
    has no verdict (stored as a baseline, skipped, failed)."""
    storage = getattr(outcome, "storage", None)
    value = storage.summary.storage_throughput_tokens_per_sec if storage is not None else None
    return "storage_throughput_tokens_per_sec", "-" if value is None else f"{value:.4g}"


def storage_rows(outcomes: Sequence) -> list[tuple[str, ...]]:
    """A row per storage item that measured, in :data:`STORAGE_HEADER` order."""
    rows: list[tuple[str, ...]] = []
    for o in _measured(outcomes):
        s, result = o.storage.summary, o.storage
        tiers = "+".join(t["kind"] for t in result.config.get("tiers", ()))
        volumes = f"{_cell(s.read_bytes, 2 ** 20)}/{_cell(s.write_bytes, 2 ** 20)}"
        used = f"{s.trials_used}/{len(result.trials)}" + (f" ({len(s.excluded)} excluded)" if s.excluded else "")
        rows.append((o.case.name, tiers, _cell(s.storage_throughput_tokens_per_sec),
                     _cell(s.wall_clock_throughput_tokens_per_sec), _cell(s.bandwidth_bytes_per_sec, 1e9), volumes,
                     _cell(s.read_write_ratio), used))
    return rows


def storage_lines(outcomes: Sequence, width: int | None) -> list[str]:
    """The storage table and its excluded trials, within ``width`` columns; none without storage items."""
    from .terminal import fit_table
    from .text import fit_lines

    rows = storage_rows(outcomes)
    if not rows:
        return []
    table, _dropped = fit_table(STORAGE_HEADER, rows, width)
    lines = ["", *fit_lines(["storage phase (tokens / storage I/O time; wall-clock beside it):"], width)]
    lines += [text for text, _ in table]
    for o in _measured(outcomes):
        for reason in o.storage.summary.excluded:
            lines += fit_lines([f"{o.case.name} EXCLUDED {reason}"], width)
    return lines


def plot_storage_tiers(outcomes: Sequence, plots_dir: Path) -> list[Path]:
    """Two panels: storage throughput per hierarchy, and read p95 per tier within each
    hierarchy (logarithmic where they span :data:`~.plots.LOG_SPAN`). No plot without storage items."""
    from .plots import _plt, _save, _scale, _tokens

    measured = _measured(outcomes)
    if not measured:
        return []
    names = [o.case.name for o in measured]
    fig, (top, bottom) = _plt().subplots(2, 1, figsize=(max(6.0, 1.6 * len(names) + 2), 8.0), layout="constrained")
    means = [o.storage.summary.storage_throughput_tokens_per_sec or 0.0 for o in measured]
    top.bar(range(len(names)), means, color="C0", alpha=0.6, label="mean of complete trials")
    shown = list(means)
    for i, o in enumerate(measured):
        values = [t.storage_throughput_tokens_per_sec for t in o.storage.trials if t.complete]
        top.plot([i] * len(values), values, "o", color="C0", markersize=4)
        shown += [v for v in values if v]
    top.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    top.set_ylabel("storage throughput (tokens/s)")
    _scale(top, "y", shown, formatter=_tokens)
    tiers = list(dict.fromkeys(t for o in measured for t in o.storage.summary.tier_read_p95_ms))
    width = 0.8 / max(1, len(tiers))
    p95s = []
    for j, tier in enumerate(tiers):
        values = [o.storage.summary.tier_read_p95_ms.get(tier) for o in measured]
        p95s += [v for v in values if v]
        bottom.bar([i + (j - (len(tiers) - 1) / 2) * width for i in range(len(names))],
                   [v or 0.0 for v in values], width, color=f"C{j % 10}", label=tier)
    bottom.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    bottom.set_ylabel("read p95 latency (ms)")
    _scale(bottom, "y", p95s)
    bottom.legend(title="tier", fontsize=8)
    return [_save(fig, plots_dir / STORAGE_PLOT[0], "Storage phase: tier hierarchies (seed 002)")]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def storage_comparison(runs: Sequence) -> list[str]:
    """The compare command's lines for storage items (report/rows.RunFolder's documents of
    kind ``storage``): storage and wall-clock throughput and read p95 per tier per run, the
    storage throughput's change against the first run that has the item. Empty without any."""
    rows: list[tuple[str, ...]] = []
    first: dict[str, float] = {}
    for run in runs:
        for item in run.items:
            doc = item.doc
            if doc.get("kind") != "storage":
                continue
            name, summary = str(doc.get("item", "")).split("::")[-1], doc.get("summary") or {}
            value = _number(summary.get("storage_throughput_tokens_per_sec"))
            wall = _number(summary.get("wall_clock_throughput_tokens_per_sec"))
            reference = first.setdefault(name, value) if value else None
            change = "reference" if reference == value else f"{(value / reference - 1) * 100:+.1f}%" \
                if value and reference else "-"
            rows.append((name, run.name, "-" if value is None else f"{value:.4g}",
                         "-" if wall is None else f"{wall:.4g}", change,
                         _per_tier(summary.get("tier_read_p95_ms") or {}, " ms", ".3g"),
                         str(len(summary.get("excluded") or ()))))
    if not rows:
        return []
    from .terminal import _table_lines

    header = ("item", "run", "storage tok/s", "wall tok/s", "change", "read p95 per tier", "excluded trials")
    return ["Storage items (tokens / storage I/O time, against the first run that has the item; not in the CSV "
            "or plots, which hold the inference phases):",
            *("  " + line for line in _table_lines(header, rows, range(len(header))))]
