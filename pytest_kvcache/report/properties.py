"""Our figures in other tools' formats: JUnit XML properties and pytest-benchmark entries.

* :func:`junit_properties` gives ``(name, value)`` pairs for ``record_property`` (pytest's
  ``--junitxml`` writes them as ``<property>`` elements of each test case, which CI
  systems show next to the test).
* :func:`fill_benchmark` makes the item's pytest-benchmark entry from the trials
  already measured: each usable trial's median TTFT (a storage item's: its storage I/O
  time) is one "round", and our metrics go into ``extra_info``. pytest-benchmark's timer never runs, so it adds no
  load and changes no measurement (its ``pedantic`` mode would call the load again).
  Only when the user asks pytest-benchmark for output (:func:`benchmark_wanted`): its
  table would otherwise repeat the summary's figures in 190 columns, with OPS and
  outlier columns that mean nothing for trials.
"""

from __future__ import annotations

import statistics

from ..decision import worst_zone
from ..models import ItemOutcome

__all__ = ["BENCHMARK_METRIC", "PROPERTY_METRICS", "STORAGE_BENCHMARK_METRIC", "benchmark_extra_info",
           "benchmark_wanted", "fill_benchmark", "junit_properties"]

#: What pytest-benchmark's table shows as the time of one round: a trial's median TTFT.
BENCHMARK_METRIC = "median_ttft_ms"
#: A storage item's round: the trial's total storage I/O time (seconds).
STORAGE_BENCHMARK_METRIC = "storage_io_s"
#: Per-trial figures given as properties (the median over usable trials), an inference
#: item's and a storage item's; those an item lacks are left out.
PROPERTY_METRICS = ("median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "mean_tpot_ms",
                    "total_token_throughput", "output_throughput", "request_throughput",
                    "storage_throughput_tokens_per_sec", "wall_clock_throughput_tokens_per_sec",
                    "bandwidth_bytes_per_sec", "read_write_ratio")


def _round_metric(outcome: ItemOutcome) -> tuple[str, float]:
    """The figure a pytest-benchmark round is made of, and its factor to seconds."""
    return (STORAGE_BENCHMARK_METRIC, 1.0) if outcome.case.phase == "storage" else (BENCHMARK_METRIC, 1e-3)


def _median_over_trials(outcome: ItemOutcome, metric: str) -> float | None:
    if outcome.result is None:
        return None
    values = outcome.result.metric_values(metric)
    return statistics.median(values) if values else None


def junit_properties(outcome, results_dir=None) -> list[tuple[str, str]]:
    """``kvcache.*`` properties of one item: scenario, figures, verdicts, the JSON file."""
    case = outcome.case
    props: list[tuple[str, str]] = [
        ("kvcache.backend", case.backend),
        ("kvcache.phase", case.phase),
        ("kvcache.input_len", str(case.input_len)),
        ("kvcache.concurrency", str(case.concurrency)),
        ("kvcache.status", outcome.status),
    ]
    if outcome.result is not None:
        props.append(("kvcache.usable_trials", f"{len(outcome.result.usable_trials)}/{len(outcome.result.trials)}"))
        for metric in PROPERTY_METRICS:
            value = _median_over_trials(outcome, metric)
            if value is not None:
                props.append((f"kvcache.{metric}", f"{value:.6g}"))
        for k, v in sorted(outcome.result.server.items()):
            if k.startswith("label."):
                props.append((f"kvcache.{k}", str(v)))
    zone = worst_zone([v.zone for v in outcome.verdicts])
    if zone:
        props.append(("kvcache.verdict", zone.value))
    for c, v in zip(outcome.comparisons, outcome.verdicts):
        props.append((f"kvcache.{c.metric}.baseline", f"{c.baseline_value:.6g}"))
        props.append((f"kvcache.{c.metric}.change_pct", f"{c.change_pct:+.2f}"))
        props.append((f"kvcache.{c.metric}.p_worse", f"{c.p_worse:.3g}"))
        props.append((f"kvcache.{c.metric}.verdict", v.zone.value))
    if outcome.json_path is not None:
        path = str(outcome.json_path)
        if results_dir is not None:
            try:
                path = str(outcome.json_path.resolve().relative_to(results_dir.resolve()))
            except ValueError:
                pass
        props.append(("kvcache.json", path))
    return props


def benchmark_extra_info(outcome: ItemOutcome) -> dict:
    """pytest-benchmark ``extra_info``: the scenario point, figures and verdicts."""
    info: dict = {"kvcache_backend": outcome.case.backend, "kvcache_phase": outcome.case.phase,
                  "kvcache_input_len": outcome.case.input_len, "kvcache_concurrency": outcome.case.concurrency,
                  "kvcache_status": outcome.status, "kvcache_round_metric": _round_metric(outcome)[0]}
    for metric in PROPERTY_METRICS:
        value = _median_over_trials(outcome, metric)
        if value is not None:
            info[metric] = value
    if outcome.result is not None:
        figures = (STORAGE_BENCHMARK_METRIC, "storage_throughput_tokens_per_sec") \
            if outcome.case.phase == "storage" else ("median_ttft_ms", "total_token_throughput")
        info["trials"] = {m: outcome.result.metric_values(m) for m in figures}
        info["server"] = dict(outcome.result.server)
    info["verdicts"] = {c.metric: {"zone": v.zone.value, "change_pct": c.change_pct, "p_worse": c.p_worse,
                                   "baseline": c.baseline_value, "current": c.current_value}
                        for c, v in zip(outcome.comparisons, outcome.verdicts)}
    if outcome.json_path is not None:
        info["json"] = str(outcome.json_path)
    return info


def benchmark_wanted(bench) -> bool:
    """Whether pytest-benchmark (its session, or None when absent) gets our entries: when it
    is on and the user asked it for output of its own (--benchmark-json, --benchmark-save,
    --benchmark-autosave, --benchmark-compare, --benchmark-histogram)."""
    if bench is None or bench.disabled or getattr(bench, "skip", False):
        return False
    return any(getattr(bench, name, None) for name in ("json", "save", "autosave", "compare", "histogram"))


def fill_benchmark(benchmark, outcome: ItemOutcome) -> bool:
    """Turn the pytest-benchmark fixture's entry into our trials; False if its API is not
    the one we know (the entry is then left alone and only ``extra_info`` is set)."""
    benchmark.extra_info.update(benchmark_extra_info(outcome))
    make_stats = getattr(benchmark, "_make_stats", None)
    metric, to_seconds = _round_metric(outcome)
    values = outcome.result.metric_values(metric) if outcome.result is not None else []
    if make_stats is None or not values:
        return False
    benchmark.group = f"kvcache {outcome.case.scenario}"
    benchmark._mode = "pytest-kvcache trials"  # marks the fixture as used (no "not used" warning)
    stats = make_stats(1)
    for value in values:
        stats.update(value * to_seconds)
    return True
