"""Change point detection (pytest_kvcache.changepoints) and its plot (report.history_plots)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pytest_kvcache.changepoints import ChangePoint, detect
from pytest_kvcache.report.history_plots import plot_series
from helpers.changepoints import indices, noisy


# --- the required behaviour ---------------------------------------------------------


def test_a_6pct_step_in_16_points_is_found_exactly_where_it_is():
    right = 0
    for seed in range(50):
        v = noisy(16, seed)
        v[8:] *= 1.06
        right += indices(v) == [8]
    assert right >= 48


def test_a_flat_series_of_8_points_has_no_change_point():
    quiet = sum(indices(noisy(8, seed)) == [] for seed in range(50))
    assert quiet >= 49


def test_several_changes_in_one_series_are_all_found():
    exact = 0
    for seed in range(20):
        v = noisy(80, seed)
        v[20:] *= 1.10
        v[45:] *= 0.92
        v[62:] *= 1.15
        found = indices(v)
        assert {20, 45, 62} <= set(found), seed
        exact += found == [20, 45, 62]
    assert exact >= 18  # now and then noise passes max_p too


def test_a_spike_next_to_a_step_does_not_move_or_double_it():
    for seed in range(20):
        v = noisy(40, seed)
        v[20:] *= 1.08
        v[30] *= 1.05
        found = indices(v)
        assert 20 in found and not any(25 <= i <= 35 for i in found), (seed, found)


def test_a_slow_drift_is_reported_as_a_staircase_in_its_direction():
    for seed in range(10):
        for total in (0.10, -0.10):  # 10% over 60 runs: each step 0.17%, the noise 1%
            drift = np.exp(np.linspace(0.0, np.log1p(total), 60))
            cps = detect(noisy(60, seed) * drift)
            assert cps, (seed, total)
            assert all((c.change_pct > 0) == (total > 0) for c in cps), (seed, total, cps)


def test_a_drift_within_the_noise_is_not_reported():
    drift = np.exp(np.linspace(0.0, np.log1p(0.003), 60))  # 0.3% over 60 runs
    flagged = sum(bool(detect(noisy(60, seed) * drift)) for seed in range(40))
    flat = sum(bool(detect(noisy(60, seed))) for seed in range(40))
    assert flagged <= flat + 1 <= 4  # no more than the false alarms of the flat series


@pytest.mark.parametrize("values", [[], [100.0], [100.0, 200.0]])
def test_too_short_series_have_no_change_point(values):
    assert detect(values) == []


@pytest.mark.parametrize(("bad", "at"), [(float("nan"), 3), (float("inf"), 0), (0.0, 5), (-1.0, 2), (None, 1),
                                         ("fast", 4)])
def test_non_finite_or_non_positive_values_are_refused_by_index(bad, at):
    values: list = [100.0] * 8
    values[at] = bad
    with pytest.raises(ValueError, match=rf"values\[{at}\]"):
        detect(values)


@pytest.mark.parametrize("kwargs", [{"max_p": 0.0}, {"max_p": 1.5}, {"min_change_pct": -1.0},
                                    {"min_change_pct": float("nan")}, {"min_segment": 0},
                                    {"window": 3, "min_segment": 2}])
def test_parameters_out_of_range_are_refused(kwargs):
    with pytest.raises(ValueError):
        detect([100.0] * 10, **kwargs)


def test_the_result_is_deterministic():
    v = noisy(120, 3, noise=0.02)
    v[40:] *= 1.04
    v[90:] *= 0.97
    first = detect(v)
    np.random.seed(1)  # no hidden use of a global generator
    assert detect(v) == first
    assert detect(list(v)) == first


# --- what is reported ---------------------------------------------------------------


def test_a_change_point_carries_its_segments_means_and_significance():
    v = noisy(40, 7)
    v[15:] *= 1.2
    v[30:] *= 0.9
    first, second = detect(v)
    assert (first.index, second.index) == (15, 30)
    assert first.mean_before == pytest.approx(v[:15].mean())
    assert first.mean_after == pytest.approx(v[15:30].mean()) == second.mean_before
    assert second.mean_after == pytest.approx(v[30:].mean())
    assert first.change_pct == pytest.approx((v[15:30].mean() / v[:15].mean() - 1) * 100)
    assert 0.0 <= first.p <= 0.001 and 0.0 <= second.p <= 0.001


def test_change_pct_and_immutability():
    cp = ChangePoint(index=3, p=1e-5, mean_before=200.0, mean_after=150.0)
    assert cp.change_pct == pytest.approx(-25.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cp.index = 4  # type: ignore[misc]


def test_relative_changes_matter_not_the_units():
    v = noisy(50, 5)
    v[25:] *= 1.05
    assert indices(v) == indices(v * 1000.0) == indices(v / 1000.0) == [25]


def test_min_change_pct_drops_small_but_significant_changes():
    v = noisy(60, 2, noise=0.002)
    v[20:] *= 1.02  # 10 noise widths: significant, but only 2%
    v[40:] *= 1.10
    assert indices(v) == [20, 40]
    assert [c.index for c in detect(v, min_change_pct=5.0)] == [40]


def test_min_change_pct_counts_a_fall_like_the_rise_it_undoes():
    v = noisy(40, 4, noise=0.002)
    v[20:] /= 1.10  # a fall of 9.1%, or a 10% rise read backwards
    assert [c.index for c in detect(v, min_change_pct=10.0)] == [20]


def test_a_change_at_the_end_is_reported_once_a_second_run_confirms_it():
    v = noisy(32, 1)
    v[30:] *= 1.10
    assert indices(v[:31]) == []  # one run: could be a spike
    assert indices(v) == [30]


def test_constant_segments():
    assert detect([5.0] * 10) == []
    (cp,) = detect([1.0] * 5 + [2.0] * 5)
    assert (cp.index, cp.p, cp.change_pct) == (5, 0.0, 100.0)


def test_a_small_window_still_finds_changes_across_the_series():
    v = noisy(100, 9)
    v[35:] *= 1.08
    v[70:] *= 0.93
    assert [c.index for c in detect(v, window=12)] == [35, 70]


def test_min_segment_one_lets_a_single_run_be_a_segment():
    v = noisy(30, 0, noise=0.002)
    v[29] *= 1.2
    assert indices(v) == []
    assert [c.index for c in detect(v, min_segment=1)] == [29]


# --- the benchmark's labelled suite (without Otava) ----------------------------------


# --- the plot -----------------------------------------------------------------------


def test_plot_series_refuses_mismatched_input(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_series(tmp_path / "x.png", ["a"], [1.0, 2.0], [], title="t", ylabel="y")
    with pytest.raises(ValueError, match="outside"):
        plot_series(tmp_path / "x.png", ["a", "b"], [1.0, 2.0], [ChangePoint(5, 0.0, 1.0, 2.0)], title="t",
                    ylabel="y")
