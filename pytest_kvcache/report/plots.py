"""PNG plots of a run (or of many runs, for the compare command), drawn with matplotlib.

Every axis is labelled with its unit. An axis whose values span a factor of
:data:`LOG_SPAN` or more (input lengths of 100 to 100k tokens, a 50 ms item beside a 1 s
one) is logarithmic, so the small values are not flattened onto the axis; the others are
linear from zero. Limits are padded, so no point sits on a plot's edge. Workloads that do
not compare (a prefill item, a multi-turn one) get a panel each, one per phase. Every
series has a look of its own (colour, marker, line style: see :class:`SeriesStyles`), and
the legend stands outside the panels, right of them, in a figure grown to hold it.
matplotlib is imported here only, with the Agg backend, so nothing needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..decision import Zone

__all__ = [
    "LOG_SPAN",
    "ComparisonPoints",
    "SeriesStyles",
    "Style",
    "axis_label",
    "plot_baseline_vs_current",
    "plot_changes",
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
_ZONE_COLOURS = {Zone.PASS: "#2ca02c", Zone.WARN: "#ff7f0e", Zone.IMPROVED: "#17becf", Zone.FAIL: "#d62728"}
#: Columns that may tell one line from another; only those that vary within a panel are named.
_SERIES_COLUMNS = ("folder", "scenario", "kvcache", "concurrency", "output_len", "bandwidth", "arcc", "direction")
#: An axis is logarithmic when its largest value is this many times its smallest.
LOG_SPAN = 20.0
#: matplotlib's default colour cycle (tab10), then markers and line styles for more series
_COLOURS = tuple(f"C{i}" for i in range(10))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LineStyle = Literal["-", "--", ":", "-."]
_LINESTYLES: tuple[LineStyle, ...] = ("-", "--", ":", "-.")
_LEGEND_FONT = 8
#: legend entries per column before another column is started
_LEGEND_ROWS = 24


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


def _si(value: float, _pos=None) -> str:
    """Tick labels without matplotlib's offset text: 250k, 2.5M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- series: names and looks ----------------------------------------------------------------


def series_label_columns(rows: Sequence[Mapping]) -> list[str]:
    """The series columns that vary across rows (the backend always names a line)."""
    cols = [c for c in _SERIES_COLUMNS if len({str(r.get(c) or "") for r in rows}) > 1]
    if "kvcache" not in cols:
        cols.insert(1 if cols[:1] == ["folder"] else 0, "kvcache")
    return cols


def run_name(row: Mapping) -> str:
    """A run folder's name, marked when the run rehearsed a regression (--emulator-slowdown)."""
    slowdown = _num(row.get("emulator_slowdown"))
    name = str(row.get("folder") or "")
    return f"{name} (slowdown x{slowdown:g})" if slowdown not in (None, 1.0) else name


def _series_name(row: Mapping, cols: Sequence[str]) -> str:
    parts = []
    for c in cols:
        v = row.get(c)
        if v in (None, "") or c == "folder":
            continue
        if c == "kvcache":
            medium = str(row.get("modality") or "")
            parts.append(f"{v} ({medium})" if medium and medium.lower() != str(v).lower() else str(v))
        elif c in ("concurrency", "output_len"):
            parts.append(f"{'c' if c == 'concurrency' else 'out'}{v}")
        elif c == "arcc":
            parts.append(f"arcc={v}")
        else:
            parts.append(str(v))
    return " ".join(parts)


@dataclass(frozen=True)
class Style:
    """How one series is drawn."""

    colour: str
    marker: str
    linestyle: LineStyle


def _look(i: int) -> Style:
    """The i-th look: ten colours, then ten markers, then four line styles (400 distinct)."""
    return Style(_COLOURS[i % 10], _MARKERS[i // 10 % 10], _LINESTYLES[i // 100 % 4])


def _run_look(r: int) -> tuple[str, LineStyle]:
    """The r-th run's marker and line style: both change from one run to the next, and no
    two of the first 40 runs share the pair."""
    return _MARKERS[r % 10], _LINESTYLES[(r + r // 10) % 4]


class SeriesStyles:
    """A distinct look for every series, a series being a (group, run) pair: the group is
    what the row measured (backend, ...), the run its run folder ("" for one run).

    With several groups and several runs (two runs of seven backends), the group gives the
    colour and the run the marker and line style, so the legend lists 7 + 2 entries, not
    14 whose colours repeat. Otherwise each series gets the next look (:func:`_look`)."""

    def __init__(self, series: Sequence[tuple[str, str]]) -> None:
        self.groups = list(dict.fromkeys(g for g, _ in series))
        self.runs = list(dict.fromkeys(r for _, r in series))
        self.factored = 1 < len(self.groups) <= len(_COLOURS) and 1 < len(self.runs) <= 40
        self._flat = {key: _look(i) for i, key in enumerate(dict.fromkeys(series))}

    def style(self, group: str, run: str) -> Style:
        if not self.factored:
            return self._flat[(group, run)]
        return Style(_COLOURS[self.groups.index(group)], *_run_look(self.runs.index(run)))

    @staticmethod
    def label(group: str, run: str) -> str:
        return " ".join(p for p in (run, group) if p) or "all"

    def legend(self, lines: bool = True) -> list[tuple[object, str]]:
        """(handle, label) pairs: one per series, or (factored) one per group and one per run."""
        from matplotlib.lines import Line2D

        def handle(style: Style, marker: bool = True, line: bool = True) -> Line2D:
            return Line2D([], [], color=style.colour, marker=style.marker if marker else "None",
                          linestyle=style.linestyle if line else "None", lw=1.8, ms=6)

        if not self.factored:
            return [(handle(style, line=lines), self.label(*key)) for key, style in self._flat.items()]
        entries: list[tuple[object, str]] = [
            (handle(Style(_COLOURS[i], "o", "-"), marker=not lines, line=lines), g) for i, g in enumerate(self.groups)]
        entries.append((Line2D([], [], linestyle="None", marker="None"), "runs:"))
        for r, run in enumerate(self.runs):
            entries.append((handle(Style("#444444", *_run_look(r)), line=lines), run))
        return entries


def _split_series(rows: Sequence[Mapping], cols: Sequence[str]) -> dict[tuple[str, str], list[Mapping]]:
    by_run = "folder" in cols
    series: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        series.setdefault((_series_name(r, cols), run_name(r) if by_run else ""), []).append(r)
    return series


# -- figures, panels, axes ------------------------------------------------------------------


def _figure(panels: int, entries: Sequence[tuple[object, str]], width: float = 8.0, panel_height: float = 4.0):
    """A figure of ``panels`` stacked panels, wide and tall enough for its legend on the right."""
    ncol = max(1, math.ceil(len(entries) / _LEGEND_ROWS))
    rows = math.ceil(len(entries) / ncol) if entries else 0
    label_chars = max((len(label) for _, label in entries), default=0)
    legend_width = ncol * (0.75 + 0.068 * label_chars) if entries else 0.0
    height = max(panel_height * panels + 0.8, 1.2 + 0.19 * rows)
    fig, axes = _plt().subplots(panels, 1, figsize=(width + legend_width, height), squeeze=False,
                                layout="constrained")
    if entries:
        fig.legend([h for h, _ in entries], [label for _, label in entries], loc="outside right upper",
                   fontsize=_LEGEND_FONT, ncols=ncol, frameon=True)
    return fig, list(axes[:, 0])


def _scale(ax, axis: str, values: Sequence[float], formatter=None, ticks: Sequence[float] | None = None) -> None:
    """Logarithmic when the values span :data:`LOG_SPAN`, else linear from zero; padded limits
    either way (a single point, or the largest one, never sits on the edge)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    values = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    log = lo > 0 and hi / lo >= LOG_SPAN
    axis_obj = ax.xaxis if axis == "x" else ax.yaxis
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if axis == "x" else (ax.set_yscale, ax.set_ylim)
    if log:
        set_scale("log")
        set_lim(lo / 1.6, hi * 1.6)
        axis_obj.set_minor_formatter(NullFormatter())
    else:
        # one value (a single input length, a single point) stands in the middle, not by an edge
        top = (hi * 2 if lo == hi else hi * 1.12) if hi > 0 else 1.0
        set_lim(-0.03 * top, top)
    if ticks is not None and 0 < len(set(ticks)) <= 8:
        axis_obj.set_major_locator(FixedLocator(sorted(set(ticks))))
    axis_obj.set_major_formatter(FuncFormatter(formatter or _si))


def _panels(rows: Sequence[Mapping], column: str = "phase") -> list[tuple[str, list[Mapping]]]:
    """Rows by ``column`` (a panel each), in order of appearance; one panel when it never varies."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r.get(column) or ""), []).append(r)
    return list(groups.items()) or [("", [])]


def _panel_title(name: str, rows: Sequence[Mapping], many: bool) -> str:
    """A phase panel's title with what is the same for all its rows (concurrency, output length)."""
    if not many:
        return ""
    fixed = []
    for col, prefix in (("concurrency", "c"), ("output_len", "out")):
        values = {str(r.get(col)) for r in rows if r.get(col) not in (None, "")}
        if len(values) == 1:
            fixed.append(f"{prefix}{values.pop()}")
    return name + (f" ({', '.join(fixed)})" if fixed else "")


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="#555555")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _usable(rows: Sequence[Mapping], *columns: str) -> list[Mapping]:
    return [r for r in rows if all(_num(r.get(c)) is not None for c in columns)]


def _styles(panels: Sequence[tuple[str, list[Mapping]]]) -> tuple[SeriesStyles, list[dict]]:
    """Looks shared by every panel (a backend keeps its colour) and each panel's series."""
    per_panel = [_split_series(members, series_label_columns(members)) for _, members in panels]
    return SeriesStyles([key for series in per_panel for key in series]), per_panel


# -- the plots ------------------------------------------------------------------------------


def plot_metric_vs_input_len(rows: Sequence[Mapping], metric: str, path: Path, title: str | None = None) -> Path:
    """A panel per phase; in it a line per series (backend, and whatever else varies)
    through the mean over trials at each input length, each trial (row) a small point."""
    usable = _usable(rows, metric, "input_len")
    panels = _panels(usable)
    styles, per_panel = _styles(panels)
    fig, axes = _figure(len(panels), styles.legend() if usable else [])
    for ax, (name, members), series in zip(axes, panels, per_panel):
        for (group, run), points in series.items():
            look = styles.style(group, run)
            by_len: dict[float, list[float]] = {}
            for r in points:
                by_len.setdefault(float(r["input_len"]), []).append(float(r[metric]))
            xs = sorted(by_len)
            ax.plot(xs, [sum(by_len[x]) / len(by_len[x]) for x in xs], marker=look.marker, ls=look.linestyle,
                    color=look.colour, lw=1.8, ms=6)
            ax.scatter([x for x in xs for _ in by_len[x]], [v for x in xs for v in by_len[x]], s=12,
                       color=look.colour, alpha=0.45, zorder=3)
        if not members:
            _no_data(ax, f"no {metric} figures")
        else:
            lengths = [float(r["input_len"]) for r in members]
            _scale(ax, "x", lengths, _tokens, ticks=lengths)
            _scale(ax, "y", [float(r[metric]) for r in members])
        ax.set_title(_panel_title(name, members, len(panels) > 1), fontsize=10)
        ax.set_xlabel(axis_label("input_len"))
        ax.set_ylabel(axis_label(metric))
        ax.grid(True, alpha=0.3)
    return _save(fig, path, title or f"{axis_label(metric)} vs input length (line: mean of trials)")


def plot_network(rows: Sequence[Mapping], path: Path, metric: str = "mean_ttft_ms") -> Path | None:
    """TTFT against input length, a line per (medium, bandwidth, direction, ARCC): the
    seed's network comparison. None when no row has a bandwidth or direction label."""
    labelled = [r for r in rows if r.get("bandwidth") or r.get("direction")]
    if not labelled:
        return None
    series: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in _usable(labelled, metric, "input_len"):
        name = " ".join(str(p) for p in (r.get("modality"), r.get("bandwidth"), r.get("direction"),
                                         f"arcc={r['arcc']}" if r.get("arcc") else "") if p)
        series.setdefault((name, ""), {}).setdefault(float(r["input_len"]), []).append(float(r[metric]))
    styles = SeriesStyles(list(series))
    fig, (ax,) = _figure(1, styles.legend())
    for key, by_len in series.items():
        look = styles.style(*key)
        xs = sorted(by_len)
        ax.plot(xs, [sum(by_len[x]) / len(by_len[x]) for x in xs], marker=look.marker, ls=look.linestyle,
                color=look.colour, lw=1.8)
    lengths = [x for by_len in series.values() for x in by_len]
    _scale(ax, "x", lengths, _tokens, ticks=lengths)
    _scale(ax, "y", [v for by_len in series.values() for vs in by_len.values() for v in vs])
    ax.set_xlabel(axis_label("input_len"))
    ax.set_ylabel(axis_label(metric))
    ax.grid(True, alpha=0.3)
    return _save(fig, path, f"network comparison: {axis_label(metric)} by bandwidth and direction")


def plot_pareto(rows: Sequence[Mapping], path: Path, x: str = "mean_ttft_ms", y: str = "total_token_throughput",
                xmax: float | None = None) -> Path:
    """A panel per phase (a multi-turn item is no point on a prefill item's frontier): every
    row a point, coloured by series, and the panel's Pareto frontier as a step line."""
    from .rows import pareto_frontier

    usable = _usable(rows, x, y)
    panels = _panels(usable)
    styles, per_panel = _styles(panels)
    entries = styles.legend(lines=False) if usable else []
    if usable:
        from matplotlib.lines import Line2D

        entries.append((Line2D([], [], color="black", lw=1.4, ls="--", marker="D", mfc="none"), "Pareto frontier"))
    fig, axes = _figure(len(panels), entries, panel_height=4.5)
    for ax, (name, members), series in zip(axes, panels, per_panel):
        for (group, run), points in series.items():
            look = styles.style(group, run)
            ax.scatter([float(r[x]) for r in points], [float(r[y]) for r in points], s=30, color=look.colour,
                       marker=look.marker, alpha=0.8, zorder=3)
        frontier = pareto_frontier(members, x=x, y=y)
        if frontier:
            ax.plot([float(r[x]) for r in frontier], [float(r[y]) for r in frontier], color="black", lw=1.4,
                    ls="--", marker="D", ms=6, mfc="none", zorder=4, drawstyle="steps-post")
        if not members:
            _no_data(ax, f"no rows with {x} and {y}")
        else:
            shown = [float(r[x]) for r in members if xmax is None or float(r[x]) <= xmax]
            _scale(ax, "x", shown or [float(xmax or 0.0)])  # empty only below a given xmax
            _scale(ax, "y", [float(r[y]) for r in members])
        ax.set_title(_panel_title(name, members, len(panels) > 1), fontsize=10)
        ax.set_xlabel(axis_label(x))
        ax.set_ylabel(axis_label(y))
        ax.grid(True, alpha=0.3)
    return _save(fig, path, f"{axis_label(y)} vs {axis_label(x)} (up and left is better)")


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
    zone: Zone | None = None  # None: not compared


def _zone_colour(zone: Zone | None) -> str:
    return _ZONE_COLOURS[zone] if zone else "C0"


def plot_baseline_vs_current(points: Sequence[ComparisonPoints], path: Path) -> Path:
    """One panel per metric, with the items that have it; per item the baseline trials
    (grey) and this run's trials (coloured by verdict) as points, the baseline level as a
    bar and this run's level with its confidence interval."""
    from matplotlib.lines import Line2D

    metrics = list(dict.fromkeys(p.metric for p in points if p.current or p.baseline))
    entries: dict[str, object] = {}
    if any(p.baseline for p in points):
        entries["baseline trials"] = Line2D([], [], color="#7f7f7f", marker="o", ls="None", alpha=0.7)
    if any(p.baseline_value is not None for p in points):
        entries["baseline level"] = Line2D([], [], color="#444444", lw=2)
    for zone in dict.fromkeys(p.zone for p in points):
        entries[f"this run's trials ({zone.value if zone else 'not compared'})"] = Line2D(
            [], [], color=_zone_colour(zone), marker="o", ls="None")
    if any(p.ci_low is not None for p in points):
        entries["this run: 95% CI"] = Line2D([], [], color="#444444", marker="s", lw=1.5)
    items_per_panel = [list(dict.fromkeys(p.item for p in points if p.metric == m)) for m in metrics]
    widest = max((len(items) for items in items_per_panel), default=1)
    fig, axes = _figure(max(1, len(metrics)), [(h, label) for label, h in entries.items()],
                        width=max(8.0, min(20.0, 2.0 + 1.1 * widest)), panel_height=3.8)
    if not metrics:
        _no_data(axes[0], "no items measured")
    for ax, metric, items in zip(axes, metrics, items_per_panel):
        values = []
        for p in (p for p in points if p.metric == metric):
            i = items.index(p.item)
            if p.baseline:
                ax.scatter([i - 0.18] * len(p.baseline), p.baseline, s=18, color="#7f7f7f", alpha=0.7, zorder=3)
            if p.baseline_value is not None:
                ax.hlines(p.baseline_value, i - 0.32, i - 0.04, color="#444444", lw=2, zorder=4)
            colour = _zone_colour(p.zone)
            ax.scatter([i + 0.18] * len(p.current), p.current, s=22, color=colour, zorder=5)
            if p.current_value is not None and p.ci_low is not None and p.ci_high is not None:
                ax.errorbar([i + 0.3], [p.current_value], yerr=[[max(0.0, p.current_value - p.ci_low)],
                                                                 [max(0.0, p.ci_high - p.current_value)]],
                            fmt="s", color=colour, ms=5, capsize=4, lw=1.5, zorder=6)
                values += [p.ci_low, p.ci_high]
            values += [*p.baseline, *p.current, *(v for v in (p.baseline_value,) if v is not None)]
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels(items, rotation=20 if len(items) > 3 else 0, ha="right" if len(items) > 3 else "center",
                           fontsize=8)
        ax.set_xlim(-0.6, max(0.6, len(items) - 0.4))
        _scale(ax, "y", [v for v in values if v > 0] or values)
        ax.set_ylabel(axis_label(metric))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(f"{axis_label(metric)}: baseline vs this run (points: trials)", fontsize=10)
    return _save(fig, path, "baseline vs this run, per item and compared metric")


def plot_changes(changes: Sequence[Mapping], metrics: Sequence[str], path: Path, reference: str) -> Path:
    """The compare command's per-item change: a panel per metric, an item per row, a point
    per run at its change in percent against the ``reference`` run."""
    from matplotlib.ticker import FuncFormatter

    items = list(dict.fromkeys(c["item"] for c in changes))
    runs = list(dict.fromkeys(c["run"] for c in changes))
    styles = SeriesStyles([("", run) for run in runs])
    fig, axes = _figure(len(metrics), styles.legend(lines=False), panel_height=max(2.5, 0.9 + 0.32 * len(items)))
    for ax, metric in zip(axes, metrics):
        values = []
        for run in runs:
            look = styles.style("", run)
            mine = [(items.index(c["item"]), c[f"{metric}_change_pct"]) for c in changes
                    if c["run"] == run and c.get(f"{metric}_change_pct") is not None]
            ax.scatter([v for _, v in mine], [i for i, _ in mine], color=look.colour, marker=look.marker, s=36,
                       zorder=3)
            values += [v for _, v in mine]
        ax.axvline(0, color="#444444", lw=1)
        reach = max([abs(v) for v in values] + [1.0]) * 1.15
        ax.set_xlim(-reach, reach)
        ax.set_ylim(len(items) - 0.5, -0.5)
        ax.set_yticks(range(len(items)))
        ax.set_yticklabels(items, fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:+g}%"))
        ax.set_xlabel(f"change of {axis_label(metric)} against {reference}")
        ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path, f"per-item change against {reference}")
