"""Change point detection (pytest_kvcache.changepoints) and its plot (report.history_plots)."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_kvcache.changepoints import ChangePoint, detect
from pytest_kvcache.report import history_plots
from pytest_kvcache.report.history_plots import plot_series

ROOT = Path(__file__).resolve().parents[1]


def noisy(n: int, seed: int, noise: float = 0.01, level: float = 100.0) -> np.ndarray:
    """``n`` runs at ``level`` with lognormal noise of ``noise`` (relative)."""
    return level * np.exp(np.random.default_rng(seed).normal(0.0, noise, n))


def indices(values) -> list[int]:
    return [c.index for c in detect(values)]


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


def test_a_single_spike_is_not_a_change():
    added = []
    for seed in range(40):
        flat = noisy(30, seed)
        for at in (1, 14, 28):  # second, middle and last-but-one runs
            for factor in (1.03, 1.05, 0.97, 0.95):  # 3 and 5 noise widths, up and down
                v = flat.copy()
                v[at] *= factor
                if set(indices(v)) - set(indices(flat)):
                    added.append((seed, at, factor))
    assert len(added) <= 4, added  # of 480 series: under 1%


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


def test_long_flat_series_rarely_raise_a_false_alarm():
    # About 1-3% of flat series of 30-300 runs: the rate must not grow with the length as
    # plain t-tests of the best splits would (a quarter of 300-run series, see the doc).
    alarms = sum(bool(detect(noisy(300, seed + 1000))) for seed in range(50))
    assert alarms <= 3


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


def test_the_core_module_imports_nothing_heavy():
    code = ("import sys, pytest_kvcache.changepoints; "
            "print(sorted(m for m in ('numpy', 'scipy', 'pytest', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- the benchmark's labelled suite (without Otava) ----------------------------------


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_changepoints", ROOT / "benchmarks" / "bench_changepoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up by name
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_ours_on_a_few_seeds_of_the_benchmark_suite():
    bench = load_bench()
    for seed in (11, 12, 13):
        cases = bench.make_suite(seed, per_class=12)
        assert {c.cls for c in cases} == set(bench.CLASSES)
        scores = bench.score(cases, *bench.ours_detect(cases, max_p=0.001, min_change_pct=0.0, window=30))
        for cls in ("step", "noise", "drift", "multi"):
            assert scores[cls].recall >= 0.9, (seed, cls, scores[cls])
            assert scores[cls].precision >= 0.8, (seed, cls, scores[cls])
        assert scores["outliers"].detections <= 1, (seed, scores["outliers"])


def test_the_suite_is_seeded_and_labelled():
    bench = load_bench()
    a, b = bench.make_suite(5, per_class=4), bench.make_suite(5, per_class=4)
    assert a == b and a != bench.make_suite(6, per_class=4)
    for case in a:
        assert 16 <= len(case.values) <= 120 and min(case.values) > 0
        assert all(0 < i < len(case.values) for i in case.changes)
        assert (case.drift != 0) == (case.cls == "drift")


def test_scoring_matches_within_two_points_one_to_one():
    bench = load_bench()
    case = bench.Case("multi", tuple([100.0] * 40), (10, 20))
    s = bench.score([case], [[11, 12, 22, 30]], [0.0])["multi"]  # 12: a second match for 10; 30: none
    assert (s.detections, s.hits, s.found, s.precision, s.recall, s.mae) == (4, 2, 2, 0.5, 1.0, 1.5)


# --- the plot -----------------------------------------------------------------------


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_plot_series_writes_a_png_that_shows_the_change_points(tmp_path):
    v = noisy(30, 0)
    v[12:] *= 1.2
    labels = [f"run-{i}" for i in range(30)]
    cps = detect(v)
    assert [c.index for c in cps] == [12]
    with_cp = plot_series(tmp_path / "a" / "with.png", labels, v, cps, title="t", ylabel="mean TTFT (ms)")
    without = plot_series(tmp_path / "without.png", labels, v, [], title="t", ylabel="mean TTFT (ms)")
    assert with_cp == tmp_path / "a" / "with.png"
    for path in (with_cp, without):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < path.stat().st_size < 2_000_000
    a, b = read_png(with_cp), read_png(without)
    assert a.shape == b.shape and a.shape[0] >= 400
    assert np.abs(a - b).sum() > 100  # the line, the label, the second segment's mean


def test_plot_series_stays_readable_with_200_runs(tmp_path):
    v = noisy(200, 1)
    v[150:] *= 0.9
    path = plot_series(tmp_path / "long.png", [f"2025-01-01T{i:03d}" for i in range(200)], v, detect(v),
                       title="long", ylabel="output throughput (tokens/s)")
    height, width = read_png(path).shape[:2]
    assert width > height * 2  # widened for the runs
    ticks = history_plots._ticks(200, [150])
    assert 150 in ticks and len(ticks) <= 41
    assert min(b - a for a, b in zip(ticks, ticks[1:])) >= 2  # no label on top of another


def test_plot_series_refuses_mismatched_input(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_series(tmp_path / "x.png", ["a"], [1.0, 2.0], [], title="t", ylabel="y")
    with pytest.raises(ValueError, match="outside"):
        plot_series(tmp_path / "x.png", ["a", "b"], [1.0, 2.0], [ChangePoint(5, 0.0, 1.0, 2.0)], title="t",
                    ylabel="y")


def test_plot_series_with_no_runs(tmp_path):
    path = plot_series(tmp_path / "empty.png", [], [], [], title="nothing yet", ylabel="ms")
    assert path.stat().st_size > 1000
