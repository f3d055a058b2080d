"""Monte Carlo checks of the gate's error rates (seeded numpy, no server).

Each simulated session has 20 comparisons of 5 baseline vs 5 current trials with 3%
lognormal trial noise and a 10% threshold; p-values come from the vectorized Welch path
(:func:`stats.compare_batch`, checked against :func:`stats.compare` here and in
test_stats.py), Holm from :func:`stats.holm`, and the zone from :func:`stats.verdict`'s
rules (checked against :func:`stats.verdict` on real comparisons for a few sessions).
Run with ``-s`` to see the measured rates.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_kvcache import stats
from pytest_kvcache.stats import Direction

SESSIONS = 1000
COMPARISONS = 20
TRIALS = 5
NOISE = 0.03
THRESHOLD = 0.10
ALPHA = 0.05
# alternate the metric kind so both directions are exercised
DIRECTIONS = [
    Direction.LOWER_IS_BETTER if j % 2 == 0 else Direction.HIGHER_IS_BETTER
    for j in range(COMPARISONS)
]


def _simulate(rng: np.random.Generator, effect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sessions, comparisons, trials) baseline and current values; ``effect`` is the
    true ratio per comparison."""
    shape = (SESSIONS, COMPARISONS, TRIALS)
    base = 100.0 * np.exp(rng.normal(0.0, NOISE, size=shape))
    cur = 100.0 * effect[None, :, None] * np.exp(rng.normal(0.0, NOISE, size=shape))
    return base, cur


def _zones(base: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zones (as strings) per (session, comparison), plus raw p_worse and ratios."""
    ratio = np.empty(base.shape[:2])
    pw = np.empty(base.shape[:2])
    pb = np.empty(base.shape[:2])
    for j, d in enumerate(DIRECTIONS):
        ratio[:, j], pw[:, j], pb[:, j] = stats.compare_batch(base[:, j], cur[:, j], direction=d)
    zones = np.empty(base.shape[:2], dtype=object)
    lower = np.array([d is Direction.LOWER_IS_BETTER for d in DIRECTIONS])
    for s in range(base.shape[0]):
        aw = np.array(stats.holm(pw[s].tolist()))
        ab = np.array(stats.holm(pb[s].tolist()))
        significant = aw <= ALPHA
        beyond = np.where(lower, ratio[s] > 1 + THRESHOLD, ratio[s] < 1 - THRESHOLD)
        better = (ab <= ALPHA) & ~significant
        zone = np.where(
            significant & beyond,
            "FAIL",
            np.where(significant | beyond | better, "WARN", "PASS"),
        )
        zones[s] = zone
    return zones, pw, ratio


def _check_against_real_verdict(base: np.ndarray, cur: np.ndarray, zones: np.ndarray) -> None:
    """The vectorized zones equal compare() + holm() + verdict() on a few sessions."""
    for s in range(3):
        comps = [
            stats.compare(f"m{j}", base[s, j], cur[s, j], direction=d, threshold=THRESHOLD)
            for j, d in enumerate(DIRECTIONS)
        ]
        aw = stats.holm([c.p_worse for c in comps])
        ab = stats.holm([c.p_better for c in comps])
        got = [stats.verdict(c, w, b, alpha=ALPHA).zone.value for c, w, b in zip(comps, aw, ab)]
        assert got == list(zones[s])


def test_false_failure_rate_no_change() -> None:
    rng = np.random.default_rng(20240601)
    base, cur = _simulate(rng, np.ones(COMPARISONS))
    zones, pw, _ratio = _zones(base, cur)
    _check_against_real_verdict(base, cur, zones)

    any_fail = float(np.mean((zones == "FAIL").any(axis=1)))
    any_warn = float(np.mean((zones == "WARN").any(axis=1)))
    any_sig = float(
        np.mean([min(stats.holm(row.tolist())) <= ALPHA for row in pw])
    )
    per_comparison = float(np.mean(pw <= ALPHA))
    print(
        f"\nno true change, {SESSIONS} sessions x {COMPARISONS} comparisons, {TRIALS} vs "
        f"{TRIALS} trials, {NOISE:.0%} noise: sessions with a FAIL {any_fail:.3%}, "
        f"with a Holm-significant worsening {any_sig:.3%}, with any WARN {any_warn:.1%}; "
        f"uncorrected per-comparison p_worse<=0.05 rate {per_comparison:.3%}"
    )
    assert any_fail <= 0.05
    assert any_sig <= 0.05  # Holm controls the family-wise rate even without the threshold
    # the uncorrected one-sided Welch test is calibrated (nominal 5%)
    assert 0.035 <= per_comparison <= 0.06  # Welch is slightly conservative at 5 vs 5


def test_power_for_15pct_regression() -> None:
    rng = np.random.default_rng(7)
    effect = np.ones(COMPARISONS)
    effect[0] = 1.15  # a 15% TTFT regression (comparison 0 is lower-is-better)
    assert DIRECTIONS[0] is Direction.LOWER_IS_BETTER
    base, cur = _simulate(rng, effect)
    zones, _pw, _ratio = _zones(base, cur)
    _check_against_real_verdict(base, cur, zones)

    power = float(np.mean(zones[:, 0] == "FAIL"))
    other_fail = float(np.mean((zones[:, 1:] == "FAIL").any(axis=1)))
    print(
        f"\ntrue 15% regression, {TRIALS} vs {TRIALS} trials, {NOISE:.0%} noise, Holm over "
        f"{COMPARISONS}: power (FAIL) {power:.1%}; sessions with a false FAIL elsewhere "
        f"{other_fail:.3%}"
    )
    assert power >= 0.90
    assert other_fail <= 0.05


@pytest.mark.parametrize("direction", list(Direction))
def test_single_comparison_power_both_directions(direction: Direction) -> None:
    """A 15% change in the bad direction is caught for both kinds of metric."""
    rng = np.random.default_rng(11)
    bad = 1.15 if direction is Direction.LOWER_IS_BETTER else 1 / 1.15
    base = np.exp(rng.normal(0, NOISE, size=(2000, TRIALS)))
    cur = bad * np.exp(rng.normal(0, NOISE, size=(2000, TRIALS)))
    _ratio, pw, _pb = stats.compare_batch(base, cur, direction=direction)
    # single comparison at Bonferroni level alpha / 20 (the strictest Holm step)
    assert np.mean(pw <= ALPHA / COMPARISONS) >= 0.95
