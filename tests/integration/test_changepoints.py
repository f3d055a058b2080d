"""Change point detection (pytest_kvcache.changepoints) and its plot (report.history_plots)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from pytest_kvcache.changepoints import detect
from pytest_kvcache.report import history_plots
from pytest_kvcache.report.history_plots import plot_series
from helpers.changepoints import indices, noisy

ROOT = Path(__file__).resolve().parents[2]


# --- the required behaviour ---------------------------------------------------------


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


def test_long_flat_series_rarely_raise_a_false_alarm():
    # About 1-3% of flat series of 30-300 runs: the rate must not grow with the length as
    # plain t-tests of the best splits would (a quarter of 300-run series, see the doc).
    alarms = sum(bool(detect(noisy(300, seed + 1000))) for seed in range(50))
    assert alarms <= 3


# --- what is reported ---------------------------------------------------------------


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


def test_plot_series_with_no_runs(tmp_path):
    path = plot_series(tmp_path / "empty.png", [], [], [], title="nothing yet", ylabel="ms")
    assert path.stat().st_size > 1000
