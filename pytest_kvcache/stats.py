"""Run-level statistics: comparisons, verdicts, multiplicity control, detectable effect.

The unit of comparison is the *trial* (DESIGN.md section 4). For one metric (say the
median TTFT of each trial) there are ``k`` baseline trial values and ``m`` current trial
values, all positive. Everything is done on the natural-log scale, so effects are ratios
(``current / baseline`` of geometric means) and noise is relative.

Tests, chosen by the trial counts (``MetricComparison.test``):

``"welch"``
    Both sides have >= 2 trials: one-sided Welch t test on the log values; the same
    statistic as ``scipy.stats.ttest_ind(log_current, log_baseline, equal_var=False,
    alternative=...)`` (the test suite checks they agree), computed here so that the
    variance floor below can be applied and so it can be vectorized
    (:func:`compare_batch`).
``"prediction"``
    One current trial against >= 3 baseline trials (or, symmetrically, one baseline
    trial against >= 3 current trials): the single value is compared with a prediction
    interval from the other side, ``t`` with ``n - 1`` df and scale
    ``sd * sqrt(1 + 1/n)``.
``"exact-equal"``
    Every value on both sides is identical: no evidence of any change,
    ``p_worse = p_better = 1``.
``"insufficient"``
    Too few trials to estimate the noise (1 vs 1, 1 vs 2, 2 vs 1): no test is possible;
    ``p_worse = p_better = 1`` so it can never be significant, and the note says why.

Variance floor: emulators can be almost deterministic, and a zero variance makes the t
statistic infinite or nan. Each side's log-scale standard deviation is therefore floored
at :data:`SD_LOG_FLOOR` = 0.001 (about 0.1% relative noise) before testing. Real noise
(a few percent) is far above it; identical samples give a finite t of 0, and a clear
shift between two deterministic samples gives a tiny p, never nan. The note says when
the floor was used.

Confidence interval: ``ci_low``/``ci_high`` bound the ratio with a two-sided interval at
``confidence`` (default 95%, independent of ``alpha``) from the same t distribution as
the test (Welch-Satterthwaite df, or the prediction df). When both sides have >= 8
trials a percentile bootstrap interval of the geometric-mean ratio is added
(``bootstrap_low``/``bootstrap_high``); with fewer trials a bootstrap is too coarse to
mean anything, so those stay None.

Detectable effect: ``mde_pct`` is the smallest true change in the bad direction that a
one-sided test at ``alpha`` detects with 80% power, from the pooled (floored) log-scale
noise and the trial counts, with the usual t approximation
``delta = (t[1-alpha, df] + t[power, df]) * sd * sqrt(1/n1 + 1/n2)``, ``df = n1 + n2 - 2``
(see :func:`minimum_detectable_effect`).

This module does not import pytest; scipy and numpy are imported lazily.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "BOOTSTRAP_MIN_TRIALS",
    "PREDICTION_MIN_HISTORY",
    "SD_LOG_FLOOR",
    "Direction",
    "MetricComparison",
    "Verdict",
    "Zone",
    "benjamini_hochberg",
    "bootstrap_ratio_ci",
    "compare",
    "compare_batch",
    "compare_paired",
    "holm",
    "mann_whitney",
    "minimum_detectable_effect",
    "rank_test_allowed",
    "threshold_log",
    "trials_needed",
    "verdict",
]

#: Floor on each side's log-scale standard deviation (about 0.1% relative noise).
SD_LOG_FLOOR: float = 1e-3
#: Both sides need at least this many trials for the bootstrap interval.
BOOTSTRAP_MIN_TRIALS: int = 8
#: A single trial is tested against a prediction interval from at least this many.
PREDICTION_MIN_HISTORY: int = 3


class Direction(str, enum.Enum):
    """Which way a metric gets better."""

    LOWER_IS_BETTER = "lower"  # latencies: TTFT, TPOT, ITL, E2E
    HIGHER_IS_BETTER = "higher"  # throughputs, hit rates

    @classmethod
    def coerce(cls, value: Direction | str) -> Direction:
        """Accept a Direction or its string value ("lower"/"higher")."""
        if isinstance(value, Direction):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"direction must be 'lower' or 'higher', got {value!r}"
            ) from None


class Zone(str, enum.Enum):
    """The three outcomes of a comparison (DESIGN.md section 4)."""

    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class MetricComparison:
    """The comparison of one metric's current trials with its baseline trials.

    Values are geometric means of the trial values; ``ratio = current / baseline``;
    ``change_pct = (ratio - 1) * 100`` (signed, not direction-aware). ``p_worse`` and
    ``p_better`` are one-sided, uncorrected p-values; correct them over the session with
    :func:`holm` before calling :func:`verdict`. Optional fields are None when they do
    not apply (see the module docstring); ``note`` explains degenerate cases.
    """

    metric: str
    direction: Direction
    threshold: float
    alpha: float
    confidence: float
    n_baseline: int
    n_current: int
    baseline_value: float
    current_value: float
    ratio: float
    change_pct: float
    ci_low: float | None
    ci_high: float | None
    p_worse: float
    p_better: float
    test: str
    sd_log: float | None
    mde_pct: float | None
    trials_needed: int | None
    note: str
    bootstrap_low: float | None = None
    bootstrap_high: float | None = None
    p_worse_rank: float | None = None

    @property
    def worse_pct(self) -> float:
        """Relative change in the bad direction, in percent (negative = better)."""
        if self.direction is Direction.LOWER_IS_BETTER:
            return (self.ratio - 1.0) * 100.0
        return (1.0 - self.ratio) * 100.0

    @property
    def beyond_threshold(self) -> bool:
        """Whether the point estimate is worse than the threshold."""
        if self.direction is Direction.LOWER_IS_BETTER:
            return self.ratio > 1.0 + self.threshold
        return self.ratio < 1.0 - self.threshold

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (enums as their string values)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.value if isinstance(value, enum.Enum) else value
        return out


@dataclass(frozen=True)
class Verdict:
    """The zone of one comparison after multiplicity correction, with a reason."""

    metric: str
    zone: Zone
    reason: str
    significant: bool  # significantly worse after correction
    beyond_threshold: bool  # point estimate worse than the practical threshold
    better: bool  # significantly better after correction
    p_worse_adjusted: float
    p_better_adjusted: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the zone as its string value)."""
        return {
            "metric": self.metric,
            "zone": self.zone.value,
            "reason": self.reason,
            "significant": self.significant,
            "beyond_threshold": self.beyond_threshold,
            "better": self.better,
            "p_worse_adjusted": self.p_worse_adjusted,
            "p_better_adjusted": self.p_better_adjusted,
        }


# --------------------------------------------------------------------------- helpers


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")


def _check_threshold(threshold: float, direction: Direction) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive fraction (0.10 = 10%), got {threshold!r}")
    if direction is Direction.HIGHER_IS_BETTER and threshold >= 1.0:
        raise ValueError(
            f"threshold {threshold!r} must be < 1 for a higher-is-better metric "
            "(it means a drop to ratio 1 - threshold)"
        )


def threshold_log(threshold: float, direction: Direction | str) -> float:
    """The practical threshold as a positive log-scale distance in the bad direction.

    ``log(1 + threshold)`` for lower-is-better, ``-log(1 - threshold)`` for
    higher-is-better (a 5% throughput drop is ratio 0.95).
    """
    d = Direction.coerce(direction)
    _check_threshold(threshold, d)
    if d is Direction.LOWER_IS_BETTER:
        return math.log1p(threshold)
    return -math.log1p(-threshold)


def _pct_from_log(delta: float, direction: Direction) -> float:
    """A positive log distance in the bad direction as a relative change in percent."""
    if direction is Direction.LOWER_IS_BETTER:
        return math.expm1(delta) * 100.0
    return -math.expm1(-delta) * 100.0


def _log_values(metric: str, side: str, values: Sequence[float]) -> np.ndarray:
    import numpy as np

    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"metric {metric!r}: {side} values must be numbers, got {values!r}") from None
    if arr.size == 0:
        raise ValueError(f"metric {metric!r}: no {side} trial values")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise ValueError(
            f"metric {metric!r}: {side} values must be finite and > 0 (compared on the "
            f"log scale), got {arr[bad].tolist()}"
        )
    return np.log(arr)


def _welch_core(
    lx: np.ndarray, ly: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Welch statistics for rows of log values, with the variance floor.

    ``lx`` is (..., n1) baseline, ``ly`` is (..., n2) current, both with n >= 2.
    Returns (diff, se, df, t, floored) where diff = mean(ly) - mean(lx).
    """
    import numpy as np

    n1 = lx.shape[-1]
    n2 = ly.shape[-1]
    v1 = lx.var(axis=-1, ddof=1)
    v2 = ly.var(axis=-1, ddof=1)
    floor = SD_LOG_FLOOR**2
    floored = (v1 < floor) | (v2 < floor)
    v1 = np.maximum(v1, floor)
    v2 = np.maximum(v2, floor)
    a = v1 / n1
    b = v2 / n2
    se = np.sqrt(a + b)
    df = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1))
    diff = ly.mean(axis=-1) - lx.mean(axis=-1)
    t = diff / se
    return diff, se, df, t, floored


def _one_sided(t: Any, df: Any, direction: Direction) -> tuple[Any, Any]:
    """(p_worse, p_better) for a statistic t of (log current - log baseline)."""
    from scipy import stats as st

    p_up = st.t.sf(t, df)  # evidence that current > baseline
    p_down = st.t.cdf(t, df)  # evidence that current < baseline
    if direction is Direction.LOWER_IS_BETTER:
        return p_up, p_down
    return p_down, p_up


# --------------------------------------------------------------------------- compare


def compare(
    metric: str,
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    direction: Direction | str,
    threshold: float,
    alpha: float = 0.05,
    confidence: float = 0.95,
    power: float = 0.8,
) -> MetricComparison:
    """Compare one metric's current trial values with its baseline trial values.

    ``baseline`` and ``current`` are per-trial values (positive floats, e.g. the median
    TTFT of each trial). See the module docstring for the test chosen and the
    degenerate cases. Raises ValueError naming the metric for empty sides and for
    non-finite or non-positive values.
    """
    import numpy as np
    from scipy import stats as st

    d = Direction.coerce(direction)
    _check_threshold(threshold, d)
    _check_alpha(alpha)
    _check_alpha(confidence, "confidence")
    _check_alpha(power, "power")
    lx = _log_values(metric, "baseline", baseline)
    ly = _log_values(metric, "current", current)
    n1, n2 = int(lx.size), int(ly.size)
    mx, my = float(lx.mean()), float(ly.mean())
    diff = my - mx
    ratio = math.exp(diff)
    q = 0.5 + confidence / 2.0
    notes: list[str] = []

    # pooled, floored noise from the sides that have >= 2 trials
    ss = 0.0
    pooled_df = 0
    for arr in (lx, ly):
        if arr.size >= 2:
            ss += float(((arr - arr.mean()) ** 2).sum())
            pooled_df += arr.size - 1
    sd_log: float | None
    if pooled_df > 0:
        sd_log = max(math.sqrt(ss / pooled_df), SD_LOG_FLOOR)
    else:
        sd_log = None

    ci_low: float | None = None
    ci_high: float | None = None
    all_equal = bool(np.all(lx == lx[0]) and np.all(ly == lx[0]))

    if all_equal and (n1 >= 2 or n2 >= 2):
        test = "exact-equal"
        p_worse = p_better = 1.0
        notes.append(
            "all trial values are identical on both sides: no evidence of a change"
        )
        if n1 >= 2 and n2 >= 2:
            diff_a, se_a, df_a, _t, _f = _welch_core(lx, ly)
            half = float(st.t.ppf(q, float(df_a)) * se_a)
            ci_low, ci_high = math.exp(-half), math.exp(half)
    elif n1 >= 2 and n2 >= 2:
        test = "welch"
        diff_a, se_a, df_a, t_a, floored = _welch_core(lx, ly)
        pw, pb = _one_sided(float(t_a), float(df_a), d)
        p_worse, p_better = float(pw), float(pb)
        half = float(st.t.ppf(q, float(df_a)) * se_a)
        ci_low, ci_high = math.exp(diff - half), math.exp(diff + half)
        if bool(floored):
            notes.append(
                f"trial-to-trial noise below the floor ({SD_LOG_FLOOR:g} on the log "
                "scale, ~0.1%) on at least one side; the floor was used"
            )
    elif min(n1, n2) == 1 and max(n1, n2) >= PREDICTION_MIN_HISTORY:
        test = "prediction"
        hist = lx if n1 > 1 else ly
        n = int(hist.size)
        s = max(float(hist.std(ddof=1)), SD_LOG_FLOOR)
        scale = s * math.sqrt(1.0 + 1.0 / n)
        df = n - 1
        t_stat = diff / scale
        pw, pb = _one_sided(t_stat, df, d)
        p_worse, p_better = float(pw), float(pb)
        half = float(st.t.ppf(q, df)) * scale
        ci_low, ci_high = math.exp(diff - half), math.exp(diff + half)
        side = "current" if n2 == 1 else "baseline"
        other = "baseline" if n2 == 1 else "current"
        notes.append(
            f"one {side} trial tested against a prediction interval from {n} {other} "
            f"trials (t, {df} df)"
        )
        if s == SD_LOG_FLOOR:
            notes.append(f"{other} noise below the floor ({SD_LOG_FLOOR:g}); the floor was used")
    else:
        test = "insufficient"
        p_worse = p_better = 1.0
        notes.append(
            f"too few trials to test ({n1} baseline, {n2} current): need >= 2 per side, "
            f"or 1 against >= {PREDICTION_MIN_HISTORY}; no p-value, cannot be significant"
        )

    # detectable effect
    mde_pct: float | None = None
    needed: int | None = None
    if sd_log is not None and n1 + n2 >= 3:
        mde_log = minimum_detectable_effect(sd_log, n1, n2, alpha=alpha, power=power)
        mde_pct = _pct_from_log(mde_log, d)
        if mde_log > threshold_log(threshold, d):
            needed = trials_needed(sd_log, threshold, alpha=alpha, power=power, direction=d)
            notes.append(
                f"can detect only a {mde_pct:.1f}% change (threshold {threshold * 100:g}%); "
                f"{needed} trials per side would be needed"
            )

    boot_low: float | None = None
    boot_high: float | None = None
    if n1 >= BOOTSTRAP_MIN_TRIALS and n2 >= BOOTSTRAP_MIN_TRIALS:
        boot_low, boot_high = bootstrap_ratio_ci(
            np.exp(lx), np.exp(ly), confidence=confidence, seed=0
        )

    p_rank = mann_whitney(np.exp(lx), np.exp(ly), direction=d, alpha=alpha)

    return MetricComparison(
        metric=metric,
        direction=d,
        threshold=float(threshold),
        alpha=float(alpha),
        confidence=float(confidence),
        n_baseline=n1,
        n_current=n2,
        baseline_value=math.exp(mx),
        current_value=math.exp(my),
        ratio=ratio,
        change_pct=(ratio - 1.0) * 100.0,
        ci_low=ci_low,
        ci_high=ci_high,
        p_worse=min(max(p_worse, 0.0), 1.0),
        p_better=min(max(p_better, 0.0), 1.0),
        test=test,
        sd_log=sd_log,
        mde_pct=mde_pct,
        trials_needed=needed,
        note="; ".join(notes),
        bootstrap_low=boot_low,
        bootstrap_high=boot_high,
        p_worse_rank=p_rank,
    )


def compare_paired(
    metric: str,
    reference: Sequence[float],
    candidate: Sequence[float],
    *,
    direction: Direction | str,
    threshold: float,
    alpha: float = 0.05,
    confidence: float = 0.95,
    power: float = 0.8,
) -> MetricComparison:
    """Paired comparison of two configurations run interleaved in one session.

    Trial ``i`` of the reference and of the candidate ran back to back, so they share
    the machine's state; the test works on the per-pair log ratios
    ``log(candidate[i] / reference[i])`` (one-sample t, ``n - 1`` df), which removes the
    drift between pairs: the most reliable design on a noisy machine. The candidate
    plays the part of "current", the reference of "baseline".
    """
    from scipy import stats as st

    d = Direction.coerce(direction)
    _check_threshold(threshold, d)
    _check_alpha(alpha)
    lx = _log_values(metric, "reference", reference)
    ly = _log_values(metric, "candidate", candidate)
    if lx.size != ly.size:
        raise ValueError(f"{metric}: paired comparison needs as many reference as candidate trials "
                         f"({lx.size} vs {ly.size})")
    n = int(lx.size)
    diffs = ly - lx
    mean = float(diffs.mean())
    ratio = math.exp(mean)
    notes: list[str] = []
    if n < 2:
        return MetricComparison(
            metric=metric, direction=d, threshold=float(threshold), alpha=float(alpha),
            confidence=float(confidence), n_baseline=n, n_current=n, baseline_value=math.exp(float(lx.mean())),
            current_value=math.exp(float(ly.mean())), ratio=ratio, change_pct=(ratio - 1.0) * 100.0,
            ci_low=None, ci_high=None, p_worse=1.0, p_better=1.0, test="insufficient", sd_log=None,
            mde_pct=None, trials_needed=None,
            note="a paired comparison needs at least 2 pairs; no p-value, cannot be significant")
    sd = float(diffs.std(ddof=1))
    if sd < SD_LOG_FLOOR:
        notes.append(f"pair-to-pair noise below the floor ({SD_LOG_FLOOR:g}); the floor was used")
        sd = SD_LOG_FLOOR
    se = sd / math.sqrt(n)
    df = n - 1
    p_worse, p_better = _one_sided(mean / se, df, d)
    half = float(st.t.ppf(0.5 + confidence / 2.0, df)) * se
    k = float(st.t.ppf(1.0 - alpha, df) + st.t.ppf(power, df))
    mde_log = k * se
    mde_pct = _pct_from_log(mde_log, d)
    needed = None
    target = threshold_log(threshold, d)
    if mde_log > target:
        m = n
        while m < 10_000:
            m += 1
            if (st.t.ppf(1.0 - alpha, m - 1) + st.t.ppf(power, m - 1)) * sd / math.sqrt(m) <= target:
                break
        needed = m
        notes.append(f"can detect only a {mde_pct:.1f}% change (threshold {threshold * 100:g}%); "
                     f"{needed} pairs would be needed")
    return MetricComparison(
        metric=metric, direction=d, threshold=float(threshold), alpha=float(alpha), confidence=float(confidence),
        n_baseline=n, n_current=n, baseline_value=math.exp(float(lx.mean())),
        current_value=math.exp(float(ly.mean())), ratio=ratio, change_pct=(ratio - 1.0) * 100.0,
        ci_low=math.exp(mean - half), ci_high=math.exp(mean + half),
        p_worse=min(max(float(p_worse), 0.0), 1.0), p_better=min(max(float(p_better), 0.0), 1.0),
        test="paired-t", sd_log=sd, mde_pct=mde_pct, trials_needed=needed, note="; ".join(notes),
    )


def compare_batch(
    baseline: Any, current: Any, *, direction: Direction | str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorized Welch path of :func:`compare` for many comparisons at once.

    ``baseline`` is an array (..., k) and ``current`` (..., m) of positive trial values
    with k, m >= 2; each row is one comparison. Returns arrays ``(ratio, p_worse,
    p_better)`` equal to what :func:`compare` gives row by row for its ``"welch"`` test
    (same variance floor). Rows whose values are all identical on both sides get
    ``p = 1`` as in ``"exact-equal"``. Meant for simulation and large reports.
    """
    import numpy as np

    d = Direction.coerce(direction)
    x = np.asarray(baseline, dtype=float)
    y = np.asarray(current, dtype=float)
    if x.shape[-1] < 2 or y.shape[-1] < 2:
        raise ValueError("compare_batch needs >= 2 trials per side")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and (x > 0).all() and (y > 0).all()):
        raise ValueError("compare_batch: values must be finite and > 0")
    lx, ly = np.log(x), np.log(y)
    diff, _se, df, t, _f = _welch_core(lx, ly)
    pw, pb = _one_sided(t, df, d)
    first = lx[..., :1]
    equal = np.all(lx == first, axis=-1) & np.all(ly == first, axis=-1)
    pw = np.where(equal, 1.0, pw)
    pb = np.where(equal, 1.0, pb)
    return np.exp(diff), np.asarray(pw, dtype=float), np.asarray(pb, dtype=float)


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ratio_ci(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the geometric-mean ratio current / baseline.

    Each side is resampled with replacement independently (seeded, so reports are
    reproducible). :func:`compare` only uses it when both sides have at least
    :data:`BOOTSTRAP_MIN_TRIALS` (8) trials: with fewer, the resampling distribution
    has too few distinct values to give a meaningful interval. Needs >= 2 per side.
    """
    import numpy as np

    _check_alpha(confidence, "confidence")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    lx = _log_values("bootstrap", "baseline", baseline)
    ly = _log_values("bootstrap", "current", current)
    if lx.size < 2 or ly.size < 2:
        raise ValueError("bootstrap_ratio_ci needs >= 2 values per side")
    rng = np.random.default_rng(seed)
    mx = lx[rng.integers(0, lx.size, size=(n_resamples, lx.size))].mean(axis=1)
    my = ly[rng.integers(0, ly.size, size=(n_resamples, ly.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(my - mx, [tail, 1.0 - tail])
    return float(np.exp(lo)), float(np.exp(hi))


# --------------------------------------------------------------------------- rank test


def rank_test_allowed(n1: int, n2: int, alpha: float) -> bool:
    """Whether a one-sided Mann-Whitney test can reach significance at all.

    Its smallest attainable one-sided p is ``1 / C(n1 + n2, n1)`` (3 vs 3: 0.05); the
    test is allowed only when that is strictly below ``alpha`` (the guard asv uses).
    """
    _check_alpha(alpha)
    if n1 < 1 or n2 < 1:
        return False
    return 1.0 / math.comb(n1 + n2, n1) < alpha


def mann_whitney(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    direction: Direction | str,
    alpha: float = 0.05,
) -> float | None:
    """One-sided Mann-Whitney p that current is worse, or None when not allowed.

    Returns None when :func:`rank_test_allowed` is false for these trial counts.
    Uses the exact distribution when scipy can (small samples without ties).
    """
    from scipy import stats as st

    d = Direction.coerce(direction)
    n1, n2 = len(baseline), len(current)
    if not rank_test_allowed(n1, n2, alpha):
        return None
    alt = "greater" if d is Direction.LOWER_IS_BETTER else "less"
    res = st.mannwhitneyu(list(current), list(baseline), alternative=alt, method="auto")
    p = float(res.pvalue)
    return min(max(p, 0.0), 1.0) if math.isfinite(p) else 1.0


# --------------------------------------------------------------------------- multiplicity


def _check_pvalues(pvalues: Sequence[float]) -> list[float]:
    ps = [float(p) for p in pvalues]
    for p in ps:
        if not (0.0 <= p <= 1.0):  # also rejects nan
            raise ValueError(f"p-values must be in [0, 1] and not nan, got {p!r}")
    return ps


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order.

    ``adj_(i) = max_{j <= i} min(1, (m - j + 1) * p_(j))`` over the sorted p-values:
    monotone in the sorted order and capped at 1. Controls the family-wise error rate;
    used for the gate. An empty input gives an empty list.
    """
    ps = _check_pvalues(pvalues)
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), input order.

    Uses ``scipy.stats.false_discovery_control(method="bh")`` when present, else the
    same step-up formula here. For the report, not the gate. Empty in, empty out.
    """
    ps = _check_pvalues(pvalues)
    if not ps:
        return []
    try:
        from scipy.stats import false_discovery_control
    except ImportError:  # pragma: no cover - scipy < 1.11
        false_discovery_control = None
    if false_discovery_control is not None:
        return [float(min(1.0, p)) for p in false_discovery_control(ps, method="bh")]
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i], reverse=True)
    out = [0.0] * m
    running = 1.0
    for k, i in enumerate(order):
        rank = m - k  # 1-based rank in ascending order
        running = min(running, ps[i] * m / rank)
        out[i] = min(1.0, running)
    return out


# --------------------------------------------------------------------------- verdict


def _fmt_p(p: float) -> str:
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}".rstrip("0").rstrip(".") if p < 1 else "1"


def verdict(
    comparison: MetricComparison,
    adjusted_p_worse: float,
    adjusted_p_better: float,
    *,
    alpha: float,
    correction: str = "Holm",
) -> Verdict:
    """The zone of a comparison, given its p-values after multiplicity correction.

    Intended use: collect every comparison of the session, adjust the list of
    ``p_worse`` with :func:`holm` and the list of ``p_better`` with :func:`holm`
    separately, then call this per comparison. Rules (DESIGN.md section 4):

    * significant = ``adjusted_p_worse <= alpha``; beyond_threshold = the point
      estimate is worse than the threshold (ratio > 1 + threshold for lower-is-better,
      ratio < 1 - threshold for higher-is-better); better = ``adjusted_p_better <= alpha``.
    * FAIL when significant and beyond_threshold.
    * WARN when exactly one of the two holds, or when significantly better (refresh the
      baseline with --update-baselines).
    * PASS otherwise.
    """
    _check_alpha(alpha)
    pw = float(adjusted_p_worse)
    pb = float(adjusted_p_better)
    for p in (pw, pb):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"adjusted p-values must be in [0, 1], got {p!r}")
    c = comparison
    significant = pw <= alpha
    beyond = c.beyond_threshold
    better = pb <= alpha and not significant
    thr = f"{c.threshold * 100:g}%"
    worse = c.worse_pct
    after = f"after {correction}" if correction else "uncorrected"

    if significant and beyond:
        zone = Zone.FAIL
        reason = (
            f"{c.metric} {worse:.1f}% worse than baseline (threshold {thr}), "
            f"p={_fmt_p(pw)} {after}"
        )
    elif significant:
        zone = Zone.WARN
        reason = (
            f"{c.metric} {worse:.1f}% worse than baseline, significant "
            f"(p={_fmt_p(pw)} {after}) but within the {thr} threshold"
        )
    elif beyond:
        zone = Zone.WARN
        reason = (
            f"{c.metric} {worse:.1f}% worse than baseline (threshold {thr}) but not "
            f"significant (p={_fmt_p(pw)} {after})"
        )
        if c.trials_needed is not None:
            reason += (
                f"; with this noise only a {c.mde_pct:.1f}% change is detectable, "
                f"{c.trials_needed} trials per side would be needed"
            )
        elif c.test == "insufficient":
            reason += f"; too few trials to test ({c.n_baseline} vs {c.n_current})"
    elif better:
        zone = Zone.WARN
        reason = (
            f"{c.metric} {-worse:.1f}% better than baseline (p={_fmt_p(pb)} {after}); "
            "refresh the baseline with --update-baselines"
        )
    else:
        zone = Zone.PASS
        word = "worse" if worse >= 0 else "better"
        reason = (
            f"{c.metric} {abs(worse):.1f}% {word} than baseline, within noise and the "
            f"{thr} threshold (p={_fmt_p(pw)} {after})"
        )
    return Verdict(
        metric=c.metric,
        zone=zone,
        reason=reason,
        significant=significant,
        beyond_threshold=beyond,
        better=better,
        p_worse_adjusted=pw,
        p_better_adjusted=pb,
    )


# --------------------------------------------------------------------------- power


def minimum_detectable_effect(
    sd_log: float, n1: int, n2: int, *, alpha: float, power: float = 0.8
) -> float:
    """Smallest true log-scale shift a one-sided test at ``alpha`` detects with ``power``.

    t approximation: ``(t[1-alpha, df] + t[power, df]) * sd_log * sqrt(1/n1 + 1/n2)``
    with ``df = n1 + n2 - 2`` (the pooled noise's degrees of freedom; for one trial
    against a history of n this is the prediction interval's n - 1). Returns a positive
    log distance; ``exp(d) - 1`` is the relative increase. Needs ``n1 + n2 >= 3``.
    """
    from scipy import stats as st

    _check_alpha(alpha)
    _check_alpha(power, "power")
    if not (sd_log >= 0 and math.isfinite(sd_log)):
        raise ValueError(f"sd_log must be finite and >= 0, got {sd_log!r}")
    if n1 < 1 or n2 < 1 or n1 + n2 < 3:
        raise ValueError(f"need n1, n2 >= 1 and n1 + n2 >= 3, got {n1}, {n2}")
    df = n1 + n2 - 2
    k = float(st.t.ppf(1.0 - alpha, df) + st.t.ppf(power, df))
    return k * sd_log * math.sqrt(1.0 / n1 + 1.0 / n2)


def trials_needed(
    sd_log: float,
    threshold: float,
    *,
    alpha: float,
    power: float = 0.8,
    direction: Direction | str = Direction.LOWER_IS_BETTER,
) -> int:
    """Smallest equal number of trials per side (>= 2) whose MDE is <= the threshold.

    Uses :func:`minimum_detectable_effect` (t approximation) with ``n1 = n2 = n`` and
    the threshold on the log scale in the metric's bad direction (:func:`threshold_log`).
    """
    import numpy as np
    from scipy import stats as st

    d = Direction.coerce(direction)
    target = threshold_log(threshold, d)
    _check_alpha(alpha)
    _check_alpha(power, "power")
    if not (sd_log >= 0 and math.isfinite(sd_log)):
        raise ValueError(f"sd_log must be finite and >= 0, got {sd_log!r}")
    if sd_log == 0:
        return 2
    z = float(st.norm.ppf(1.0 - alpha) + st.norm.ppf(power))
    n_normal = math.ceil(2.0 * (z * sd_log / target) ** 2)  # the t answer is >= this
    lo = max(2, n_normal)
    hi = max(lo + 64, 2 * lo)
    while True:
        ns = np.arange(lo, hi + 1)
        df = 2 * ns - 2
        mde = (st.t.ppf(1.0 - alpha, df) + st.t.ppf(power, df)) * sd_log * np.sqrt(2.0 / ns)
        ok = np.nonzero(mde <= target)[0]
        if ok.size:
            return int(ns[ok[0]])
        lo, hi = hi + 1, 2 * hi
