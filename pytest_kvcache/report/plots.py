"""PNG plots of a run (or of many runs, for the compare command), drawn with matplotlib.

Every axis is labelled with its unit and starts at zero; no log axes (as the seed's
``plot_pareto.py`` recommends). matplotlib is imported here only, with the Agg backend,
so nothing needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ComparisonPoints",
    "plot_baseline_vs_current",
    "plot_metric_vs_input_len",
    "plot_network",
    "plot_pareto",
    "series_label_columns",
]

_LABELS = {
    "mean_ttft_ms": "mean TTFT (ms)",
    "median_ttft_ms": "median TTFT (ms)",
    "p90_ttft_ms": "p90 TTFT (ms)",
    "p99_ttft_ms": "p99 TTFT (ms)",
    "mean_itl_ms": "mean ITL (ms)",
    "mean_tpot_ms": "mean TPOT (ms)",
    "total_token_throughput": "total token throughput (tokens/s)",
    "output_throughput": "output throughput (tokens/s)",
    "request_throughput": "request throughput (requests/s)",
    "input_len": "input length (tokens)",
}
_ZONE_COLOURS = {"PASS": "#2ca02c", "WARN": "#ff7f0e", "IMPROVED": "#17becf", "FAIL": "#d62728"}
#: Columns that may tell one line from another; only those that vary are named in the legend.
_SERIES_COLUMNS = ("folder", "phase", "scenario", "kvcache", "concurrency", "output_len", "bandwidth", "arcc",
                   "direction")


def axis_label(metric: str) -> str:
    if metric in _LABELS:
        return _LABELS[metric]
    if metric.endswith("_ms"):
        return f"{metric[:-3].replace('_', ' ')} (ms)"
    if "throughput" in metric:
        return f"{metric.replace('_', ' ')} (per s)"
    return metric.replace("_", " ")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _tokens(value: float, _pos=None) -> str:
    if value >= 1000 and value % 1000 == 0:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def series_label_columns(rows: Sequence[Mapping]) -> list[str]:
    """The series columns that vary across rows (the backend always names a line)."""
    cols = [c for c in _SERIES_COLUMNS if len({str(r.get(c) or "") for r in rows}) > 1]
    if "kvcache" not in cols:
        cols.insert(0, "kvcache")
    return cols


def _series_name(row: Mapping, cols: Sequence[str]) -> str:
    parts = []
    for c in cols:
        v = row.get(c)
        if v in (None, ""):
            continue
        if c == "kvcache":
            parts.append(f"{v} ({row.get('modality')})" if row.get("modality") and row.get("modality") != v else str(v))
        elif c in ("concurrency", "output_len"):
            parts.append(f"{'c' if c == 'concurrency' else 'out'}{v}")
        elif c == "arcc":
            parts.append(f"arcc={v}")
        else:
            parts.append(str(v))
    return " ".join(parts) or "all"


def _si(value: float, _pos=None) -> str:
    """Tick labels without matplotlib's offset text: 250k, 2.5M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _plain_axes(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if not isinstance(axis.get_major_formatter(), FuncFormatter):
            axis.set_major_formatter(FuncFormatter(_si))


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Path:
    _plain_axes(ax)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="#555555")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def plot_metric_vs_input_len(rows: Sequence[Mapping], metric: str, path: Path, title: str | None = None) -> Path:
    """A line per series (backend, and whatever else varies) through the mean over trials
    at each input length; each trial (row) a small point."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    usable = [r for r in rows if _num(r.get(metric)) is not None and _num(r.get("input_len")) is not None]
    cols = series_label_columns(usable)
    series: dict[str, list[Mapping]] = {}
    for r in usable:
        series.setdefault(_series_name(r, cols), []).append(r)
    for i, (name, members) in enumerate(sorted(series.items())):
        colour = f"C{i % 10}"
        by_len: dict[float, list[float]] = {}
        for r in members:
            by_len.setdefault(float(r["input_len"]), []).append(float(r[metric]))
        xs = sorted(by_len)
        ax.plot(xs, [sum(by_len[x]) / len(by_len[x]) for x in xs], marker="o", color=colour, label=name, lw=1.8)
        px = [x for x in xs for _ in by_len[x]]
        py = [v for x in xs for v in by_len[x]]
        ax.scatter(px, py, s=12, color=colour, alpha=0.45, zorder=3)
    if not usable:
        _no_data(ax, f"no {metric} figures")
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    return _finish(fig, ax, path, title or f"{axis_label(metric)} vs input length (line: mean of trials)",
                   axis_label("input_len"), axis_label(metric))


def plot_network(rows: Sequence[Mapping], path: Path, metric: str = "mean_ttft_ms") -> Path | None:
    """TTFT against input length, a line per (medium, bandwidth, direction, ARCC): the
    seed's network comparison. None when no row has a bandwidth or direction label."""
    labelled = [r for r in rows if r.get("bandwidth") or r.get("direction")]
    if not labelled:
        return None
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, dict[float, list[float]]] = {}
    for r in labelled:
        if _num(r.get(metric)) is None or _num(r.get("input_len")) is None:
            continue
        name = " ".join(str(p) for p in (r.get("modality"), r.get("bandwidth"), r.get("direction"),
                                         f"arcc={r['arcc']}" if r.get("arcc") else "") if p)
        series.setdefault(name, {}).setdefault(float(r["input_len"]), []).append(float(r[metric]))
    for i, (name, by_len) in enumerate(sorted(series.items())):
        xs = sorted(by_len)
        ax.plot(xs, [sum(by_len[x]) / len(by_len[x]) for x in xs], marker="o", color=f"C{i % 10}", label=name,
                lw=1.8, ls=("-", "--", ":", "-.")[i // 10 % 4])
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    return _finish(fig, ax, path, f"network comparison: {axis_label(metric)} by bandwidth and direction",
                   axis_label("input_len"), axis_label(metric))


def plot_pareto(rows: Sequence[Mapping], frontier: Sequence[Mapping], path: Path, x: str = "mean_ttft_ms",
                y: str = "total_token_throughput", xmax: float | None = None) -> Path:
    """Every row a point (coloured by series), the Pareto frontier as a step line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    usable = [r for r in rows if _num(r.get(x)) is not None and _num(r.get(y)) is not None]
    cols = series_label_columns(usable)
    series: dict[str, list[Mapping]] = {}
    for r in usable:
        series.setdefault(_series_name(r, cols), []).append(r)
    for i, (name, members) in enumerate(sorted(series.items())):
        ax.scatter([float(r[x]) for r in members], [float(r[y]) for r in members], s=28, color=f"C{i % 10}",
                   alpha=0.8, label=name, zorder=3)
    if frontier:
        fx = [float(r[x]) for r in frontier]
        fy = [float(r[y]) for r in frontier]
        ax.plot(fx, fy, color="black", lw=1.4, ls="--", marker="D", ms=6, mfc="none", label="Pareto frontier",
                zorder=4, drawstyle="steps-post")
    if not usable:
        _no_data(ax, f"no rows with {x} and {y}")
    if xmax is not None:
        ax.set_xlim(right=xmax)
    return _finish(fig, ax, path, f"{axis_label(y)} vs {axis_label(x)} (up and left is better)",
                   axis_label(x), axis_label(y))


@dataclass
class ComparisonPoints:
    """What the baseline-vs-current plot shows for one item and metric."""

    item: str
    metric: str
    current: list[float]
    baseline: list[float] = field(default_factory=list)
    baseline_label: str = "baseline"
    baseline_value: float | None = None
    current_value: float | None = None
    ci_low: float | None = None  # of the current level, in the metric's unit
    ci_high: float | None = None
    zone: str | None = None


def plot_baseline_vs_current(points: Sequence[ComparisonPoints], path: Path) -> Path:
    """One panel per metric; per item the baseline trials (grey) and this run's trials
    (coloured by verdict) as points, the baseline level as a bar and this run's level
    with its confidence interval."""
    plt = _plt()
    metrics = list(dict.fromkeys(p.metric for p in points)) or ["median_ttft_ms"]
    items = list(dict.fromkeys(p.item for p in points))
    width = max(8.0, min(20.0, 2.0 + 1.1 * len(items)))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(width, 3.6 * len(metrics) + 0.8), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        mine = [p for p in points if p.metric == metric]
        if not mine:
            _no_data(ax, "no items measured")
        for p in mine:
            i = items.index(p.item)
            if p.baseline:
                ax.scatter([i - 0.18] * len(p.baseline), p.baseline, s=18, color="#7f7f7f", alpha=0.7, zorder=3,
                           label=f"{p.baseline_label} trials")
            if p.baseline_value is not None:
                ax.hlines(p.baseline_value, i - 0.32, i - 0.04, color="#444444", lw=2, zorder=4,
                          label=f"{p.baseline_label} level")
            colour = _ZONE_COLOURS.get(p.zone or "", "C0")
            ax.scatter([i + 0.18] * len(p.current), p.current, s=22, color=colour, zorder=5,
                       label=f"this run's trials ({p.zone})" if p.zone else "this run's trials (not compared)")
            if p.current_value is not None and p.ci_low is not None and p.ci_high is not None:
                ax.errorbar([i + 0.3], [p.current_value], yerr=[[max(0.0, p.current_value - p.ci_low)],
                                                                 [max(0.0, p.ci_high - p.current_value)]],
                            fmt="s", color=colour, ms=5, capsize=4, lw=1.5, zorder=6, label="this run: 95% CI")
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels(items, rotation=20 if len(items) > 3 else 0, ha="right" if len(items) > 3 else "center",
                           fontsize=8)
        ax.set_xlim(-0.6, max(0.6, len(items) - 0.4))
        ax.set_ylim(bottom=0)
        _plain_axes(ax)
        ax.set_ylabel(axis_label(metric))
        ax.set_xlabel("item")
        ax.grid(True, axis="y", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
        ax.set_title(f"{axis_label(metric)}: baseline vs this run (points: trials)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
