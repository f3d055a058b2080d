"""How well does ``pytest_kvcache.changepoints.detect`` find change points, beside Apache Otava?

Both detectors see the same seeded, labelled synthetic series (lognormal noise, one
point per run) with the same settings (max p-value, minimum magnitude, window), and
are scored per class of series:

* ``step``: one step of 2, 5, 10 or 20% (up or down) at a random position, noise 1%;
* ``noise``: noise 1, 2 or 5%, half of the series flat, half with one step of 10%;
* ``outliers``: noise 1-2%, one to three single-run spikes of 3-5 noise widths, up or
  down, at least 5 runs apart, and no real change: every detection is a false alarm;
* ``drift``: noise 1%, a linear drift of 5-15% in total (each run's step at most half
  the noise width) and no step. A drift that large is a real change of level, so the
  correct answer is to flag it: a detection counts as right when the level after it is
  on the drift's side (higher for an upward drift), wrong otherwise, and a series
  counts as found (recall) when at least one right detection is reported. Where it is
  put is arbitrary, so there is no location error;
* ``multi``: two to four steps of 5-20%, up or down, at least 8 runs apart, noise 1%.

Series have 16 to 120 points. A detection within 2 points of a true change matches
it (one to one, closest first): precision is matched detections over all detections,
recall matched changes over all true changes, and the location error is the mean
distance of the matches. "-" where a ratio has nothing to count (no detection, or no
true change).

Otava pins its own numpy, so it runs in its own interpreter: ``--otava-python`` names
one where ``apache-otava`` is installed; the series go to it as JSON on stdin and the
change point indices (and the time it took per series) come back on stdout. Without
it, ours is printed alone. To set up Otava::

    python -m venv /tmp/otava-venv && /tmp/otava-venv/bin/pip install apache-otava
    python benchmarks/bench_changepoints.py --otava-python /tmp/otava-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path and not os.environ.get("BENCH_NO_ROOT"):
    sys.path.insert(0, str(ROOT))

from pytest_kvcache.changepoints import detect  # noqa: E402

__all__ = ["CLASSES", "Case", "Score", "make_suite", "otava_detect", "ours_detect", "score", "main"]

CLASSES = ("step", "noise", "outliers", "drift", "multi")
TOLERANCE = 2  # a detection this close to a true change finds it

#: Run by --otava-python: Otava's own split + merge analysis (E-divisive means with
#: the t-test) on each series, the same call its AnalyzedSeries makes per metric.
_OTAVA_RUNNER = r"""
import json, sys, time
from otava.analysis import compute_change_points
job = json.load(sys.stdin)
out = []
for values in job["series"]:
    t0 = time.perf_counter()
    cps, _ = compute_change_points(list(values), window_len=job["window"], max_pvalue=job["max_p"],
                                   min_magnitude=job["min_magnitude"])
    out.append({"indices": [int(c.index) for c in cps], "seconds": time.perf_counter() - t0})
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True)
class Case:
    """One labelled series."""

    cls: str  # one of CLASSES
    values: tuple[float, ...]
    changes: tuple[int, ...]  # index of the first point of each new level
    drift: int = 0  # +1 / -1: a drift up / down (then ``changes`` is empty)


def make_suite(seed: int = 0, per_class: int = 60) -> list[Case]:
    """``per_class`` series of each class, the same for a given seed."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def series(n: int, noise: float, level_factors: np.ndarray) -> tuple[float, ...]:
        base = 100.0 * float(rng.uniform(0.5, 2.0))
        return tuple(float(v) for v in base * level_factors * np.exp(rng.normal(0.0, noise, n)))

    def step_case(cls: str, n: int, noise: float, pct: float) -> Case:
        at = int(rng.integers(4, n - 4 + 1))
        levels = np.ones(n)
        levels[at:] *= 1.0 + pct / 100.0 * float(rng.choice([-1.0, 1.0]))
        return Case(cls, series(n, noise, levels), (at,))

    cases: list[Case] = []
    for i in range(per_class):
        cases.append(step_case("step", int(rng.integers(16, 121)), 0.01, (2.0, 5.0, 10.0, 20.0)[i % 4]))
    for i in range(per_class):
        n, noise = int(rng.integers(16, 121)), (0.01, 0.02, 0.05)[i % 3]
        if (i // 3) % 2:
            cases.append(step_case("noise", n, noise, 10.0))
        else:
            cases.append(Case("noise", series(n, noise, np.ones(n)), ()))
    for _ in range(per_class):
        n, noise = int(rng.integers(16, 121)), float(rng.choice([0.01, 0.02]))
        levels = np.ones(n)
        while True:  # single spikes: two side by side would be a two-run excursion
            spikes = np.sort(rng.choice(np.arange(1, n - 1), size=int(rng.integers(1, 4)), replace=False))
            if np.all(np.diff(spikes) >= 5):
                break
        for at in spikes:
            levels[at] = math.exp(float(rng.uniform(3.0, 5.0)) * noise * float(rng.choice([-1.0, 1.0])))
        cases.append(Case("outliers", series(n, noise, levels), ()))
    for _ in range(per_class):
        n = int(rng.integers(30, 121))
        total = float(rng.uniform(0.05, 0.15)) * float(rng.choice([-1.0, 1.0]))
        levels = np.exp(np.linspace(0.0, math.log1p(total), n))
        cases.append(Case("drift", series(n, 0.01, levels), (), 1 if total > 0 else -1))
    for _ in range(per_class):
        n, k = int(rng.integers(40, 121)), int(rng.integers(2, 5))
        while True:  # at least 8 runs between changes and from the ends
            at = np.sort(rng.choice(np.arange(8, n - 7), size=k, replace=False))
            if np.all(np.diff(at) >= 8):
                break
        levels = np.ones(n)
        for a in at:
            levels[a:] *= 1.0 + float(rng.uniform(0.05, 0.20)) * float(rng.choice([-1.0, 1.0]))
        cases.append(Case("multi", series(n, 0.01, levels), tuple(int(a) for a in at)))
    return cases


@dataclass
class Score:
    """What one detector got right on one class."""

    series: int = 0
    truths: int = 0  # true changes (drift: drifting series)
    detections: int = 0
    hits: int = 0  # matched detections (drift: detections on the drift's side)
    found: int = 0  # matched true changes (drift: series with a right detection)
    location_error: int = 0  # summed over matches
    located: bool = True  # False for drift: no true location to miss
    seconds: float = 0.0

    @property
    def precision(self) -> float | None:
        return self.hits / self.detections if self.detections else None

    @property
    def recall(self) -> float | None:
        return self.found / self.truths if self.truths else None

    @property
    def mae(self) -> float | None:
        return self.location_error / self.hits if self.hits and self.located else None


def _matches(detected: Sequence[int], truth: Sequence[int]) -> list[tuple[int, int]]:
    """One-to-one pairs (detection, true change) within TOLERANCE, closest first."""
    pairs = sorted((abs(d - t), d, t) for d in detected for t in truth if abs(d - t) <= TOLERANCE)
    used_d: set[int] = set()
    used_t: set[int] = set()
    out = []
    for _, d, t in pairs:
        if d not in used_d and t not in used_t:
            used_d.add(d)
            used_t.add(t)
            out.append((d, t))
    return out


def _on_drift_side(values: Sequence[float], detected: Sequence[int], sign: int) -> int:
    """How many detections have the level after them on the drift's side of the level before."""
    bounds = [0, *sorted(detected), len(values)]
    right = 0
    for i in range(1, len(bounds) - 1):
        before = values[bounds[i - 1]:bounds[i]]
        after = values[bounds[i]:bounds[i + 1]]
        delta = sum(after) / len(after) - sum(before) / len(before)
        right += (delta > 0) == (sign > 0)
    return right


def score(cases: Sequence[Case], detections: Sequence[Sequence[int]], seconds: Sequence[float]) -> dict[str, Score]:
    """Per class: the tallies of one detector's answers to ``cases``."""
    out = {cls: Score() for cls in CLASSES}
    for case, found, secs in zip(cases, detections, seconds):
        s = out[case.cls]
        s.series += 1
        s.detections += len(found)
        s.seconds += secs
        if case.drift:
            right = _on_drift_side(case.values, found, case.drift)
            s.truths += 1
            s.hits += right
            s.found += right > 0
            s.located = False
        else:
            pairs = _matches(found, case.changes)
            s.truths += len(case.changes)
            s.hits += len(pairs)
            s.found += len(pairs)
            s.location_error += sum(abs(d - t) for d, t in pairs)
    return out


def ours_detect(cases: Sequence[Case], *, max_p: float, min_change_pct: float, window: int
                ) -> tuple[list[list[int]], list[float]]:
    """Our change point indices per case, and the seconds each took."""
    detect([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])  # import numpy and scipy before the clock runs, as Otava's runner does
    found, secs = [], []
    for case in cases:
        t0 = time.perf_counter()
        cps = detect(case.values, max_p=max_p, min_change_pct=min_change_pct, window=window)
        secs.append(time.perf_counter() - t0)
        found.append([c.index for c in cps])
    return found, secs


def otava_detect(python: str, cases: Sequence[Case], *, max_p: float, min_change_pct: float, window: int
                 ) -> tuple[list[list[int]], list[float]]:
    """Otava's change point indices per case (run by ``python``), and the seconds each took."""
    job = {"series": [list(c.values) for c in cases], "max_p": max_p, "min_magnitude": min_change_pct / 100.0,
           "window": window}
    proc = subprocess.run([python, "-c", _OTAVA_RUNNER], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Otava failed (exit {proc.returncode}) under {python}:\n{proc.stderr.strip()}")
    answers = json.loads(proc.stdout)
    return [a["indices"] for a in answers], [a["seconds"] for a in answers]


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _table(results: dict[str, dict[str, Score]]) -> str:
    head = ("class", "detector", "series", "true", "found", "right", "precision", "recall", "loc.err", "ms/series")
    rows = [head]
    for cls in CLASSES:
        for name, scores in results.items():
            s = scores[cls]
            rows.append((cls, name, str(s.series), str(s.truths), str(s.detections), str(s.hits),
                         _fmt(s.precision), _fmt(s.recall), _fmt(s.mae, ".2f"),
                         f"{1000 * s.seconds / max(s.series, 1):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _at_least_as_good(ours: Score, theirs: Score) -> bool:
    # An undefined ratio (nothing detected, or nothing to find) is no error: count it as 1.
    def v(x: float | None) -> float:
        return 1.0 if x is None else x

    return v(ours.precision) >= v(theirs.precision) and v(ours.recall) >= v(theirs.recall)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--otava-python", help="an interpreter with apache-otava installed")
    ap.add_argument("--per-class", type=int, default=200, help="series per class (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-p", type=float, default=0.001)
    ap.add_argument("--min-change-pct", type=float, default=0.0)
    ap.add_argument("--window", type=int, default=30)
    args = ap.parse_args(argv)
    settings = {"max_p": args.max_p, "min_change_pct": args.min_change_pct, "window": args.window}
    cases = make_suite(args.seed, args.per_class)
    print(f"{len(cases)} series, seed {args.seed}; max_p={args.max_p}, min_change_pct={args.min_change_pct}, "
          f"window={args.window}; a detection within {TOLERANCE} points of a true change finds it")
    runs: dict[str, Callable[[], tuple[list[list[int]], list[float]]]] = {
        "ours": lambda: ours_detect(cases, **settings)}
    if args.otava_python:
        runs["otava"] = lambda: otava_detect(args.otava_python, cases, **settings)
    results = {name: score(cases, *run()) for name, run in runs.items()}
    print(_table(results))
    if "otava" not in results:
        print("\nOtava not run: give --otava-python, an interpreter with apache-otava installed, e.g.\n"
              "  python -m venv /tmp/otava-venv && /tmp/otava-venv/bin/pip install apache-otava\n"
              "  python benchmarks/bench_changepoints.py --otava-python /tmp/otava-venv/bin/python")
        return 0
    worse = [cls for cls in CLASSES if not _at_least_as_good(results["ours"][cls], results["otava"][cls])]
    print("\nours at least as good as Otava (precision and recall) on every class: "
          + ("yes" if not worse else f"no: {', '.join(worse)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
