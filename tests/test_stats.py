"""Unit tests of pytest_kvcache.stats (no server, no plugin)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from pytest_kvcache import stats
from pytest_kvcache.stats import Direction, MetricComparison, Zone

LOWER = Direction.LOWER_IS_BETTER
HIGHER = Direction.HIGHER_IS_BETTER

BASE = [100.0, 102.0, 98.0, 101.0, 99.0]
SLOW = [115.0, 117.0, 113.0, 116.0, 114.0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------ enums


def test_enum_values() -> None:
    assert LOWER.value == "lower" and HIGHER.value == "higher"
    assert [z.value for z in Zone] == ["PASS", "WARN", "FAIL"]
    assert Direction.coerce("higher") is HIGHER
    assert Direction.coerce(LOWER) is LOWER
    with pytest.raises(ValueError, match="lower"):
        Direction.coerce("sideways")


# ------------------------------------------------------------------ compare: Welch


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("direction", [LOWER, HIGHER])
def test_welch_matches_scipy(seed: int, direction: Direction) -> None:
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(4.6, 0.05, size=6))
    cur = np.exp(rng.normal(4.65, 0.08, size=4))
    c = stats.compare("m", base, cur, direction=direction, threshold=0.1)
    lx, ly = np.log(base), np.log(cur)
    up = st.ttest_ind(ly, lx, equal_var=False, alternative="greater").pvalue
    down = st.ttest_ind(ly, lx, equal_var=False, alternative="less").pvalue
    want_worse, want_better = (up, down) if direction is LOWER else (down, up)
    assert c.test == "welch"
    assert c.p_worse == pytest.approx(want_worse, rel=1e-10, abs=1e-15)
    assert c.p_better == pytest.approx(want_better, rel=1e-10, abs=1e-15)
    assert c.ratio == pytest.approx(math.exp(ly.mean() - lx.mean()))
    assert c.baseline_value == pytest.approx(st.gmean(base))
    assert c.current_value == pytest.approx(st.gmean(cur))
    assert c.change_pct == pytest.approx((c.ratio - 1) * 100)
    # the 95% CI is scipy's two-sided Welch interval of the log difference, exponentiated
    ci = st.ttest_ind(ly, lx, equal_var=False).confidence_interval(0.95)
    assert c.ci_low == pytest.approx(math.exp(ci.low))
    assert c.ci_high == pytest.approx(math.exp(ci.high))
    assert "floor" not in c.note


def test_clear_regression_lower_is_better() -> None:
    c = stats.compare("median_ttft_ms", BASE, SLOW, direction=LOWER, threshold=0.10)
    assert c.n_baseline == 5 and c.n_current == 5
    assert c.ratio == pytest.approx(1.15, rel=1e-3)
    assert c.p_worse < 1e-5
    assert c.p_better > 0.99
    assert c.ci_low < c.ratio < c.ci_high
    assert c.beyond_threshold
    assert c.worse_pct == pytest.approx(15.0, abs=0.1)
    assert c.trials_needed is None  # 1.5% noise, 5 trials: enough for 10%
    assert c.mde_pct is not None and c.mde_pct < 10


def test_higher_is_better_direction() -> None:
    c = stats.compare("throughput", SLOW, BASE, direction="higher", threshold=0.05)
    assert c.direction is HIGHER
    assert c.ratio < 0.9
    assert c.p_worse < 1e-5 and c.p_better > 0.99
    assert c.beyond_threshold
    c2 = stats.compare("throughput", BASE, SLOW, direction="higher", threshold=0.05)
    assert c2.p_better < 1e-5 and not c2.beyond_threshold


def test_higher_is_better_threshold_boundary() -> None:
    # ratio 0.96 is within a 5% threshold for throughput, 0.94 is beyond it
    within = stats.compare("tput", [100.0] * 3, [96.0] * 3, direction=HIGHER, threshold=0.05)
    beyond = stats.compare("tput", [100.0] * 3, [94.0] * 3, direction=HIGHER, threshold=0.05)
    assert not within.beyond_threshold and beyond.beyond_threshold


def test_to_dict_is_jsonable() -> None:
    import json

    c = stats.compare("m", BASE, SLOW, direction=LOWER, threshold=0.1)
    d = c.to_dict()
    assert d["direction"] == "lower" and d["metric"] == "m"
    json.dumps(d)
    assert isinstance(c, MetricComparison)
    with pytest.raises(AttributeError):
        c.ratio = 2.0  # type: ignore[misc]  # frozen


# ------------------------------------------------------------------ compare: degenerate


def test_identical_values_exact_equal() -> None:
    c = stats.compare("m", [50.0] * 5, [50.0] * 5, direction=LOWER, threshold=0.1)
    assert c.test == "exact-equal"
    assert c.p_worse == 1.0 and c.p_better == 1.0
    assert c.ratio == pytest.approx(1.0)
    assert "identical" in c.note
    assert not math.isnan(c.ci_low) and c.ci_low <= 1.0 <= c.ci_high


def test_zero_variance_shift_uses_floor() -> None:
    c = stats.compare("m", [50.0] * 5, [50.5] * 5, direction=LOWER, threshold=0.1)
    assert c.test == "welch"
    assert c.p_worse < 1e-4 and math.isfinite(c.p_worse)
    assert c.p_better > 0.999
    assert "floor" in c.note
    assert c.sd_log == pytest.approx(stats.SD_LOG_FLOOR)


def test_zero_variance_one_side_only() -> None:
    c = stats.compare("m", [50.0] * 4, [50.0, 50.1, 49.9, 50.0], direction=LOWER, threshold=0.1)
    assert c.test == "welch"
    assert 0.2 < c.p_worse < 0.8 and math.isfinite(c.p_better)
    assert "floor" in c.note


def test_prediction_single_current_trial() -> None:
    hist = [100.0, 103.0, 97.0, 101.0, 99.0, 100.5]
    c = stats.compare("m", hist, [130.0], direction=LOWER, threshold=0.1)
    assert c.test == "prediction"
    lx = np.log(hist)
    n = len(hist)
    s = lx.std(ddof=1)
    tstat = (math.log(130.0) - lx.mean()) / (s * math.sqrt(1 + 1 / n))
    assert c.p_worse == pytest.approx(st.t.sf(tstat, n - 1))
    assert c.p_better == pytest.approx(st.t.cdf(tstat, n - 1))
    assert c.p_worse < 0.001
    half = st.t.ppf(0.975, n - 1) * s * math.sqrt(1 + 1 / n)
    assert c.ci_low == pytest.approx(math.exp(math.log(130.0) - lx.mean() - half))
    assert "prediction interval" in c.note
    # a value inside the history is not significant
    ok = stats.compare("m", hist, [101.0], direction=LOWER, threshold=0.1)
    assert ok.p_worse > 0.2


def test_prediction_single_baseline_trial() -> None:
    c = stats.compare("m", [100.0], [130.0, 131.0, 129.0], direction=LOWER, threshold=0.1)
    assert c.test == "prediction"
    assert c.p_worse < 0.01
    assert "one baseline trial" in c.note


@pytest.mark.parametrize("nb,nc", [(1, 1), (2, 1), (1, 2)])
def test_insufficient_trials(nb: int, nc: int) -> None:
    c = stats.compare("m", [100.0 + i for i in range(nb)], [150.0 + i for i in range(nc)],
                      direction=LOWER, threshold=0.1)
    assert c.test == "insufficient"
    assert c.p_worse == 1.0 and c.p_better == 1.0
    assert "too few trials" in c.note
    assert c.ratio > 1.4  # point estimate still reported
    v = stats.verdict(c, c.p_worse, c.p_better, alpha=0.05)
    assert v.zone is Zone.WARN and not v.significant and v.beyond_threshold


def test_two_vs_two_is_welch() -> None:
    c = stats.compare("m", [100.0, 101.0], [110.0, 111.0], direction=LOWER, threshold=0.1)
    assert c.test == "welch" and 0 < c.p_worse < 0.05


@pytest.mark.parametrize("bad", [[0.0, 1.0], [-1.0, 2.0], [float("nan"), 1.0], [float("inf"), 1.0]])
def test_non_positive_values_rejected(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="median_ttft_ms"):
        stats.compare("median_ttft_ms", bad, [1.0, 2.0], direction=LOWER, threshold=0.1)
    with pytest.raises(ValueError, match="median_ttft_ms"):
        stats.compare("median_ttft_ms", [1.0, 2.0], bad, direction=LOWER, threshold=0.1)


def test_empty_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tpot"):
        stats.compare("tpot", [], [1.0], direction=LOWER, threshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        stats.compare("tpot", [1.0, 2.0], [1.0, 2.0], direction=LOWER, threshold=0)
    with pytest.raises(ValueError, match="threshold"):
        stats.compare("tpot", [1.0, 2.0], [1.0, 2.0], direction=HIGHER, threshold=1.0)
    with pytest.raises(ValueError, match="alpha"):
        stats.compare("tpot", [1.0, 2.0], [1.0, 2.0], direction=LOWER, threshold=0.1, alpha=0)


def test_mde_and_trials_needed_in_comparison(rng: np.random.Generator) -> None:
    noisy_b = np.exp(rng.normal(0, 0.15, 3))
    noisy_c = np.exp(rng.normal(0, 0.15, 3))
    c = stats.compare("m", noisy_b, noisy_c, direction=LOWER, threshold=0.05)
    assert c.mde_pct is not None and c.mde_pct > 5
    assert c.trials_needed is not None and c.trials_needed > 3
    assert f"{c.trials_needed} trials per side" in c.note
    assert c.sd_log is not None
    # the stated count really does bring the MDE under the threshold
    mde = stats.minimum_detectable_effect(c.sd_log, c.trials_needed, c.trials_needed, alpha=0.05)
    assert mde <= math.log(1.05)


def test_bootstrap_only_with_eight_trials(rng: np.random.Generator) -> None:
    b7 = np.exp(rng.normal(0, 0.03, 7))
    c7 = np.exp(rng.normal(0.1, 0.03, 7))
    small = stats.compare("m", b7, c7, direction=LOWER, threshold=0.1)
    assert small.bootstrap_low is None and small.bootstrap_high is None
    b8 = np.exp(rng.normal(0, 0.03, 8))
    c8 = np.exp(rng.normal(0.1, 0.03, 8))
    big = stats.compare("m", b8, c8, direction=LOWER, threshold=0.1)
    assert big.bootstrap_low is not None and big.bootstrap_high is not None
    assert big.bootstrap_low < big.ratio < big.bootstrap_high


def test_bootstrap_ratio_ci(rng: np.random.Generator) -> None:
    b = np.exp(rng.normal(0, 0.03, 20))
    c = np.exp(rng.normal(math.log(1.2), 0.03, 20))
    lo, hi = stats.bootstrap_ratio_ci(b, c, seed=0)
    assert lo < 1.2 < hi and hi - lo < 0.1
    assert (lo, hi) == stats.bootstrap_ratio_ci(b, c, seed=0)  # seeded
    lo90, hi90 = stats.bootstrap_ratio_ci(b, c, confidence=0.90, seed=0)
    assert lo <= lo90 and hi90 <= hi
    with pytest.raises(ValueError):
        stats.bootstrap_ratio_ci([1.0], [1.0, 2.0])


# ------------------------------------------------------------------ compare_batch


def test_compare_batch_matches_compare(rng: np.random.Generator) -> None:
    base = np.exp(rng.normal(0, 0.03, size=(6, 5)))
    cur = np.exp(rng.normal(0.05, 0.03, size=(6, 4)))
    cur[5] = base[5, 0] * (1 + 1e-6)  # near-deterministic row: floor path
    base[4] = 7.0
    cur[4] = 7.0  # all-identical row: exact-equal
    for direction in (LOWER, HIGHER):
        ratio, pw, pb = stats.compare_batch(base, cur, direction=direction)
        for i in range(base.shape[0]):
            c = stats.compare("m", base[i], cur[i], direction=direction, threshold=0.1)
            assert ratio[i] == pytest.approx(c.ratio, rel=1e-12)
            assert pw[i] == pytest.approx(c.p_worse, rel=1e-9, abs=1e-300)
            assert pb[i] == pytest.approx(c.p_better, rel=1e-9, abs=1e-300)
    with pytest.raises(ValueError):
        stats.compare_batch(base[:, :1], cur, direction=LOWER)


# ------------------------------------------------------------------ rank test


def test_rank_test_allowed_guard() -> None:
    assert not stats.rank_test_allowed(3, 3, 0.05)  # 1/20 == 0.05 is not < 0.05
    assert stats.rank_test_allowed(4, 4, 0.05)  # 1/70
    assert stats.rank_test_allowed(3, 4, 0.05)  # 1/35
    assert not stats.rank_test_allowed(2, 2, 0.05)
    assert stats.rank_test_allowed(1, 30, 0.05)  # 1/31
    assert not stats.rank_test_allowed(1, 19, 0.05)  # 1/20
    assert not stats.rank_test_allowed(0, 5, 0.05)


def test_rank_test_allowed_formula() -> None:
    for n1 in range(1, 7):
        for n2 in range(1, 7):
            assert stats.rank_test_allowed(n1, n2, 0.05) == (1 / math.comb(n1 + n2, n1) < 0.05)


def test_mann_whitney() -> None:
    assert stats.mann_whitney(BASE[:3], SLOW[:3], direction=LOWER) is None
    p = stats.mann_whitney(BASE, SLOW, direction=LOWER)
    assert p == pytest.approx(1 / math.comb(10, 5))  # complete separation, exact
    assert stats.mann_whitney(BASE, SLOW, direction=HIGHER) == pytest.approx(1.0)
    c = stats.compare("m", BASE, SLOW, direction=LOWER, threshold=0.1)
    assert c.p_worse_rank == pytest.approx(p)


# ------------------------------------------------------------------ multiplicity


def test_holm_hand_computed() -> None:
    # sorted: 0.01*4=0.04, 0.02*3=0.06, 0.03*2=0.06 (monotone), 0.5*1=0.5
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    # monotone step: 0.001*3=0.003, 0.04*2=0.08, 0.045*1=0.045 -> raised to 0.08
    assert stats.holm([0.045, 0.001, 0.04]) == pytest.approx([0.08, 0.003, 0.08])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped
    assert stats.holm([]) == []
    assert stats.holm([0.2]) == [0.2]


def test_bh_hand_computed() -> None:
    # sorted 0.01,0.02,0.03,0.5 (m=4): 0.04, 0.04, 0.04, 0.5
    assert stats.benjamini_hochberg([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.04, 0.04, 0.5, 0.04])
    # 0.001*3/1=0.003, 0.04*3/2=0.06, 0.045*3/3=0.045 -> 0.06 lowered to 0.045
    assert stats.benjamini_hochberg([0.045, 0.001, 0.04]) == pytest.approx([0.045, 0.003, 0.045])
    assert stats.benjamini_hochberg([]) == []


def test_bh_fallback_matches_scipy(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    ps = rng.uniform(0, 0.2, 15).tolist()
    want = stats.benjamini_hochberg(ps)
    import scipy.stats

    monkeypatch.delattr(scipy.stats, "false_discovery_control")
    assert stats.benjamini_hochberg(ps) == pytest.approx(want)


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


# ------------------------------------------------------------------ verdict


def _cmp(ratio: float, direction: Direction, threshold: float, **kw: object) -> MetricComparison:
    base = {
        "metric": "median_ttft_ms",
        "direction": direction,
        "threshold": threshold,
        "alpha": 0.05,
        "confidence": 0.95,
        "n_baseline": 5,
        "n_current": 5,
        "baseline_value": 100.0,
        "current_value": 100.0 * ratio,
        "ratio": ratio,
        "change_pct": (ratio - 1) * 100,
        "ci_low": ratio * 0.98,
        "ci_high": ratio * 1.02,
        "p_worse": 0.5,
        "p_better": 0.5,
        "test": "welch",
        "sd_log": 0.03,
        "mde_pct": 5.0,
        "trials_needed": None,
        "note": "",
    }
    base.update(kw)
    return MetricComparison(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "direction,worse_ratio,small_worse_ratio,better_ratio",
    [(LOWER, 1.20, 1.05, 0.85), (HIGHER, 0.80, 0.97, 1.15)],
)
def test_verdict_zones(
    direction: Direction, worse_ratio: float, small_worse_ratio: float, better_ratio: float
) -> None:
    thr = 0.10 if direction is LOWER else 0.05
    # FAIL: significant and beyond threshold
    v = stats.verdict(_cmp(worse_ratio, direction, thr), 0.003, 1.0, alpha=0.05)
    assert v.zone is Zone.FAIL and v.significant and v.beyond_threshold and not v.better
    assert "20.0% worse than baseline" in v.reason and "after Holm" in v.reason
    assert "p=0.003" in v.reason
    # WARN: significant, within threshold
    v = stats.verdict(_cmp(small_worse_ratio, direction, thr), 0.01, 1.0, alpha=0.05)
    assert v.zone is Zone.WARN and v.significant and not v.beyond_threshold
    assert "within" in v.reason
    # WARN: beyond threshold, not significant
    v = stats.verdict(_cmp(worse_ratio, direction, thr), 0.2, 1.0, alpha=0.05)
    assert v.zone is Zone.WARN and not v.significant and v.beyond_threshold
    assert "not significant" in v.reason
    # WARN: significantly better -> refresh the baseline
    v = stats.verdict(_cmp(better_ratio, direction, thr), 1.0, 0.001, alpha=0.05)
    assert v.zone is Zone.WARN and v.better and not v.significant
    assert "--update-baselines" in v.reason and "better" in v.reason
    # PASS: neither
    v = stats.verdict(_cmp(1.01, direction, thr), 0.4, 0.6, alpha=0.05)
    assert v.zone is Zone.PASS and not (v.significant or v.beyond_threshold or v.better)
    # better but not significantly: PASS
    v = stats.verdict(_cmp(better_ratio, direction, thr), 1.0, 0.2, alpha=0.05)
    assert v.zone is Zone.PASS


def test_verdict_reason_example() -> None:
    c = _cmp(1.201, LOWER, 0.10)
    v = stats.verdict(c, 0.003, 1.0, alpha=0.05)
    assert v.reason == "median_ttft_ms 20.1% worse than baseline (threshold 10%), p=0.003 after Holm"
    assert v.to_dict()["zone"] == "FAIL"


def test_verdict_mentions_trials_needed() -> None:
    c = _cmp(1.2, LOWER, 0.10, trials_needed=12, mde_pct=25.0)
    v = stats.verdict(c, 0.3, 1.0, alpha=0.05)
    assert v.zone is Zone.WARN and "12 trials per side" in v.reason


def test_verdict_threshold_exact_boundary() -> None:
    # exactly at the threshold is not "worse than threshold"
    assert not _cmp(1.10, LOWER, 0.10).beyond_threshold
    assert _cmp(1.1001, LOWER, 0.10).beyond_threshold
    assert not _cmp(0.95, HIGHER, 0.05).beyond_threshold
    assert _cmp(0.9499, HIGHER, 0.05).beyond_threshold


def test_verdict_end_to_end_with_holm() -> None:
    comps = [
        stats.compare("ttft", BASE, SLOW, direction=LOWER, threshold=0.1),
        stats.compare("tpot", BASE, BASE[::-1], direction=LOWER, threshold=0.1),
        stats.compare("tput", BASE, SLOW, direction=HIGHER, threshold=0.05),
    ]
    aw = stats.holm([c.p_worse for c in comps])
    ab = stats.holm([c.p_better for c in comps])
    zones = [stats.verdict(c, w, b, alpha=0.05).zone for c, w, b in zip(comps, aw, ab)]
    assert zones == [Zone.FAIL, Zone.PASS, Zone.WARN]


def test_verdict_rejects_bad_p() -> None:
    with pytest.raises(ValueError):
        stats.verdict(_cmp(1.0, LOWER, 0.1), float("nan"), 0.5, alpha=0.05)


# ------------------------------------------------------------------ power


def test_minimum_detectable_effect_formula() -> None:
    d = stats.minimum_detectable_effect(0.03, 5, 5, alpha=0.05, power=0.8)
    want = (st.t.ppf(0.95, 8) + st.t.ppf(0.8, 8)) * 0.03 * math.sqrt(0.4)
    assert d == pytest.approx(want)
    assert stats.minimum_detectable_effect(0.03, 50, 50, alpha=0.05) < d
    assert stats.minimum_detectable_effect(0.0, 5, 5, alpha=0.05) == 0.0
    with pytest.raises(ValueError):
        stats.minimum_detectable_effect(0.03, 1, 1, alpha=0.05)
    with pytest.raises(ValueError):
        stats.minimum_detectable_effect(-1.0, 5, 5, alpha=0.05)


def test_trials_needed() -> None:
    n = stats.trials_needed(0.03, 0.10, alpha=0.05)
    assert n == 2 or stats.minimum_detectable_effect(0.03, n - 1, n - 1, alpha=0.05) > math.log(1.1)
    assert stats.minimum_detectable_effect(0.03, n, n, alpha=0.05) <= math.log(1.1)
    big = stats.trials_needed(0.2, 0.02, alpha=0.05)
    assert big > 100
    assert stats.minimum_detectable_effect(0.2, big, big, alpha=0.05) <= math.log(1.02)
    assert stats.minimum_detectable_effect(0.2, big - 1, big - 1, alpha=0.05) > math.log(1.02)
    # higher-is-better: a 5% drop is a larger log distance than a 5% rise -> fewer trials
    lo = stats.trials_needed(0.1, 0.05, alpha=0.05, direction=LOWER)
    hi = stats.trials_needed(0.1, 0.05, alpha=0.05, direction="higher")
    assert hi <= lo
    assert stats.trials_needed(0.0, 0.05, alpha=0.05) == 2


def test_threshold_log() -> None:
    assert stats.threshold_log(0.1, LOWER) == pytest.approx(math.log(1.1))
    assert stats.threshold_log(0.05, HIGHER) == pytest.approx(-math.log(0.95))
