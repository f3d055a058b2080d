"""The gate on synthetic nights: how often it fails on noise alone, how often it sees a regression.

:func:`simulate_gate` draws many sessions of a suite (``items`` items, each judged on
median TTFT with a 10% threshold and total throughput with a 5% one, as the default
scenarios are) on a testbed whose noise follows :class:`NoiseModel`, and decides each
session exactly as a run of the plugin does: the run-level comparison of
:mod:`.stats` with the noise prior pooled over the items and the night variance, the
screening of :func:`.decision.needs_confirmation` and one confirmation run, Holm over
the session, FAIL only when significant and beyond the threshold. The tests and
``benchmarks/bench_gate.py`` use it; docs/statistics.md gives its figures.

The noise model, log scale: a run's effect on a metric is ``night + run`` (their
variances adding up to ``run_sd ** 2``, the night part shared by every item and run
of the session, ``night_share`` of it), each trial adds ``trial_sd``; run effects are
normal or Student t with ``tail_df`` degrees of freedom scaled to the same sd. The last
``noisy_items`` items may be noisier than the rest (their own run effects' sd ``noisy_sd``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .decision import SCREEN_P
from .stats import compare_runs_batch, fit_noise_prior, night_variance, threshold_log

__all__ = ["GateSetup", "NoiseModel", "SimulationResult", "simulate_gate"]


@dataclass(frozen=True)
class NoiseModel:
    """The testbed's noise (fractions, on the log scale)."""

    run_sd: float
    trial_sd: float = 0.01
    night_share: float = 0.0  # part of the run-to-run variance every item of a session shares
    tail_df: float | None = None  # Student t run effects with these df (same sd); None: normal
    noisy_items: int = 0  # the last items of the suite are noisier than the rest:
    noisy_sd: float = 0.0  # their own run effects have this sd (the night's part stays run_sd's)


@dataclass(frozen=True)
class GateSetup:
    """The suite and the gate: items x (TTFT at 10%, throughput at 5%)."""

    items: int = 23
    baseline_runs: int = 5
    trials: int = 3
    alpha: float = 0.05
    confirm_runs: int = 1
    run_noise: float | None = None  # the configured figure (--kv-run-noise)

    @property
    def comparisons(self) -> int:
        return 2 * self.items


@dataclass(frozen=True)
class SimulationResult:
    sessions: int
    false_failure_rate: float  # sessions where a comparison without a true change failed
    fail_rate: tuple[float, ...]  # per comparison: the share of sessions it failed in
    confirmations: float  # confirmation runs per session (items re-measured)
    judged: float  # share of comparisons the gate could judge


def _draw(rng: Any, shape: tuple[int, ...], tail_df: float | None) -> Any:
    if tail_df is None:
        return rng.standard_normal(shape)
    return rng.standard_t(tail_df, shape) / math.sqrt(tail_df / (tail_df - 2.0))


def _holm(p: Any) -> Any:
    """Holm-adjusted p-values along the last axis (the session's comparisons)."""
    import numpy as np

    m = p.shape[-1]
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, -1) * (m - np.arange(m))
    adjusted = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, -1)
    return out


def simulate_gate(noise: NoiseModel, setup: GateSetup = GateSetup(), *, sessions: int = 1000, seed: int = 0,
                  effects: Mapping[int, float] | None = None) -> SimulationResult:
    """Decide ``sessions`` simulated sessions; ``effects`` maps a comparison (item ``i``'s
    TTFT is ``2 i``, its throughput ``2 i + 1``) to its true ratio in this session."""
    base, cur = _draw_sessions(noise, setup, sessions, seed, effects or {})
    fail, confirm, judged = _decide_sessions(base, cur, setup)
    unchanged = [i not in (effects or {}) for i in range(setup.comparisons)]
    return SimulationResult(sessions=sessions, false_failure_rate=float(fail[:, unchanged].any(-1).mean()),
                            fail_rate=tuple(float(x) for x in fail.mean(0)),
                            confirmations=float(confirm.sum(-1).mean() / 2.0), judged=float(judged.mean()))


def _draw_sessions(noise: NoiseModel, setup: GateSetup, sessions: int, seed: int,
                   effects: Mapping[int, float]) -> tuple[Any, Any]:
    """Trial values: baseline (S, C, R, n) and the session's runs (S, C, 1 + confirm, n)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    runs, n, c = setup.baseline_runs, setup.trials, setup.comparisons
    sign = np.tile([1.0, -1.0], setup.items)  # a slow night: TTFT up, throughput down
    item_sd = np.full((1, c, 1), noise.run_sd * math.sqrt(1.0 - noise.night_share))
    if noise.noisy_items:
        item_sd[:, c - 2 * noise.noisy_items:] = noise.noisy_sd
    night_sd = noise.run_sd * math.sqrt(noise.night_share)

    def run_effects(k: int, one_night: bool) -> Any:
        own = item_sd * _draw(rng, (sessions, c, k), noise.tail_df)
        night = night_sd * _draw(rng, (sessions, 1, 1 if one_night else k), noise.tail_df)
        return own + night * sign[None, :, None]

    base = 100.0 * np.exp(run_effects(runs, one_night=False)[..., None]
                          + noise.trial_sd * rng.standard_normal((sessions, c, runs, n)))
    shift = np.zeros(c)
    for index, ratio in effects.items():
        shift[index] = math.log(ratio)
    k = setup.confirm_runs + 1  # a confirmation runs on the same night
    cur = 100.0 * np.exp(run_effects(k, one_night=True)[..., None]
                         + noise.trial_sd * rng.standard_normal((sessions, c, k, n)) + shift[None, :, None, None])
    return base, cur


def _decide_sessions(base: Any, cur: Any, setup: GateSetup) -> tuple[Any, Any, Any]:
    """(failed, confirmed, judged), each (S, C), deciding as a session of the plugin does."""
    import numpy as np

    sessions, c, runs = base.shape[0], base.shape[1], base.shape[2]
    items = c // 2
    lower = np.tile([True, False], items)
    sign = np.where(lower, 1.0, -1.0)
    # the noise prior and the night, per metric, from the baseline runs as the session does
    prior_var, prior_df, night = np.zeros((sessions, c)), np.zeros((sessions, c)), np.full((sessions, c), np.nan)
    means = np.log(base).mean(-1)  # (S, C, R)
    for kind in (0, 1):
        cols = slice(kind, None, 2)
        if runs >= 2 and items >= 2:
            s0, d0 = fit_noise_prior(means[:, cols].var(-1, ddof=1), float(runs - 1))
            prior_var[:, cols], prior_df[:, cols] = s0[:, None], d0[:, None]
        elif setup.run_noise:
            prior_var[:, cols], prior_df[:, cols] = math.log1p(setup.run_noise) ** 2, np.inf
        if runs >= 3 and items >= 3:
            night[:, cols] = night_variance(means[:, cols])[:, None]
    judged = np.broadcast_to((prior_df > 0) | (runs >= 2), (sessions, c))

    def compare(current: Any) -> tuple[Any, Any]:
        ratio, p_worse = np.empty((sessions, c)), np.empty((sessions, c))
        for kind, direction in ((0, "lower"), (1, "higher")):
            cols = slice(kind, None, 2)
            ratio[:, cols], p_worse[:, cols], _ = compare_runs_batch(
                base[:, cols], current[:, cols], direction=direction, prior_var=prior_var[:, cols],
                prior_df=prior_df[:, cols], night_var=night[:, cols])
        return ratio, p_worse

    ratio, p_worse = compare(cur[:, :, :1])
    worse_log = np.log(ratio) * sign
    thresholds = np.array([threshold_log(0.10 if low else 0.05, "lower" if low else "higher") for low in lower])
    confirm = np.zeros((sessions, c), dtype=bool)
    if cur.shape[2] > 1:
        suspicious = judged & (p_worse <= SCREEN_P) & (worse_log > thresholds / 2.0)
        confirm = np.repeat(suspicious.reshape(sessions, items, 2).any(-1), 2, axis=1)
        ratio_k, p_k = compare(cur)
        ratio, p_worse = np.where(confirm, ratio_k, ratio), np.where(confirm, p_k, p_worse)
        worse_log = np.log(ratio) * sign
    p_worse = np.where(judged, p_worse, 1.0)
    fail = (_holm(p_worse) <= setup.alpha) & (worse_log > thresholds)
    return fail, confirm, judged
