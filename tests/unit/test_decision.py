"""Unit tests of pytest_kvcache.decision: zones, item judgement, baseline updates, the gate."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_kvcache import decision
from pytest_kvcache.decision import GateEntry, Zone
from pytest_kvcache.stats import Direction, MetricComparison

LOWER = Direction.LOWER_IS_BETTER
HIGHER = Direction.HIGHER_IS_BETTER


def cmp(ratio: float, direction: Direction = LOWER, threshold: float = 0.10, **kw: object) -> MetricComparison:
    base = dict(metric="median_ttft_ms" if direction is LOWER else "total_token_throughput", direction=direction,
                threshold=threshold, alpha=0.05, confidence=0.95, n_baseline=15, n_current=3,
                baseline_value=100.0, current_value=100.0 * ratio, ratio=ratio, change_pct=(ratio - 1) * 100,
                ci_low=ratio * 0.97, ci_high=ratio * 1.03, p_worse=0.5, p_better=0.5, test="run-level",
                sd_log=0.03, mde_pct=8.0, note="", runs_baseline=5, between_sd=0.03, within_sd=0.01)
    base.update(kw)
    return MetricComparison(**base)  # type: ignore[arg-type]


def test_zone_order_and_worst() -> None:
    assert [z.value for z in Zone] == ["FAIL", "WARN", "IMPROVED", "PASS"]
    assert decision.worst_zone([Zone.PASS, Zone.IMPROVED]) is Zone.IMPROVED
    assert decision.worst_zone([Zone.PASS, Zone.WARN, Zone.FAIL]) is Zone.FAIL
    assert decision.worst_zone([]) is None


@pytest.mark.parametrize("direction,worse,small_worse,better,small_better", [
    (LOWER, 1.20, 1.05, 0.80, 0.97), (HIGHER, 0.80, 0.97, 1.20, 1.03)])
def test_verdict_zones(direction: Direction, worse: float, small_worse: float, better: float,
                       small_better: float) -> None:
    thr = 0.10 if direction is LOWER else 0.05
    v = decision.verdict(cmp(worse, direction, thr), 0.003, 1.0, alpha=0.05)
    assert v.zone is Zone.FAIL and v.significant and v.beyond_threshold
    assert "20.0% worse than the baseline (5 runs)" in v.reason and "p=0.003 after Holm" in v.reason
    v = decision.verdict(cmp(small_worse, direction, thr), 0.01, 1.0, alpha=0.05)
    assert v.zone is Zone.WARN and "within the" in v.reason  # significant but small
    v = decision.verdict(cmp(worse, direction, thr), 0.2, 1.0, alpha=0.05)
    assert v.zone is Zone.WARN and "not proven" in v.reason  # big but not significant
    v = decision.verdict(cmp(better, direction, thr), 1.0, 0.001, alpha=0.05)
    assert v.zone is Zone.IMPROVED and "better" in v.reason and "refresh" in v.reason
    # a significant improvement inside the threshold is no news: PASS (it used to be a WARN)
    assert decision.verdict(cmp(small_better, direction, thr), 1.0, 0.001, alpha=0.05).zone is Zone.PASS
    assert decision.verdict(cmp(better, direction, thr), 1.0, 0.3, alpha=0.05).zone is Zone.PASS
    assert decision.verdict(cmp(1.0, direction, thr), 0.5, 0.5, alpha=0.05).zone is Zone.PASS


def test_a_comparison_that_cannot_be_made_never_looks_like_a_pass() -> None:
    c = cmp(1.01, test="insufficient-runs", p_worse=1.0, p_better=1.0, note="cannot judge: the baseline has 1 run")
    v = decision.verdict(c, 1.0, 1.0, alpha=0.05)
    assert v.zone is Zone.WARN and "not judged" in v.reason and "1 run" in v.reason
    # even a p of 0 on a comparison that was not judged cannot fail it
    assert decision.verdict(c, 0.0, 1.0, alpha=0.05).zone is Zone.WARN


def test_paired_better_is_the_expected_answer() -> None:
    v = decision.verdict(cmp(0.5), 1.0, 1e-6, alpha=0.05, paired=True)
    assert v.zone is Zone.PASS and "the reference" in v.reason
    assert decision.verdict(cmp(1.3), 1e-6, 1.0, alpha=0.05, paired=True).zone is Zone.FAIL


def test_verdict_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        decision.verdict(cmp(1.0), 1.5, 0.5, alpha=0.05)
    with pytest.raises(ValueError):
        decision.verdict(cmp(1.0), 0.5, 0.5, alpha=0.0)


def test_needs_confirmation() -> None:
    assert decision.needs_confirmation([cmp(1.08, p_worse=0.01)])  # > half of 10%, p small
    assert not decision.needs_confirmation([cmp(1.04, p_worse=0.001)])  # under half the threshold
    assert not decision.needs_confirmation([cmp(1.30, p_worse=0.2)])  # not even suspicious
    assert decision.needs_confirmation([cmp(1.0), cmp(0.97, HIGHER, 0.05, p_worse=0.04)])
    assert not decision.needs_confirmation([cmp(1.3, p_worse=0.001, runs_current=2)])  # already confirmed
    assert not decision.needs_confirmation([cmp(1.3, p_worse=0.0, test="insufficient-runs")])


def test_judge_item_uses_bonferroni_over_the_planned_comparisons() -> None:
    c = cmp(1.2, p_worse=0.004)
    assert decision.judge_item([c], alpha=0.05, planned=10).failed  # 0.04
    judged = decision.judge_item([c], alpha=0.05, planned=20)  # 0.08: not significant
    assert not judged.failed and judged.zone is Zone.WARN
    failed = decision.judge_item([c], alpha=0.05, planned=1, software_change="server_version 0.11.0 -> 0.11.1")
    line = failed.failures[0]
    assert line.startswith("median_ttft_ms: baseline 100 ms (5 runs), current 120 ms")
    assert "software since the baseline: server_version 0.11.0 -> 0.11.1" in line
    assert "run-to-run noise 3.0%" in line


def test_plan_baseline_update() -> None:
    kw = dict(alpha=0.05, planned=2, stored_summary="3 runs on 2026-11-01")
    assert decision.plan_baseline_update([], stored_runs=0, reset=False, **kw).action == "create"
    plan = decision.plan_baseline_update([cmp(1.0)], stored_runs=3, reset=True, **kw)
    assert plan.action == "replace" and "replaced 3 runs on 2026-11-01" in plan.message
    assert decision.plan_baseline_update([cmp(1.02, p_worse=0.3)], stored_runs=3, reset=False, **kw).action == "append"
    refused = decision.plan_baseline_update([cmp(1.3, p_worse=1e-5)], stored_runs=3, reset=False, **kw)
    assert refused.action == "refuse" and "NOT updated" in refused.message and "--reset-baselines" in refused.message
    stale = decision.plan_baseline_update([cmp(0.7, p_better=1e-5, p_worse=1.0)], stored_runs=3, reset=False, **kw)
    assert stale.action == "replace" and "stale" in stale.message and "3 runs on 2026-11-01" in stale.message


def test_session_gate_holm_and_what_was_not_compared() -> None:
    entries = [
        GateEntry("a", (cmp(1.3, p_worse=0.001), cmp(0.99, HIGHER, 0.05, p_worse=0.6)), "failed"),
        GateEntry("b", (cmp(1.0, p_worse=0.02),), "compared"),
        GateEntry("c", (), "skipped", "baseline x was recorded on another testbed (gpu: ...)", testbed_differs=True),
        GateEntry("d", (cmp(1.0, test="insufficient-runs", note="cannot judge: 1 run"),), "compared"),
    ]
    gate = decision.session_gate(entries, 0.05)
    assert gate.failed and gate.failing == ("a: median_ttft_ms",)
    assert gate.holm[0] == pytest.approx(0.004) and len(gate.bh) == 4
    assert gate.testbed_differs == 1
    assert gate.not_compared[0].startswith("c: baseline x was recorded on another testbed")
    assert gate.not_compared[1] == "d: not judged (cannot judge: 1 run)"
    assert gate.night is None


def test_night_shift_is_told_apart_from_separate_changes() -> None:
    same = [(f"i{i}", cmp(1.12 + 0.002 * i)) for i in range(8)]
    night = decision.night_shift(same)
    assert night is not None and night.moved == 8 and night.median_worse_pct == pytest.approx(12.7, abs=0.5)
    assert "environment change is more likely" in night.message
    scattered = [(f"i{i}", cmp(r)) for i, r in enumerate([1.2, 0.9, 1.0, 1.15, 0.95, 1.01, 1.3, 1.0])]
    assert decision.night_shift(scattered) is None
    two_items = [("a", cmp(1.2)), ("b", cmp(1.2))] * 4
    assert decision.night_shift(two_items) is None  # too few items to say "every item"
    within_noise = [(f"i{i}", cmp(1.02)) for i in range(8)]
    assert decision.night_shift(within_noise) is None  # smaller than twice the noise
    throughput = [(f"i{i}", dataclasses.replace(cmp(0.88, HIGHER, 0.05))) for i in range(8)]
    assert decision.night_shift(throughput).median_worse_pct > 10  # worse is measured in the metric's direction
