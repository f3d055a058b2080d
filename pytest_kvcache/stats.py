"""Statistics of the regression gate: runs as the unit of noise (docs/statistics.md).

Trials of one run share a server process, a machine state and a night; trials of
different runs do not. So a metric's baseline is a set of *runs*, each with its trials,
and the current run is judged against the spread of the baseline's run means, never
by pooling the baseline's trials as if they were independent. Everything is done on
the natural-log scale (effects are ratios, noise is relative).

The model of one item's metric, log scale: ``y = mu + night + run + trial``, with a
run-to-run variance (night and run together, ``between_var``) and a trial-to-trial
variance (``within_var``). A run's mean then varies with ``tau2 = between_var +
within_var / n``.

:func:`compare_runs` (one comparison) and :func:`compare_runs_batch` (many at once,
for simulation) share one computation:

* ``tau2`` comes from the spread of the baseline's run means (``R - 1`` df), moderated
  by a :class:`NoisePrior` pooled over the items of the same testbed (empirical Bayes,
  :func:`fit_noise_prior`; an item :func:`beyond_prior` is judged by its own runs
  alone); with one baseline run the prior alone, and with neither the comparison cannot
  be made (``test = "insufficient-runs"``: p = 1, never significant).
* One current run: ``(mean(current) - mean of the baseline run means) / sqrt(tau2 / R +
  between_var + within_var / m)`` against Student's t with the prior's plus the item's
  df: a prediction interval for a new run.
* Several current runs (the first run plus confirmation runs on fresh servers): each
  is standardized as above; the p-value is the chance, under no change, that *every*
  run is at least as far out as the least extreme one: the upper orthant probability of
  equicorrelated Student t's sharing one variance estimate. Their correlation is the
  part they share: the baseline's mean (``tau2 / R``) and the night (``night_var``, the
  session-wide part of the run-to-run variance estimated from baseline runs of many
  items recorded in the same sessions, :func:`night_variance`; unknown: all of it is
  taken as shared).

Floors: the trial noise is floored at :data:`SD_LOG_FLOOR` (0.1%) and a run mean's
spread at :data:`RUN_SD_FLOOR` (0.5%): an almost deterministic emulator must not make
a 1% wobble between hosts significant.

This module does not import pytest; numpy and scipy are imported where they are used.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "RUN_SD_FLOOR",
    "SD_LOG_FLOOR",
    "Direction",
    "MetricComparison",
    "NoisePrior",
    "benjamini_hochberg",
    "beyond_prior",
    "compare_paired",
    "compare_runs",
    "compare_runs_batch",
    "fit_noise_prior",
    "holm",
    "night_variance",
    "threshold_log",
]

#: Floor on the trial-to-trial standard deviation, log scale (about 0.1%; docs/statistics.md, Floors).
SD_LOG_FLOOR: float = 1e-3
#: Floor on the standard deviation of a run's mean, log scale (about 0.5%; docs/statistics.md, Floors).
RUN_SD_FLOOR: float = 5e-3
#: Degrees of freedom above which Student's t is taken as the normal distribution.
_DF_NORMAL = 1e6
#: The night variance is an upper confidence bound at this level (it reduces power
#: only through the confirmation runs, where an underestimate would cost false failures;
#: docs/statistics.md, Confirmation runs).
_NIGHT_CONFIDENCE = 0.90
#: A confirmation run is taken to share at least this part of its deviation with the
#: first run (one runner, one night): the margin that holds the gate's false failures
#: under 5% on runners whose nights are heavy-tailed (Student t, 3 df; docs/statistics.md).
_CONFIRMATION_CORRELATION_FLOOR = 0.3
#: Runs a comparison may ask for before saying no number of runs would do.
_MAX_RUNS_NEEDED = 50


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
            raise ValueError(f"direction must be 'lower' or 'higher', got {value!r}") from None

    @property
    def sign(self) -> float:
        """+1 when a larger value is worse, -1 when it is better."""
        return 1.0 if self is Direction.LOWER_IS_BETTER else -1.0


@dataclass(frozen=True)
class NoisePrior:
    """Run-to-run noise of one metric on one testbed, pooled over its items.

    ``var`` is the variance (log scale) of a run's mean and ``df`` its degrees of freedom
    (``math.inf``: taken as known). ``night_var`` bounds the part of the run-to-run
    variance that runs of one session share (None: not estimable).
    """

    var: float
    df: float
    source: str
    night_var: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.var) and self.var >= 0):
            raise ValueError(f"noise prior variance must be finite and >= 0, got {self.var!r}")
        if not self.df > 0:
            raise ValueError(f"noise prior df must be > 0, got {self.df!r}")

    @classmethod
    def configured(cls, run_sd: float) -> NoisePrior:
        """The user's own figure of the run-to-run noise (``--kv-run-noise``), a fraction."""
        if not (math.isfinite(run_sd) and run_sd > 0):
            raise ValueError(f"run noise must be a positive fraction, got {run_sd!r}")
        return cls(var=math.log1p(run_sd) ** 2, df=math.inf, source=f"configured ({run_sd * 100:g}%)")


@dataclass(frozen=True)
class MetricComparison:
    """One metric of one item: the current run(s) against the baseline's runs.

    Values are geometric means (of the runs' geometric means); ``ratio = current /
    baseline``; ``change_pct = (ratio - 1) * 100`` (signed, not direction-aware).
    ``p_worse`` and ``p_better`` are one-sided and uncorrected. ``n_*`` count trials,
    ``runs_*`` runs. ``sd_log`` is the standard deviation of one run's log deviation
    from the baseline (what a single run is judged against); ``between_sd`` and
    ``within_sd`` are its run-to-run and trial-to-trial parts. ``mde_pct`` is the
    smallest worsening one run detects with 80% power at ``alpha`` (the per-comparison
    level of the gate); ``runs_needed`` the baseline runs that would bring it under the
    threshold, when it is above. ``note`` says what is special.
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
    note: str
    runs_baseline: int = 1
    runs_current: int = 1
    between_sd: float | None = None
    within_sd: float | None = None
    noise_df: float | None = None
    noise_source: str = ""
    runs_needed: int | None = None

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

    @property
    def better_beyond_threshold(self) -> bool:
        """Whether the point estimate is better by more than the threshold."""
        if self.direction is Direction.LOWER_IS_BETTER:
            return self.ratio < 1.0 / (1.0 + self.threshold)
        return self.ratio > 1.0 / (1.0 - self.threshold)

    @property
    def judged(self) -> bool:
        """False when no test could be made (too few runs or pairs; docs/statistics.md, What
        counts as unjudged)."""
        return not self.test.startswith("insufficient")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (enums as their values, infinities as None)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, float) and not math.isfinite(value):
                value = None
            out[f.name] = value
        return out


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
    """The practical threshold as a positive log-scale distance in the bad direction
    (docs/statistics.md, Thresholds).

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


def _t_sf(x: Any, df: Any) -> Any:
    """Student's t upper tail, the normal's where df is (practically) infinite."""
    import numpy as np
    from scipy import stats as st

    df = np.asarray(df, dtype=float)
    big = ~(df < _DF_NORMAL)
    return np.where(big, st.norm.sf(x), st.t.sf(x, np.where(big, 1.0, df)))


def _t_ppf(q: float, df: float) -> float:
    from scipy import stats as st

    return float(st.norm.ppf(q)) if not df < _DF_NORMAL else float(st.t.ppf(q, df))


def _min_tail(t: Any, rho: Any, k: int, df: Any = math.inf) -> Any:
    """P(min of k equicorrelated Student t's >= t): correlation ``rho`` in [0, 1) and one
    variance estimate with ``df`` degrees of freedom shared by all k (the multivariate t;
    docs/statistics.md, Confirmation runs).

    ``T_i = Z_i / sqrt(V / df)``, ``Z_i = sqrt(rho) W + sqrt(1 - rho) E_i``, ``V`` chi-square:
    conditioning on ``W`` leaves k independent normal tails, integrated over ``W`` by
    Gauss-Hermite (64 nodes) and, where ``df`` is finite, over ``V`` by Gauss-Legendre in
    the log of its distribution function (32 nodes; within 0.2% of Student's tail down to
    1e-5 for df >= 2). The shared ``V`` matters: with few df an underestimated variance
    inflates every run's statistic at once.
    """
    import numpy as np
    from scipy import special
    from scipy import stats as st

    t, rho, df = np.broadcast_arrays(np.asarray(t, dtype=float),
                                     np.clip(np.asarray(rho, dtype=float), 0.0, 0.999),
                                     np.asarray(df, dtype=float))
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / math.sqrt(2.0 * math.pi)

    def normal_tail(u: Any, r: Any) -> Any:
        inner = special.ndtr(-(u[..., None] - np.sqrt(r)[..., None] * nodes) / np.sqrt(1.0 - r)[..., None]) ** k
        return (inner * weights).sum(-1)

    out = np.array(normal_tail(t, rho), dtype=float)
    finite = df < _DF_NORMAL
    if finite.any():
        x, w = np.polynomial.legendre.leggauss(32)
        lowest = math.log(1e-14)
        q = np.exp(lowest * (1.0 - x) / 2.0)  # distribution-function values, dense near 0
        wq = w * -lowest / 2.0 * q
        tf, rf, dff = t[finite], rho[finite], df[finite]
        scale = np.sqrt(st.chi2.ppf(q[None, :], dff[:, None]) / dff[:, None])
        out[finite] = sum(wq[j] * normal_tail(tf * scale[:, j], rf) for j in range(q.size))
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- noise


def _trigamma_inverse(x: np.ndarray) -> np.ndarray:
    """y with trigamma(y) = x, x > 0 (Newton's method from Smyth 2004's limma)."""
    import numpy as np
    from scipy import special

    x = np.asarray(x, dtype=float)
    y = 0.5 + 1.0 / x
    for _ in range(60):
        tri = special.polygamma(1, y)
        step = tri * (1.0 - tri / x) / special.polygamma(2, y)
        y = y + step
        if np.all(-step / y < 1e-8):
            break
    return y


def fit_noise_prior(variances: Any, dfs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Empirical-Bayes prior of many items' run-mean variances (Smyth 2004, limma), fitted
    without the items that are noisier than the rest (docs/statistics.md, Noise pooled over
    the testbed's items).

    ``variances`` (..., F) are the items' sample variances of their run means on the
    log scale, ``dfs`` (..., F) their degrees of freedom (runs - 1). Fits the scaled
    inverse chi-square prior ``(s0^2, d0)`` by the moments of ``log(s^2)``; returns the
    arrays ``(s0^2, d0)`` over the leading axes, ``d0 = inf`` when the items' spread is
    no larger than sampling alone explains. An item :func:`beyond_prior` does not share
    the pool's noise: the fit leaves it out (found from a start that takes every item to
    share one variance, their median's, then refitted until the set stays the same), as
    the comparison judges it by its own runs. Needs F >= 2.
    """
    import numpy as np
    from scipy import stats as st

    s2 = np.maximum(np.asarray(variances, dtype=float), RUN_SD_FLOOR ** 2)
    d = np.broadcast_to(np.asarray(dfs, dtype=float), s2.shape)
    if s2.shape[-1] < 2:
        raise ValueError("fit_noise_prior needs at least 2 items")
    s0 = np.median(s2 / (st.chi2.median(d) / d), -1)
    d0 = np.full(s0.shape, np.inf)
    kept = np.ones(s2.shape, dtype=bool)
    for fits in range(10):
        shared = ~beyond_prior(s2, d, s0[..., None], d0[..., None])
        shared |= (shared.sum(-1) < 2)[..., None]  # too few left to fit: the plain fit of all of them
        if fits and np.array_equal(shared, kept):
            break
        kept = shared
        s0, d0 = _fit_moments(s2, d, kept)
    return s0, d0


def _fit_moments(s2: Any, d: Any, kept: Any) -> tuple[Any, Any]:
    """limma's moment fit of ``(s0^2, d0)`` to the ``kept`` items' variances."""
    import numpy as np
    from scipy import special

    n = kept.sum(-1)
    e = np.log(s2) - special.digamma(d / 2.0) + np.log(d / 2.0)
    e_mean = (e * kept).sum(-1) / n
    e_var = (((e - e_mean[..., None]) ** 2) * kept).sum(-1) / (n - 1) - \
        (special.polygamma(1, d / 2.0) * kept).sum(-1) / n
    finite = e_var > 0
    d0 = np.full(e_mean.shape, np.inf)
    d0[finite] = 2.0 * _trigamma_inverse(e_var[finite])
    d0_safe = np.where(finite, d0, 1.0)
    s0 = np.where(finite, np.exp(e_mean + special.digamma(d0_safe / 2.0) - np.log(d0_safe / 2.0)), np.exp(e_mean))
    return s0, d0


def night_variance(table: Any) -> np.ndarray:
    """Upper bound of the run-to-run variance shared by a session's items (the night).

    ``table`` (..., I, R) holds log run means of I items in the same R sessions. After
    removing each item's mean, a session's average over items is its night effect plus
    1/I of the items' own run noise; the upper ``_NIGHT_CONFIDENCE`` chi-square bound of
    that average's variance, less the items' share, bounds the night variance. Needs
    I >= 3 and R >= 3.
    """
    import numpy as np
    from scipy import stats as st

    x = np.asarray(table, dtype=float)
    items, runs = x.shape[-2], x.shape[-1]
    if items < 3 or runs < 3:
        raise ValueError(f"night_variance needs >= 3 items in >= 3 sessions, got {items} x {runs}")
    resid = x - x.mean(-1, keepdims=True)
    night = resid.mean(-2)  # (..., R)
    inter = resid - night[..., None, :]
    inter_var = (inter ** 2).sum((-2, -1)) / ((runs - 1) * (items - 1))
    night_var = night.var(-1, ddof=1)
    upper = night_var * (runs - 1) / st.chi2.ppf(1.0 - _NIGHT_CONFIDENCE, runs - 1)
    return np.maximum(upper - inter_var / items, 0.0)


def beyond_prior(own_var: Any, own_df: Any, prior_var: Any, prior_df: Any, level: float = 0.01) -> Any:
    """Whether an item's own run-mean variance (``own_df`` df) is beyond the pooled prior's:
    the upper ``level`` tail of ``F(own_df, prior_df)`` (``prior_df`` inf: chi-square over
    df). Such an item does not share the pool's noise, and the prior would understate it
    (docs/statistics.md, Noise pooled over the testbed's items). False where there is no prior.
    """
    import numpy as np
    from scipy import stats as st

    own_var, own_df = np.asarray(own_var, dtype=float), np.asarray(own_df, dtype=float)
    prior_var, prior_df = np.asarray(prior_var, dtype=float), np.asarray(prior_df, dtype=float)
    known = ~(prior_df < _DF_NORMAL)
    with np.errstate(invalid="ignore", divide="ignore"):
        limit = np.where(known, st.chi2.isf(level, own_df) / own_df,
                         st.f.isf(level, own_df, np.where(known | ~(prior_df > 0), 1.0, prior_df)))
        return (prior_df > 0) & (prior_var > 0) & (own_df > 0) & (own_var > limit * prior_var)


# --------------------------------------------------------------------------- run level


@dataclass(frozen=True)
class _RunLevel:
    """Arrays of the run-level comparison (leading axes: the batch)."""

    diff: Any  # mean over current runs of (current run mean - baseline mean), log
    p_worse: Any
    p_better: Any
    var_one: Any  # variance of one current run's deviation
    var_mean: Any  # variance of the mean of the current runs' deviations
    between_var: Any
    within_var: Any
    df: Any
    prior_df: Any  # the prior's df as used: 0 where the item's own runs are beyond it


def _run_level(base_means: Any, base_n: Any, base_ss: Any, cur_means: Any, cur_n: Any, cur_ss: Any,
               prior_var: Any, prior_df: Any, night_var: Any, sign: float, shared_current: bool) -> _RunLevel:
    """The computation behind :func:`compare_runs` and :func:`compare_runs_batch`
    (docs/statistics.md, The run-level comparison, step by step).

    ``base_means`` (..., R) and ``cur_means`` (..., K) are log run means, ``*_n`` their
    trial counts, ``*_ss`` the summed within-run squared deviations (...). ``prior_var``
    / ``prior_df`` moderate the baseline's own spread (prior_df 0: none; then R >= 2).
    ``night_var`` (NaN: unknown) is the shared part of the run-to-run variance.
    """
    import numpy as np

    base_means = np.asarray(base_means, dtype=float)
    cur_means = np.asarray(cur_means, dtype=float)
    base_n = np.broadcast_to(np.asarray(base_n, dtype=float), base_means.shape)
    cur_n = np.broadcast_to(np.asarray(cur_n, dtype=float), cur_means.shape)
    runs, k = base_means.shape[-1], cur_means.shape[-1]
    within_df = (base_n - 1).sum(-1) + (cur_n - 1).sum(-1)
    within_var = np.where(within_df > 0, (np.asarray(base_ss) + np.asarray(cur_ss)) / np.maximum(within_df, 1), 0.0)
    within_var = np.maximum(within_var, SD_LOG_FLOOR ** 2)
    prior_var = np.asarray(prior_var, dtype=float)
    prior_df = np.asarray(prior_df, dtype=float)
    if runs >= 2:
        own = base_means.var(-1, ddof=1)
        d = runs - 1.0
        # an item noisier than the pool (its own test at 1%) is judged by its own runs alone
        prior_df = np.where(beyond_prior(own, d, prior_var, prior_df), 0.0, prior_df)
        with np.errstate(invalid="ignore", divide="ignore"):  # prior_df inf: the prior alone
            weight = np.where(np.isinf(prior_df), 1.0, prior_df / (prior_df + d))
        tau2 = np.where(prior_df > 0, weight * prior_var + (1.0 - weight) * own, own)
        df = np.where(prior_df > 0, prior_df + d, d)
    else:
        tau2, df = prior_var, prior_df
    mean_n = base_n.mean(-1)
    tau2 = np.maximum(tau2, np.maximum(RUN_SD_FLOOR ** 2, within_var / mean_n))
    between_var = np.maximum(tau2 - within_var / mean_n, 0.0)
    base_mean = base_means.mean(-1)
    dev = (cur_means - base_mean[..., None]) * sign  # worse is positive
    var_k = (tau2 / runs + between_var)[..., None] + within_var[..., None] / cur_n
    z = dev / np.sqrt(var_k)
    night = np.asarray(night_var, dtype=float)
    shared = between_var if shared_current else np.where(np.isnan(night), between_var,
                                                         np.minimum(night, between_var))
    if k == 1:
        p_worse, p_better = _t_sf(z[..., 0], df), _t_sf(-z[..., 0], df)
    else:
        rho = np.maximum((tau2 / runs + shared) / var_k.max(-1), _CONFIRMATION_CORRELATION_FLOOR)
        p_worse, p_better = _min_tail(z.min(-1), rho, k, df), _min_tail((-z).min(-1), rho, k, df)
    if runs < 2:  # one baseline run and no prior: the run-to-run noise is unknown, nothing is judged
        unknown = ~(prior_df > 0)
        p_worse, p_better = np.where(unknown, 1.0, p_worse), np.where(unknown, 1.0, p_better)
    var_mean = tau2 / runs + shared + (between_var - shared) / k + within_var / cur_n.sum(-1)
    return _RunLevel(diff=dev.mean(-1) * sign, p_worse=p_worse, p_better=p_better, var_one=var_k[..., 0],
                     var_mean=var_mean, between_var=between_var, within_var=within_var, df=df,
                     prior_df=prior_df)


def _run_stats(metric: str, side: str, runs: Sequence[Sequence[float]]) -> tuple[list[float], list[int], float]:
    """(log means, trial counts, summed within-run squared deviations) of some runs."""
    means, counts, ss = [], [], 0.0
    for values in runs:
        logs = _log_values(metric, side, values)
        means.append(float(logs.mean()))
        counts.append(int(logs.size))
        ss += float(((logs - logs.mean()) ** 2).sum())
    return means, counts, ss


def _untested(metric: str, direction: Direction, threshold: float, alpha: float, confidence: float, *,
              n_baseline: int, n_current: int, baseline_value: float, current_value: float, ratio: float,
              runs_baseline: int = 1, runs_current: int = 1) -> MetricComparison:
    """The two sides of a comparison before any test: no interval, p = 1, not judged."""
    return MetricComparison(metric=metric, direction=direction, threshold=float(threshold), alpha=float(alpha),
                            confidence=float(confidence), n_baseline=n_baseline, n_current=n_current,
                            baseline_value=baseline_value, current_value=current_value, ratio=ratio,
                            change_pct=(ratio - 1.0) * 100.0, runs_baseline=runs_baseline, runs_current=runs_current,
                            ci_low=None, ci_high=None, p_worse=1.0, p_better=1.0, test="insufficient-untested",
                            sd_log=None, mde_pct=None, note="")


def _unjudged_comparison(sides: MetricComparison, baseline_runs: Sequence[Sequence[float]],
                         current_runs: Sequence[Sequence[float]], prior: NoisePrior | None) -> MetricComparison | None:
    """The comparisons that need no test: every value equal, or the run-to-run noise unknown
    (one baseline run and no prior: "insufficient-runs"; docs/statistics.md, What counts as
    unjudged)."""
    runs = sides.runs_baseline
    every = [v for run in (*baseline_runs, *current_runs) for v in run]
    if all(v == every[0] for v in every) and (runs >= 2 or prior is not None):
        return replace(sides, ci_low=1.0, ci_high=1.0, test="exact-equal",
                       note="every trial value is identical on both sides: no evidence of any change")
    if runs < 2 and prior is None:
        return replace(
            sides, test="insufficient-runs", runs_needed=3,
            note=f"cannot judge: the baseline has {runs} run, so its run-to-run noise is unknown; record at least "
                 "2 more runs on other days (--update-baselines), or give the testbed's run-to-run noise "
                 "(--kv-run-noise)")
    return None


def _noise_source(b_means: Sequence[float], prior: NoisePrior | None, pooled: bool) -> tuple[str, list[str]]:
    """Where the run-to-run noise came from, and a note when the baseline's runs disagree
    beyond the testbed's noise (:func:`beyond_prior`; then they alone were used)."""
    runs = len(b_means)
    if prior is None:
        return "this item's runs", []
    if runs < 2:
        return prior.source, []
    if pooled:
        return f"this item's {runs} runs and {prior.source}", []
    import numpy as np

    own = float(np.var(b_means, ddof=1))
    return f"this item's {runs} runs alone", [
        f"the baseline's {runs} runs disagree beyond this testbed's run-to-run noise (sd "
        f"{math.sqrt(own) * 100:.1f}% against {math.sqrt(prior.var) * 100:.1f}%), so they alone were used: a noisier "
        "item, or a change between them? refresh the baseline (--reset-baselines) if the latter"]


@dataclass(frozen=True)
class _Power:
    """What one run can detect, and what more baseline runs would buy (docs/statistics.md,
    What one run can detect)."""

    alpha: float
    power: float
    direction: Direction
    threshold: float

    def detectable(self, var: float, df: float) -> float:
        """The smallest worsening (log scale) detected with this power at this level."""
        return (_t_ppf(1.0 - self.alpha, df) + _t_ppf(self.power, df)) * math.sqrt(var)

    def runs_needed(self, level: _RunLevel, base_n: Sequence[int], first_n: int, runs: int,
                    prior_df: float) -> tuple[int | None, str]:
        """The baseline runs that would bring one run's detectable change under the threshold
        (more runs: more df too), or why no number of them would; with the note to show."""
        import numpy as np

        between_var, within_var = float(level.between_var), float(level.within_var)
        target = threshold_log(self.threshold, self.direction)
        tau2 = between_var + within_var / float(np.mean(base_n))
        floor = between_var + within_var / first_n
        if self.detectable(floor, math.inf) >= target:
            return None, (f"the run-to-run noise alone ({_pct_from_log(math.sqrt(between_var), self.direction):.1f}%) "
                          f"keeps one run from detecting a {self.threshold * 100:g}% change at this level: more "
                          "baseline runs cannot fix that, confirmation runs (--kv-confirm-runs) can")
        needed = next((r for r in range(max(runs + 1, 2), _MAX_RUNS_NEEDED + 1)
                       if self.detectable(tau2 / r + floor, prior_df + r - 1) <= target), None)
        more = f"{needed} baseline runs would be needed" if needed else \
            f"more than {_MAX_RUNS_NEEDED} baseline runs would be needed"
        mde_log = self.detectable(float(level.var_one), float(level.df))
        return needed, (f"one run can detect only a {_pct_from_log(mde_log, self.direction):.1f}% change (threshold "
                        f"{self.threshold * 100:g}%); {more}")


def compare_runs(
    metric: str,
    baseline_runs: Sequence[Sequence[float]],
    current_runs: Sequence[Sequence[float]],
    *,
    direction: Direction | str,
    threshold: float,
    alpha: float = 0.05,
    prior: NoisePrior | None = None,
    shared_current: bool = False,
    confidence: float = 0.95,
    power: float = 0.8,
) -> MetricComparison:
    """Compare one metric's current run(s) with the baseline's runs (module docstring).

    ``baseline_runs`` and ``current_runs`` hold per-trial values (positive floats, e.g.
    the median TTFT of each trial), one list per run; the first current run is the
    item's run, the others its confirmation runs. ``alpha`` is the per-comparison level
    the gate will apply (for the detectable effect only). ``shared_current``: the current
    runs ran on one server (an external endpoint), so they share all of its run effect.
    Raises ValueError naming the metric for empty sides and bad values.
    """
    import numpy as np

    d = Direction.coerce(direction)
    _check_threshold(threshold, d)
    for value, name in ((alpha, "alpha"), (confidence, "confidence"), (power, "power")):
        _check_alpha(value, name)
    if not baseline_runs or not current_runs:
        raise ValueError(f"metric {metric!r}: needs at least one baseline run and one current run")
    b_means, b_n, b_ss = _run_stats(metric, "baseline", baseline_runs)
    c_means, c_n, c_ss = _run_stats(metric, "current", current_runs)
    runs, k = len(b_means), len(c_means)
    base_value = math.exp(float(np.mean(b_means)))
    cur_value = math.exp(float(np.mean(c_means)))
    sides = _untested(metric, d, threshold, alpha, confidence, n_baseline=sum(b_n), n_current=sum(c_n),
                   baseline_value=base_value, current_value=cur_value, ratio=cur_value / base_value,
                   runs_baseline=runs, runs_current=k)
    unjudged = _unjudged_comparison(sides, baseline_runs, current_runs, prior)
    if unjudged is not None:
        return unjudged
    night = prior.night_var if prior is not None and prior.night_var is not None else math.nan
    level = _run_level(np.array(b_means), np.array(b_n), b_ss, np.array(c_means), np.array(c_n), c_ss,
                       prior.var if prior is not None else 0.0, prior.df if prior is not None else 0.0,
                       night, d.sign, shared_current)
    df = float(level.df)
    half = _t_ppf(0.5 + confidence / 2.0, df) * math.sqrt(float(level.var_mean))
    diff = float(level.diff)
    notes = []
    if k > 1:
        notes.append(f"{k} runs: the first and {k - 1} confirmation run{'s' if k > 2 else ''}; "
                     "each must be as far out for the change to be significant")
    source, disagree = _noise_source(b_means, prior, bool(level.prior_df > 0))
    notes += disagree
    detect = _Power(alpha=alpha, power=power, direction=d, threshold=threshold)
    mde_log = detect.detectable(float(level.var_one), df)
    needed = None
    if mde_log > threshold_log(threshold, d):
        needed, note = detect.runs_needed(level, b_n, c_n[0], runs, float(level.prior_df))
        notes.append(note)
    return replace(
        sides, ci_low=math.exp(diff - half), ci_high=math.exp(diff + half),
        p_worse=float(min(max(level.p_worse, 0.0), 1.0)), p_better=float(min(max(level.p_better, 0.0), 1.0)),
        test="run-level" if k == 1 else "run-level, confirmed", sd_log=math.sqrt(float(level.var_one)),
        mde_pct=_pct_from_log(mde_log, d), note="; ".join(notes), between_sd=math.sqrt(float(level.between_var)),
        within_sd=math.sqrt(float(level.within_var)), noise_df=df, noise_source=source, runs_needed=needed)


def compare_runs_batch(baseline: Any, current: Any, *, direction: Direction | str, prior_var: Any = 0.0,
                       prior_df: Any = 0.0, night_var: Any = math.nan,
                       shared_current: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compare_runs` for many comparisons at once (simulation, large reports).

    ``baseline`` (..., R, n) and ``current`` (..., K, m) hold positive trial values,
    equal counts along the batch; ``prior_var``/``prior_df``/``night_var`` broadcast to
    the leading axes. Returns ``(ratio, p_worse, p_better)`` equal to what
    :func:`compare_runs` gives comparison by comparison (except its exact-equal and
    insufficient cases: identical values get p = 1 here too; R = 1 needs a prior).
    """
    import numpy as np

    d = Direction.coerce(direction)
    x = np.log(np.asarray(baseline, dtype=float))
    y = np.log(np.asarray(current, dtype=float))
    b_means, c_means = x.mean(-1), y.mean(-1)
    b_ss = ((x - b_means[..., None]) ** 2).sum((-2, -1))
    c_ss = ((y - c_means[..., None]) ** 2).sum((-2, -1))
    level = _run_level(b_means, x.shape[-1], b_ss, c_means, y.shape[-1], c_ss, prior_var, prior_df, night_var,
                       d.sign, shared_current)
    first = x[..., :1, :1]
    equal = np.all(x == first, axis=(-2, -1)) & np.all(y == first, axis=(-2, -1))
    return (np.exp(level.diff), np.where(equal, 1.0, level.p_worse), np.where(equal, 1.0, level.p_better))


# --------------------------------------------------------------------------- paired


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
    drift between pairs: inside one run the trial is the right unit. The candidate plays
    the part of "current", the reference of "baseline".
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
    sides = _untested(metric, d, threshold, alpha, confidence, n_baseline=n, n_current=n,
                   baseline_value=math.exp(float(lx.mean())), current_value=math.exp(float(ly.mean())), ratio=ratio)
    if n < 2:
        return replace(sides, test="insufficient-pairs",
                       note="a paired comparison needs at least 2 pairs; no p-value, cannot be significant")
    notes: list[str] = []
    sd = float(diffs.std(ddof=1))
    if sd < SD_LOG_FLOOR:
        notes.append(f"pair-to-pair noise below the floor ({SD_LOG_FLOOR:g}); the floor was used")
        sd = SD_LOG_FLOOR
    se = sd / math.sqrt(n)
    df = n - 1
    t = mean * d.sign / se
    p_worse, p_better = float(st.t.sf(t, df)), float(st.t.cdf(t, df))
    half = float(st.t.ppf(0.5 + confidence / 2.0, df)) * se
    mde_log = float(st.t.ppf(1.0 - alpha, df) + st.t.ppf(power, df)) * se
    return replace(
        sides, ci_low=math.exp(mean - half), ci_high=math.exp(mean + half), p_worse=p_worse, p_better=p_better,
        test="paired-t", sd_log=sd, mde_pct=_pct_from_log(mde_log, d), note="; ".join(notes), within_sd=sd,
        noise_df=float(df), noise_source="pairs of this run")


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

    ``scipy.stats.false_discovery_control(method="bh")``; for the report, not the gate.
    Empty in, empty out.
    """
    ps = _check_pvalues(pvalues)
    if not ps:
        return []
    from scipy.stats import false_discovery_control

    return [float(min(1.0, p)) for p in false_discovery_control(ps, method="bh")]
