"""Change points in a series of benchmark results (one point per run, oldest first).

The method is E-divisive means with a Student t-test for significance, as used by
MongoDB's CI (Daly et al., ICPE 2020) and Apache Otava, formerly DataStax Hunter
(Fleming et al., ICPE 2023). It runs in two passes:

1. **Split.** The series is cut into windows of ``window`` points that overlap by half.
   In each window the E-divisive statistic q-hat of Matteson & James (2014), with
   exponent alpha = 1, picks the split ``tau`` (and the end ``kappa`` of the part after
   it) that best separates two distributions; a t-test between the points either side
   of it (``[start, tau)`` against ``[tau, kappa)``) decides whether it is kept. Each
   part is then bisected the same way until no part's best split passes. This pass
   uses a looser threshold (``10 * max_p``): it only proposes candidates.
2. **Merge.** Each candidate is tested again against the whole segments either side of
   it (up to its neighbouring candidates), and the weakest is dropped, its neighbours
   re-tested, until every change point left passes, in this order:

   a. its p-value is at most ``max_p`` (and each segment has ``min_segment`` points or
      more). The t-test must pass with any *suspect* run left out too: a run more than
      3 noise widths from the rest of its segment, or any run of a segment of 3 runs
      or fewer. So a change never rests on one spike;
   b. a *transient* - a segment that goes up and comes back down, or down and back
      up - keeps its two change points only if the weaker one's p-value, multiplied by
      the number of places a segment that long fits between their neighbours, is still
      at most ``max_p``;
   c. its change is at least ``min_change_pct``;

   then each change point is moved, between its neighbours, to the split where its
   t-test is most significant (the least-squares split on the log scale), and the
   checks run again until nothing moves.

Windows keep a large change in one part of a long series from hiding a small one in
another part, and bound the cost (q-hat is quadratic in the points it looks at).

The suspect runs of (a), step (b) and the final move are ours, not Otava's. Picking the
best of many splits makes a t-test's p-value look stronger than it is, most of all for
a short segment, which can be placed almost anywhere: with plain t-tests, a quarter of
flat series of 300 points showed two change points around a short blip of noise at
``max_p = 0.001``. A transient is where that happens; a step that stays is left to the
plain test, so the newest runs of a regression are reported as soon as ``min_segment``
of them agree (and each of them shows it). The move puts a change where all the
points, not one window's, place it. ``docs/changepoints.md`` has the figures.

**Log scale.** Detection runs on ``log(values)``. Performance figures are positive and
their noise is multiplicative (a run is "2% slower", not "3 ms slower"), so a
regression of a given percentage is the same shift in log space at any level, and the
noise has one width before and after a change, which the t-test assumes. Latency
distributions are skewed to the right; the log makes them more symmetric, so one slow
run weighs less like a shift. Reported means and percentages are in the series' units.

Nothing here is random: the same series always gives the same change points (the
original E-divisive's permutation test is not used). numpy and scipy are imported
inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ChangePoint", "detect"]

#: The split pass's threshold is this many times ``max_p`` (capped at 0.5): candidates
#: are cheap, since the merge pass re-tests each one at ``max_p`` on longer segments.
_SPLIT_P_FACTOR = 10.0
_SPLIT_P_CAP = 0.5
#: A run this many noise widths (pooled sd) from the rest of its segment is suspect:
#: a change point's t-test must pass without it. Noise goes this far once in a few
#: hundred runs, so plain steps rarely lose power to it.
_OUTLIER_SD = 3.0
#: In a segment of at most this many runs every run is suspect: one spike moves its mean
#: by a third of its size or more, and which run is the odd one can't be told.
_SMALL_SEGMENT = 3


@dataclass(frozen=True)
class ChangePoint:
    """A change in the level of a series.

    ``index`` is the first point of the new segment. ``p`` is the two-sided Student
    t-test's p-value between the segments either side (on the log scale), each reaching
    to the neighbouring change point or the end of the series, and the largest of those
    with one suspect run left out (see :func:`detect`); the means are the arithmetic
    means of those segments, in the series' units.
    """

    index: int  # index of the first point of the new segment
    p: float  # significance of the change (t-test between the segments either side)
    mean_before: float  # mean of the segment before (up to the previous change point)
    mean_after: float  # mean of the segment after (up to the next change point)

    @property
    def change_pct(self) -> float:
        """The relative change of the mean, in percent (positive: the figure went up)."""
        return (self.mean_after / self.mean_before - 1.0) * 100.0


def detect(
    values: Sequence[float],
    *,
    max_p: float = 0.001,
    min_change_pct: float = 0.0,
    window: int = 30,
    min_segment: int = 2,
) -> list[ChangePoint]:
    """Find the change points of a series of positive figures, oldest first.

    :param values: one figure per run (latency, throughput, ...): finite and positive.
    :param max_p: a change point is reported when the t-test between the segments either
        side gives a p-value at most this (Otava's default, 0.001). With it, 1-3 flat
        series in a hundred (of 30 to 300 points, 1% noise) show a false change point.
    :param min_change_pct: a change point is reported only if its segments' means
        differ by at least this many percent, either way round (a rise of 10% and the
        fall of 9.1% back count alike); 0 reports every significant change.
    :param window: the split pass looks at this many points at a time (windows overlap
        by half). 30 nightly runs is a month: long enough for the t-test to see a step
        of 2-3 noise widths, short enough that a larger change elsewhere doesn't mask it.
    :param min_segment: the fewest points a segment may have. With 2, one odd run (a
        spike) is never a segment of its own, and a change at the end of the series is
        reported once a second run confirms it (each of the two must show it).
    :returns: the change points, by index.
    :raises ValueError: when a value is not a finite positive number (naming its index)
        or a parameter is out of range.

    A slow drift whose steps are each under the noise is reported as a staircase: once
    it has moved the level clearly, one or more change points, each in the drift's
    direction, where the accumulated change became significant. A drift that stays
    within the noise gives none.
    """
    if not 0.0 < max_p <= 1.0:
        raise ValueError(f"max_p must be in (0, 1], got {max_p!r}")
    if not (math.isfinite(min_change_pct) and min_change_pct >= 0.0):
        raise ValueError(f"min_change_pct must be a finite number >= 0, got {min_change_pct!r}")
    if min_segment < 1:
        raise ValueError(f"min_segment must be >= 1, got {min_segment!r}")
    if window < 2 * min_segment:
        raise ValueError(f"window must be at least 2 * min_segment = {2 * min_segment}, got {window!r}")
    raw = _checked(values)
    n = len(raw)
    # Two points can't tell a change from noise: the t-test would have no degree of freedom.
    if n < max(3, 2 * min_segment):
        return []

    import numpy as np

    y = np.asarray(raw, dtype=float)
    x = np.log(y)
    sums = _Sums.of(x - x.mean())  # centred, so the sums of squares keep their precision
    split_p = max(max_p, min(_SPLIT_P_FACTOR * max_p, _SPLIT_P_CAP))
    candidates: set[int] = set()
    step = max(1, window // 2)
    start = 0
    while True:
        stop = min(start + window, n)
        candidates.update(_bisect(x, sums, start, stop, split_p, min_segment))
        if stop == n:
            break
        start += step
    cps = _merge(sorted(candidates), sums, max_p, min_change_pct, min_segment, y)
    bounds = [0, *cps, n]
    return [ChangePoint(cp, sums.robust_p(bounds[i], cp, bounds[i + 2]), float(y[bounds[i]:cp].mean()),
                        float(y[cp:bounds[i + 2]].mean())) for i, cp in enumerate(cps)]


def _checked(values: Sequence[float]) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"values[{i}] = {v!r} is not a number") from None
        if not (math.isfinite(f) and f > 0.0):
            raise ValueError(f"values[{i}] = {v!r} is not a finite positive number")
        out.append(f)
    return out


@dataclass(frozen=True)
class _Sums:
    """A series with prefix sums of it and of its squares: any segment's mean, or a
    t-test, in O(1)."""

    x: np.ndarray
    s: np.ndarray  # s[i] = sum of x[:i]
    s2: np.ndarray  # s2[i] = sum of x[:i] ** 2

    @staticmethod
    def of(x: np.ndarray) -> _Sums:
        import numpy as np

        return _Sums(x, np.concatenate(([0.0], np.cumsum(x))), np.concatenate(([0.0], np.cumsum(x * x))))

    def mean(self, a: int, b: int) -> float:
        return float(self.s[b] - self.s[a]) / (b - a)

    def ss(self, a: int, b: int) -> float:
        """Sum of squared deviations from the mean of ``x[a:b]``."""
        total = float(self.s[b] - self.s[a])
        return max(0.0, float(self.s2[b] - self.s2[a]) - total * total / (b - a))

    def p(self, a: int, cut: int, b: int) -> float:
        """Two-sided Student t-test (pooled variance) of ``x[a:cut]`` against ``x[cut:b]``."""
        if cut <= a or b <= cut:
            return 1.0
        return _student_p(cut - a, self.mean(a, cut), self.ss(a, cut), b - cut, self.mean(cut, b), self.ss(cut, b))

    def robust_p(self, a: int, cut: int, b: int) -> float:
        """:meth:`p`, or the largest p-value with one suspect run left out (see
        ``_OUTLIER_SD`` and ``_SMALL_SEGMENT``) if that is larger: a change must not rest
        on one spike."""
        import numpy as np
        from scipy.special import stdtr

        plain = self.p(a, cut, b)
        n1, n2 = cut - a, b - cut
        if n1 < 1 or n2 < 1 or n1 + n2 < 4:
            return plain
        m1, m2, ss1, ss2 = self.mean(a, cut), self.mean(cut, b), self.ss(a, cut), self.ss(cut, b)
        # Without each run in turn, side by side: its side's count, mean and sum of squares
        # (a side of one run can't lose it).
        v1 = self.x[a:cut] if n1 > 1 else np.empty(0)
        v2 = self.x[cut:b] if n2 > 1 else np.empty(0)
        out1, out2 = len(v1), len(v2)
        count1 = np.concatenate((np.full(out1, n1 - 1.0), np.full(out2, float(n1))))
        count2 = np.concatenate((np.full(out1, float(n2)), np.full(out2, n2 - 1.0)))
        mean1 = np.concatenate(((m1 * n1 - v1) / max(n1 - 1, 1), np.full(out2, m1)))
        mean2 = np.concatenate((np.full(out1, m2), (m2 * n2 - v2) / max(n2 - 1, 1)))
        ss_1 = np.concatenate((ss1 - (v1 - m1) ** 2 * n1 / max(n1 - 1, 1), np.full(out2, ss1)))
        ss_2 = np.concatenate((np.full(out1, ss2), ss2 - (v2 - m2) ** 2 * n2 / max(n2 - 1, 1)))
        df = count1 + count2 - 2.0
        sd = np.sqrt(np.maximum(ss_1 + ss_2, 0.0) / df)
        # How far the run left out lies from the rest of its segment, in noise widths.
        rest_mean = np.concatenate((mean1[:out1], mean2[out1:]))
        rest_count = np.concatenate((count1[:out1], count2[out1:]))
        gap = np.abs(np.concatenate((v1, v2)) - rest_mean)
        suspect = (gap > _OUTLIER_SD * sd * np.sqrt(1.0 + 1.0 / rest_count)) | (rest_count < _SMALL_SEGMENT)
        if not suspect.any():
            return plain
        se = (sd * np.sqrt(1.0 / count1 + 1.0 / count2))[suspect]
        diff = np.abs(mean2 - mean1)[suspect]
        t = np.where(se > 0.0, diff / np.where(se > 0.0, se, 1.0), np.where(diff > 0.0, np.inf, 0.0))
        return max(plain, float(2.0 * stdtr(df[suspect], -t).max()))


def _student_p(n1: int, mean1: float, ss1: float, n2: int, mean2: float, ss2: float) -> float:
    """Two-sided Student t-test (pooled variance) from each side's count, mean and sum of squares."""
    from scipy.special import stdtr

    df = n1 + n2 - 2
    if n1 < 1 or n2 < 1 or df < 1:
        return 1.0
    diff = mean2 - mean1
    se = math.sqrt((ss1 + ss2) / df * (1.0 / n1 + 1.0 / n2))
    # Both segments constant (to rounding): any difference is certain, none is no change.
    if se <= 1e-12 * (abs(diff) + 1e-300):
        return 0.0 if diff != 0.0 else 1.0
    return float(2.0 * stdtr(df, -abs(diff) / se))


def _bisect(x: np.ndarray, sums: _Sums, start: int, stop: int, split_p: float, min_segment: int) -> list[int]:
    """E-divisive within ``x[start:stop]``: the split points that pass ``split_p``."""
    import numpy as np

    w = x[start:stop]
    # prefix[i, j] = sum of |w_a - w_b| over a < i, b < j: any block sum in O(1).
    prefix = np.zeros((len(w) + 1, len(w) + 1))
    prefix[1:, 1:] = np.abs(w[:, None] - w[None, :]).cumsum(axis=0).cumsum(axis=1)
    # each open segment (a, b) of the window -> its best split (q-hat, tau, kappa)
    open_segments = {(0, len(w)): _best_split(prefix, 0, len(w), min_segment)}
    found: list[int] = []
    while True:
        ranked = [(cand, seg) for seg, cand in open_segments.items() if cand is not None]
        if not ranked:
            return found
        (_, tau, kappa), (a, b) = max(ranked)
        del open_segments[(a, b)]
        # Test the two parts q-hat compared: what lies after kappa may be another level,
        # which would blur the difference of the means. A part that fails is closed, and
        # the others are still tried: each is tested on its own points.
        if sums.p(start + a, start + tau, start + kappa) <= split_p:
            found.append(start + tau)
            open_segments[(a, tau)] = _best_split(prefix, a, tau, min_segment)
            open_segments[(tau, b)] = _best_split(prefix, tau, b, min_segment)


def _best_split(prefix: np.ndarray, a: int, b: int, min_segment: int) -> tuple[float, int, int] | None:
    """The split ``tau`` of ``[a, b)`` with the largest q-hat, maximised over the end
    ``kappa`` of the second part too (Matteson & James), with that q-hat and ``kappa``."""
    import numpy as np

    m = min_segment
    if b - a < 2 * m:
        return None
    tau = np.arange(a + m, b - m + 1)[:, None]
    kappa = np.arange(a + 2 * m, b + 1)[None, :]
    ok = kappa - tau >= m
    tau_b, kappa_b = np.broadcast_arrays(tau, kappa)
    t, k = np.where(ok, tau_b, a + m), np.where(ok, kappa_b, b)  # keep indices valid where masked
    n_x, n_y = t - a, k - t
    between = prefix[t, k] - prefix[a, k] - prefix[t, t] + prefix[a, t]
    within_x = (prefix[t, t] - 2 * prefix[a, t] + prefix[a, a]) / 2
    within_y = (prefix[k, k] - 2 * prefix[t, k] + prefix[t, t]) / 2
    total = n_x + n_y
    # q-hat = (n_x n_y / total) * energy distance; a one-point part has no within pairs.
    q = (2 * between / total
         - 2 * n_y * within_x / (total * np.maximum(n_x - 1, 1))
         - 2 * n_x * within_y / (total * np.maximum(n_y - 1, 1)))
    q = np.where(ok, q, -np.inf)
    i, j = np.unravel_index(int(np.argmax(q)), q.shape)
    return float(q[i, j]), int(a + m + i), int(a + 2 * m + j)


def _magnitude_pct(before: float, after: float) -> float:
    return max(abs(after / before - 1.0), abs(before / after - 1.0)) * 100.0


def _merge(cps: list[int], sums: _Sums, max_p: float, min_change_pct: float, min_segment: int,
           y: np.ndarray) -> list[int]:
    """Drop the weakest candidate, then move the rest, until all pass (see the module's doc)."""
    n = len(sums.s) - 1
    p_of: dict[tuple[int, int, int], float] = {}  # a drop or a move changes only its neighbours' tests
    while True:
        bounds = [0, *cps, n]
        tests = []  # (too short, p) per change point: overlapping windows may propose neighbours
        for i, cp in enumerate(cps):
            key = (bounds[i], cp, bounds[i + 2])
            if key not in p_of:
                p_of[key] = sums.robust_p(*key)
            tests.append((min(cp - bounds[i], bounds[i + 2] - cp) < min_segment, p_of[key]))
        drop = _weakest(tests, max_p)
        if drop is None:
            drop = _weakest_transient(cps, bounds, tests, sums, max_p)
        if drop is None and min_change_pct > 0.0:
            changes = [_magnitude_pct(float(y[bounds[i]:cp].mean()), float(y[cp:bounds[i + 2]].mean()))
                       for i, cp in enumerate(cps)]
            smallest = min(range(len(cps)), key=changes.__getitem__, default=None)
            if smallest is not None and changes[smallest] < min_change_pct:
                drop = smallest
        if drop is not None:
            del cps[drop]
        elif not _moved(cps, sums, min_segment):
            return cps


def _weakest(tests: list[tuple[bool, float]], max_p: float) -> int | None:
    """The change point with a too-short segment or the largest p-value over ``max_p``."""
    if not tests:
        return None
    worst = max(range(len(tests)), key=tests.__getitem__)
    return worst if tests[worst][0] or tests[worst][1] > max_p else None


def _weakest_transient(cps: list[int], bounds: list[int], tests: list[tuple[bool, float]], sums: _Sums,
                       max_p: float) -> int | None:
    """The weaker change point of the least significant transient that fails ``max_p``."""
    worst: tuple[float, int] | None = None
    for i in range(len(cps) - 1):
        before, inner, after = (sums.mean(bounds[i], cps[i]), sums.mean(cps[i], cps[i + 1]),
                                sums.mean(cps[i + 1], bounds[i + 3]))
        if (inner - before) * (after - inner) >= 0.0:
            continue  # a staircase, not a transient
        weaker = i if tests[i][1] >= tests[i + 1][1] else i + 1
        # Bonferroni over where a segment this long could have been put between the neighbours.
        places = (bounds[i + 3] - bounds[i]) - (cps[i + 1] - cps[i]) + 1
        p = tests[weaker][1] * places
        if p > max_p and (worst is None or p > worst[0]):
            worst = (p, weaker)
    return None if worst is None else worst[1]


def _moved(cps: list[int], sums: _Sums, min_segment: int) -> bool:
    """Move each change point, between its neighbours, to the least-squares split (where
    its plain t-test is most significant); whether any moved. Each move lowers the sum of
    squares within segments and drops only lower the count, so the merge can't cycle."""
    import numpy as np

    n = len(sums.s) - 1
    moved = False
    for i, cp in enumerate(cps):
        a = cps[i - 1] if i else 0
        b = cps[i + 1] if i + 1 < len(cps) else n
        taus = np.arange(a + min_segment, b - min_segment + 1)
        if len(taus) == 0:
            continue
        n1, n2 = taus - a, b - taus
        gap = (sums.s[taus] - sums.s[a]) / n1 - (sums.s[b] - sums.s[taus]) / n2
        between = n1 * n2 / (n1 + n2) * gap * gap  # the between-segments sum of squares
        best = int(np.argmax(between))
        here = cp - a - min_segment
        if 0 <= here < len(taus) and between[best] <= between[here] * (1.0 + 1e-9):
            continue
        cps[i] = int(taus[best])
        moved = True
    return moved
