"""Unit tests of pytest_kvcache.stats: the run-level comparison and its parts (no server)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from pytest_kvcache import stats
from pytest_kvcache.stats import Direction, NoisePrior

LOWER = Direction.LOWER_IS_BETTER
HIGHER = Direction.HIGHER_IS_BETTER


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def runs_of(rng: np.random.Generator, level: float, runs: int, trials: int = 3, run_sd: float = 0.03,
            trial_sd: float = 0.01) -> list[list[float]]:
    return [list(level * np.exp(rng.normal(0, run_sd) + rng.normal(0, trial_sd, trials))) for _ in range(runs)]


def test_direction() -> None:
    assert LOWER.value == "lower" and HIGHER.value == "higher"
    assert LOWER.sign == 1.0 and HIGHER.sign == -1.0
    assert Direction.coerce("higher") is HIGHER and Direction.coerce(LOWER) is LOWER
    with pytest.raises(ValueError, match="lower"):
        Direction.coerce("sideways")


# ------------------------------------------------------------------ the run-level prediction


def test_one_run_against_run_means_is_a_prediction_interval() -> None:
    """By hand: tau2 from the run means (R - 1 df), the trial noise pooled from every run."""
    base = [[100.0, 101.0, 99.0], [104.0, 105.0, 103.0], [97.0, 98.0, 96.0], [102.0, 101.0, 103.0]]
    cur = [[109.0, 110.0, 111.0]]
    c = stats.compare_runs("median_ttft_ms", base, cur, direction=LOWER, threshold=0.10)
    logs = [np.log(r) for r in base]
    means = np.array([x.mean() for x in logs])
    current = np.log(cur[0])
    within = (sum(((x - x.mean()) ** 2).sum() for x in logs) + ((current - current.mean()) ** 2).sum()) / 10
    tau2 = means.var(ddof=1)
    between = tau2 - within / 3
    var = tau2 / 4 + between + within / 3
    t = (np.log(cur[0]).mean() - means.mean()) / math.sqrt(var)
    assert c.test == "run-level" and c.runs_baseline == 4 and c.runs_current == 1
    assert c.p_worse == pytest.approx(st.t.sf(t, 3))
    assert c.p_better == pytest.approx(st.t.cdf(t, 3))
    assert c.sd_log == pytest.approx(math.sqrt(var))
    assert c.between_sd == pytest.approx(math.sqrt(between)) and c.within_sd == pytest.approx(math.sqrt(within))
    assert c.baseline_value == pytest.approx(math.exp(means.mean()))
    assert c.ratio == pytest.approx(math.exp(np.log(cur[0]).mean() - means.mean()))
    assert c.ci_low < c.ratio < c.ci_high and c.noise_df == 3


def test_many_trials_per_run_do_not_hide_the_run_to_run_noise(rng: np.random.Generator) -> None:
    """Trials of one run share its run effect: pooling 50 of them must not make a 5% move
    of a testbed whose runs scatter by 3% look significant (the old trial-level test did)."""
    base = runs_of(rng, 100.0, 5, trials=50)
    cur = [list(105.0 * np.exp(rng.normal(0, 0.01, 50)))]
    c = stats.compare_runs("m", base, cur, direction=LOWER, threshold=0.10)
    trial_level = st.ttest_ind(np.log(cur[0]), np.log([v for r in base for v in r]), alternative="greater")
    assert c.p_worse > 0.05 > trial_level.pvalue


def test_higher_is_better_direction() -> None:
    base = [[1000.0, 1010.0], [990.0, 1000.0], [1005.0, 995.0]]
    c = stats.compare_runs("total_token_throughput", base, [[800.0, 805.0]], direction=HIGHER, threshold=0.05)
    assert c.p_worse < 0.01 and c.beyond_threshold and c.worse_pct == pytest.approx(20.0, abs=0.6)
    assert not stats.compare_runs("t", base, [[1200.0, 1210.0]], direction=HIGHER, threshold=0.05).beyond_threshold


def test_one_baseline_run_is_not_judged_without_a_noise_figure() -> None:
    c = stats.compare_runs("m", [[100.0, 101.0, 99.0]], [[150.0, 151.0, 149.0]], direction=LOWER, threshold=0.1)
    assert c.test == "insufficient-runs" and not c.judged
    assert c.p_worse == c.p_better == 1.0 and c.runs_needed == 3
    assert "--kv-run-noise" in c.note and "--update-baselines" in c.note
    prior = NoisePrior.configured(0.03)
    judged = stats.compare_runs("m", [[100.0, 101.0, 99.0]], [[150.0, 151.0, 149.0]], direction=LOWER,
                                threshold=0.1, prior=prior)
    assert judged.judged and judged.p_worse < 1e-6 and judged.noise_source == "configured (3%)"


def test_identical_values_are_exact_equal() -> None:
    c = stats.compare_runs("m", [[5.0, 5.0], [5.0, 5.0]], [[5.0, 5.0]], direction=LOWER, threshold=0.1)
    assert c.test == "exact-equal" and c.p_worse == c.p_better == 1.0 and c.ratio == 1.0


def test_floors_keep_a_deterministic_testbed_from_flagging_a_wobble() -> None:
    """Three identical baseline runs; 1% slower now: the run floor (0.5%) keeps p sane."""
    base = [[100.0, 100.0, 100.0]] * 3
    c = stats.compare_runs("m", base, [[101.0, 101.0, 101.0]], direction=LOWER, threshold=0.1)
    assert 0.01 < c.p_worse < 0.5
    assert c.sd_log >= stats.RUN_SD_FLOOR


def test_a_prior_moderates_the_items_own_spread() -> None:
    base = [[100.0], [100.4], [99.7]]  # 0.35% spread: with its own 2 df alone a 3% move is significant
    cur = [[103.0]]
    alone = stats.compare_runs("m", base, cur, direction=LOWER, threshold=0.1)
    prior = NoisePrior(var=0.03 ** 2, df=40.0, source="pooled")
    moderated = stats.compare_runs("m", base, cur, direction=LOWER, threshold=0.1, prior=prior)
    assert moderated.p_worse > 0.15 > 0.05 > alone.p_worse
    assert moderated.noise_df == 42 and "pooled" in moderated.noise_source


def test_disagreeing_baseline_runs_are_reported_and_judge_alone() -> None:
    base = [[100.0, 100.5], [130.0, 130.5], [100.2, 100.1]]
    cur = [[125.0, 125.0]]
    for df in (50.0, math.inf):
        prior = NoisePrior(var=0.01 ** 2, df=df, source="pooled")
        c = stats.compare_runs("m", base, cur, direction=LOWER, threshold=0.1, prior=prior)
        assert "disagree beyond this testbed's run-to-run noise" in c.note and "--reset-baselines" in c.note
        # the pool's 1% would make +13% certain; the item's own 16% spread (2 df) does not
        assert c.noise_source == "this item's 3 runs alone" and c.noise_df == 2 and c.p_worse > 0.05
    quiet = stats.compare_runs("m", [[100.0], [101.5], [99.0]], cur, direction=LOWER, threshold=0.1,
                               prior=NoisePrior(var=0.01 ** 2, df=math.inf, source="pooled"))
    assert quiet.noise_source == "this item's 3 runs and pooled" and quiet.p_worse < 1e-6 and not quiet.note


def test_beyond_prior_is_an_f_test_at_one_percent() -> None:
    limit = st.f.isf(0.01, 2, 20)
    assert stats.beyond_prior(1.01 * limit, 2.0, 1.0, 20.0) and not stats.beyond_prior(0.99 * limit, 2.0, 1.0, 20.0)
    limit = st.chi2.isf(0.01, 4) / 4  # a prior taken as known
    assert stats.beyond_prior(1.01 * limit, 4.0, 1.0, math.inf)
    assert not stats.beyond_prior(0.99 * limit, 4.0, 1.0, math.inf)
    assert not stats.beyond_prior(100.0, 2.0, 1.0, 0.0)  # no prior: nothing to be beyond


def test_runs_needed_and_detectable_effect() -> None:
    base = [[100.0, 101.0], [103.0, 104.0]]
    c = stats.compare_runs("m", base, [[102.0, 102.5]], direction=LOWER, threshold=0.1, alpha=0.01)
    assert c.mde_pct > 10 and c.runs_needed is not None and c.runs_needed > 2
    assert f"{c.runs_needed} baseline runs would be needed" in c.note
    noisy = [[100.0], [120.0], [85.0], [110.0]]
    c = stats.compare_runs("m", noisy, [[100.0]], direction=LOWER, threshold=0.05, alpha=0.001)
    assert c.runs_needed is None and "more baseline runs cannot fix that" in c.note


def test_bad_values_name_the_metric() -> None:
    with pytest.raises(ValueError, match="'m'.*> 0"):
        stats.compare_runs("m", [[1.0, -1.0]], [[1.0]], direction=LOWER, threshold=0.1)
    with pytest.raises(ValueError, match="'m'"):
        stats.compare_runs("m", [], [[1.0]], direction=LOWER, threshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        stats.compare_runs("m", [[1.0]], [[1.0]], direction=HIGHER, threshold=1.5)


def test_to_dict_is_jsonable(rng: np.random.Generator) -> None:
    c = stats.compare_runs("m", runs_of(rng, 10, 3), runs_of(rng, 10, 1), direction=LOWER, threshold=0.1,
                           prior=NoisePrior.configured(0.02))
    d = c.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["direction"] == "lower" and d["runs_baseline"] == 3


# ------------------------------------------------------------------ confirmation runs


def test_min_tail_against_closed_forms_and_simulation(rng: np.random.Generator) -> None:
    u = np.array([-1.0, 0.0, 1.5, 3.0])
    assert stats._min_tail(u, 0.0, 1) == pytest.approx(st.norm.sf(u), abs=1e-9)
    assert stats._min_tail(u, 0.0, 3) == pytest.approx(st.norm.sf(u) ** 3, abs=1e-9)
    assert stats._min_tail(u, 0.999, 2) == pytest.approx(st.norm.sf(u), abs=0.02)
    w = rng.standard_normal(400_000)
    z = math.sqrt(0.4) * w[:, None] + math.sqrt(0.6) * rng.standard_normal((400_000, 2))
    assert stats._min_tail(1.0, 0.4, 2) == pytest.approx((z.min(1) >= 1.0).mean(), abs=0.003)


def test_min_tail_shares_one_variance_estimate_between_the_runs(rng: np.random.Generator) -> None:
    t = np.array([0.5, 2.0, 6.0, 30.0])
    for df in (2.0, 4.0, 30.0):
        assert stats._min_tail(t, 0.0, 1, df) == pytest.approx(st.t.sf(t, df), rel=0.005)
    n, df, rho = 400_000, 3.0, 0.4
    scale = np.sqrt(rng.chisquare(df, n) / df)
    z = math.sqrt(rho) * rng.standard_normal(n)[:, None] + math.sqrt(1 - rho) * rng.standard_normal((n, 2))
    tmin = (z / scale[:, None]).min(1)
    for u in (1.0, 3.0):
        assert stats._min_tail(u, rho, 2, df) == pytest.approx((tmin >= u).mean(), rel=0.03)
    # the shared estimate: far more likely than two independent-looking t tails say
    assert stats._min_tail(3.0, rho, 2, df) > 1.5 * float(stats._min_tail(st.norm.isf(st.t.sf(3.0, df)), rho, 2))


def test_confirmed_comparisons_hold_their_level_with_few_baseline_runs(rng: np.random.Generator) -> None:
    """Three baseline runs judged alone (2 df), a first and a confirmation run, no change."""
    n = 20_000
    base = 100.0 * np.exp(0.05 * rng.standard_normal((n, 3, 1)) + 0.01 * rng.standard_normal((n, 3, 3)))
    cur = 100.0 * np.exp(0.05 * rng.standard_normal((n, 2, 1)) + 0.01 * rng.standard_normal((n, 2, 3)))
    _ratio, p_worse, _ = stats.compare_runs_batch(base, cur, direction=LOWER, night_var=0.0)
    for level in (0.01, 0.05):
        assert (p_worse <= level).mean() <= 1.1 * level


def test_a_confirmed_regression_is_far_more_significant_than_one_run(rng: np.random.Generator) -> None:
    base = runs_of(rng, 100.0, 5)
    first = [list(112.0 * np.exp(rng.normal(0, 0.01, 3)))]
    again = [list(113.0 * np.exp(rng.normal(0, 0.01, 3)))]
    prior = NoisePrior(var=0.03 ** 2, df=80.0, source="pooled", night_var=0.0)
    one = stats.compare_runs("m", base, first, direction=LOWER, threshold=0.1, prior=prior)
    two = stats.compare_runs("m", base, first + again, direction=LOWER, threshold=0.1, prior=prior)
    assert two.test == "run-level, confirmed" and two.runs_current == 2
    assert two.p_worse < one.p_worse / 5
    # one server for both runs (an external endpoint): they share its run effect, less is gained
    shared = stats.compare_runs("m", base, first + again, direction=LOWER, threshold=0.1, prior=prior,
                                shared_current=True)
    assert two.p_worse < shared.p_worse
    # a first run far out and a confirmation at the baseline: not significant
    back = [list(100.0 * np.exp(rng.normal(0, 0.01, 3)))]
    assert stats.compare_runs("m", base, first + back, direction=LOWER, threshold=0.1, prior=prior).p_worse > 0.1


# ------------------------------------------------------------------ pooled noise


def test_fit_noise_prior_recovers_a_common_variance(rng: np.random.Generator) -> None:
    s2 = 0.03 ** 2 * rng.chisquare(4, size=(200, 40)) / 4  # homogeneous items, 4 df each
    s0, d0 = stats.fit_noise_prior(s2, 4.0)
    assert np.median(np.sqrt(s0)) == pytest.approx(0.03, rel=0.05)
    assert np.median(np.where(np.isinf(d0), 1e9, d0)) > 30  # no real spread between items


def test_fit_noise_prior_sees_items_that_differ(rng: np.random.Generator) -> None:
    sd = np.exp(rng.normal(np.log(0.03), 0.5, size=(100, 40)))  # item noise varies by a factor ~1.6
    s2 = sd ** 2 * rng.chisquare(4, size=(100, 40)) / 4
    _s0, d0 = stats.fit_noise_prior(s2, 4.0)
    assert np.median(d0) < 10
    with pytest.raises(ValueError, match="2 items"):
        stats.fit_noise_prior([0.001], 4.0)


def test_fit_noise_prior_leaves_out_items_noisier_than_the_rest(rng: np.random.Generator) -> None:
    sd = np.array([0.01] * 20 + [0.06] * 3)  # three items six times noisier, 3 runs (2 df) each
    s2 = sd ** 2 * rng.chisquare(2, size=(500, 23)) / 2
    s0, d0 = stats.fit_noise_prior(s2, 2.0)
    assert np.median(np.sqrt(s0)) == pytest.approx(0.01, rel=0.15) and np.mean(np.isinf(d0)) > 0.8
    # all of them pooled (limma's plain fit): a weak prior for every item, the quiet ones' power gone
    _, plain_d0 = stats._fit_moments(s2, np.full(s2.shape, 2.0), np.ones(s2.shape, dtype=bool))
    assert np.median(plain_d0) < 10
    # what the fit left out, the comparison judges alone
    flagged = stats.beyond_prior(s2, 2.0, s0[:, None], d0[:, None])
    assert flagged[:, 20:].mean() > 0.75 and flagged[:, :20].mean() < 0.02


def test_night_variance_bounds_the_shared_part(rng: np.random.Generator) -> None:
    sessions, items, runs = 2000, 20, 5
    night = 0.02 * rng.standard_normal((sessions, 1, runs))
    own = 0.02 * rng.standard_normal((sessions, items, runs))
    upper = stats.night_variance(night + own)
    assert 0.85 < (upper >= 0.02 ** 2).mean() < 0.97  # an upper 90% bound
    assert np.median(stats.night_variance(own)) < 0.0002  # no shared part: small
    with pytest.raises(ValueError, match="3 items"):
        stats.night_variance(np.zeros((2, 5)))


def test_batch_equals_one_by_one(rng: np.random.Generator) -> None:
    base = 100 * np.exp(rng.normal(0, 0.03, (6, 4, 1)) + rng.normal(0, 0.01, (6, 4, 3)))
    cur = 104 * np.exp(rng.normal(0, 0.03, (6, 2, 1)) + rng.normal(0, 0.01, (6, 2, 3)))
    prior = NoisePrior(var=0.0008, df=30.0, source="pooled", night_var=0.0002)
    for direction in (LOWER, HIGHER):
        for k in (1, 2):
            ratio, pw, pb = stats.compare_runs_batch(base, cur[:, :k], direction=direction, prior_var=prior.var,
                                                     prior_df=prior.df, night_var=prior.night_var)
            for row in range(6):
                c = stats.compare_runs("m", base[row].tolist(), cur[row, :k].tolist(), direction=direction,
                                       threshold=0.04, prior=prior)
                assert (ratio[row], pw[row], pb[row]) == pytest.approx((c.ratio, c.p_worse, c.p_better))


# ------------------------------------------------------------------ paired


def test_paired_removes_the_drift_between_pairs() -> None:
    ref = [100.0, 110.0, 95.0, 105.0]
    cand = [r * 0.8 for r in ref]
    c = stats.compare_paired("median_ttft_ms", ref, cand, direction=LOWER, threshold=0.1)
    assert c.test == "paired-t" and c.p_better < 1e-6 and c.ratio == pytest.approx(0.8)
    with pytest.raises(ValueError, match="as many"):
        stats.compare_paired("m", [1.0, 2.0], [1.0], direction=LOWER, threshold=0.1)
    assert stats.compare_paired("m", [1.0], [2.0], direction=LOWER, threshold=0.1).test == "insufficient-pairs"


# ------------------------------------------------------------------ multiplicity


def test_holm_hand_computed() -> None:
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.045, 0.001, 0.04]) == pytest.approx([0.08, 0.003, 0.08])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == [] and stats.holm([0.2]) == [0.2]


def test_bh_hand_computed() -> None:
    assert stats.benjamini_hochberg([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.04, 0.04, 0.5, 0.04])
    assert stats.benjamini_hochberg([0.045, 0.001, 0.04]) == pytest.approx([0.045, 0.003, 0.045])
    assert stats.benjamini_hochberg([]) == []


def test_multiplicity_rejects_bad_p() -> None:
    for fn in (stats.holm, stats.benjamini_hochberg):
        with pytest.raises(ValueError):
            fn([0.1, float("nan")])
        with pytest.raises(ValueError):
            fn([1.5])


def test_holm_dominates_bh(rng: np.random.Generator) -> None:
    ps = rng.uniform(0, 0.1, 30).tolist()
    for h, b, p in zip(stats.holm(ps), stats.benjamini_hochberg(ps), ps):
        assert p <= b <= h <= 1.0


def test_threshold_log() -> None:
    assert stats.threshold_log(0.10, LOWER) == pytest.approx(math.log(1.1))
    assert stats.threshold_log(0.05, "higher") == pytest.approx(-math.log(0.95))
    with pytest.raises(ValueError):
        stats.threshold_log(0.0, LOWER)
