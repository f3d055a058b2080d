"""PNG plot of one history series (one point per run) with its change points.

matplotlib is imported inside the function, with the Agg backend, so nothing needs a
display. Like the other plots, the y axis starts at zero (a 5% change should look like
one) and carries its unit in ``ylabel``.
"""

from __future__ import annotations

import math
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..changepoints import ChangePoint

__all__ = ["plot_history", "plot_series", "series_plot_name"]

#: At most this many run labels on the x axis; the others are thinned out.
_MAX_TICKS = 40


def plot_series(path: Path, labels: Sequence[str], values: Sequence[float], change_points: Sequence[ChangePoint],
                *, title: str, ylabel: str) -> Path:
    """Draw ``values`` (one per run, oldest first, labelled by ``labels``) with the mean
    of each segment between change points as a horizontal line, and each change point as
    a vertical line (between the last run before it and the first after) annotated with
    its change in percent. Write it to ``path`` as a PNG and return ``path``.

    ``ylabel`` should name the unit, e.g. ``"mean TTFT (ms)"``. Up to ~200 runs stay
    readable: the figure widens with the runs and only every k-th label is printed (the
    first run of each new segment always is).
    """
    n = len(values)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} values")
    cps = sorted(change_points, key=lambda c: c.index)
    for cp in cps:
        if not 0 < cp.index < n:
            raise ValueError(f"change point at index {cp.index} is outside the series of {n} runs")

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(20.0, max(8.0, 0.09 * n + 3.0)), 5.0))
    xs = list(range(n))
    ax.plot(xs, values, marker="o", markersize=3 if n > 60 else 4, linewidth=0.8, color="C0", label="run")
    bounds = [0, *(c.index for c in cps), n]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b > a:
            mean = math.fsum(values[a:b]) / (b - a)
            # one legend entry for every segment (matplotlib leaves out labels that start with "_")
            ax.hlines(mean, a - 0.4, b - 0.6, colors="C1", linewidth=2.0,
                      label="segment mean" if k == 0 else "_nolegend_")
    top = max(values, default=1.0) * 1.15
    for k, cp in enumerate(cps):
        ax.axvline(cp.index - 0.5, color="C3", linestyle="--", linewidth=1.2, label="change point" if k == 0 else None)
        ax.annotate(f"{cp.change_pct:+.1f}%", xy=(cp.index - 0.5, top * 0.97), xytext=(3, 0),
                    textcoords="offset points", ha="left", va="top", fontsize=9, color="C3", fontweight="bold")
    ax.set_xlim(-1, max(n, 1))
    ax.set_ylim(0, top)
    ticks = _ticks(n, [c.index for c in cps])
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(labels[i]) for i in ticks], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("run")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if n:
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ticks(n: int, keep: Sequence[int]) -> list[int]:
    """Every k-th run (at most ``_MAX_TICKS``) plus ``keep``, without near-overlaps."""
    step = max(1, math.ceil(n / _MAX_TICKS))
    keep_set = set(keep)
    regular = [i for i in range(0, n, step) if all(abs(i - k) * 2 >= step for k in keep_set if k != i)]
    return sorted(set(regular) | keep_set)


def series_plot_name(series: Any) -> str:
    """A file name for a history series' plot, safe for any item name; items whose safe
    names read alike stay apart by a digest of the real name."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "item"

    digest = hashlib.sha256(series.item.encode()).hexdigest()[:8]
    return f"{safe(series.item)}-{digest}.{safe(series.metric)}.{series.testbed_id[:8]}.png"


def plot_history(found: Sequence[tuple[Any, Sequence[ChangePoint]]], folder: Path) -> list[Path]:
    """One PNG per history series (``history.Series`` with its change points) in ``folder``."""
    import datetime

    from ..history import parse_time
    from .plots import axis_label

    def short(text: str) -> str:
        return parse_time(text).astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")

    folder.mkdir(parents=True, exist_ok=True)
    return [plot_series(folder / series_plot_name(s), [short(p.time) for p in s.points], s.values, points,
                        title=f"{s.item} - {s.metric} - testbed {s.testbed_id}", ylabel=axis_label(s.metric))
            for s, points in found]
