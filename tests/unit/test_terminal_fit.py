"""The session's terminal output fits the terminal: the verdict table drops columns by
priority, reasons stand whole on their own lines, progress is one line per round under
-v and a status that never floods without it; one real session at COLUMNS=100."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_kvcache.decision import Zone
from pytest_kvcache.report.progress import ItemProgress
from pytest_kvcache.report.terminal import DROP_ORDER, SUMMARY_HEADER, fit_table, render_summary

LONG_REASON = ("no baseline for seed_prefill/prefill[cpu-100k-c16] in /home/someone/projects/llm-serving/"
               "baselines; run with --update-baselines to create one")


def _outcome(name: str, zone: Zone | None = None, status: str = "compared", message: str = ""):
    case = SimpleNamespace(name=name)
    if zone is None:
        return SimpleNamespace(case=case, status=status, message=message, verdicts=[], comparisons=[], result=None,
                               software_change="")
    comparison = SimpleNamespace(metric="total_token_throughput", baseline_value=123456.7, current_value=120000.1,
                                 change_pct=-2.8, ci_low=0.95123, ci_high=1.01234, runs_baseline=3, runs_current=2,
                                 test="runs-t", between_sd=0.031, p_worse=0.0123, mde_pct=4.4)
    verdict = SimpleNamespace(zone=zone, reason="worse beyond the threshold but not proven (p=0.01)")
    return SimpleNamespace(case=case, status=status, message=message, verdicts=[verdict], comparisons=[comparison],
                           result=None, software_change="")


def _settings():
    server = SimpleNamespace(kind="emulator", endpoint=None, emulator_slowdown=1.0)
    return SimpleNamespace(server=server, alpha=0.05,
                           results_dir="/tmp/pytest-of-someone/pytest-12/test_x0/kvcache-results/run-20261130-150000-"
                                       "123456-abcd")


OUTCOMES = [_outcome("offload_gain[cpu-vs-none-10k-c16]", Zone.WARN),
            _outcome("prefill[cpu-100k-c16]", status="skipped", message=LONG_REASON),
            _outcome("multiturn[cpu-128-c8]", status="failed",
                     message="trial 1 warm round of backend 'cpu' loaded 0 tokens from the offload tier, 0% of the "
                             "12800 expected: a warm round without hits is a misconfiguration, not a result.\n"
                             "  likely cause: the external server at http://127.0.0.1:8011 runs no working 'cpu' "
                             "tier: it found none of the cold round's chunks")]


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_summary_fits_the_width_and_keeps_every_reason_whole(width):
    lines = [text for text, _ in render_summary(OUTCOMES, None, _settings(), width=width)]
    assert max(map(len, lines)) <= width, [line for line in lines if len(line) > width]
    joined = " ".join(" ".join(line.split()) for line in lines)
    for o in OUTCOMES[1:]:
        for part in o.message.splitlines():
            assert " ".join(part.split()) in joined  # whole, even where wrapped
    assert "…" not in joined
    assert "offload_gain[cpu-vs-none-10k-c16]" in joined and "WARN" in joined


def test_columns_are_dropped_by_priority_and_named():
    rows = [tuple(f"{h}-cell" for h in SUMMARY_HEADER)]
    full, dropped = fit_table(SUMMARY_HEADER, rows, None)
    assert dropped == [] and len(full[0][0].split()) >= len(SUMMARY_HEADER)
    width = len(full[0][0]) - 10
    lines, dropped = fit_table(SUMMARY_HEADER, rows, width)
    assert dropped == list(DROP_ORDER[:len(dropped)]) and dropped[0] == "q(BH)"
    assert max(len(text) for text, _ in lines) <= width
    header = lines[0][0]
    assert all(name in header for name in ("item", "metric", "change", "verdict"))
    note = [t for t, _ in render_summary(OUTCOMES[:1], None, _settings(), width=70) if "columns left out" in t]
    assert note


def test_narrowest_table_stacks_long_item_names():
    lines, dropped = fit_table(SUMMARY_HEADER, [("x" * 70, "median_ttft_ms", "-", "9 ms", "-", "-", "-", "-", "-",
                                                  "-", "-", "SKIPPED")], 50)
    assert dropped == list(DROP_ORDER)
    assert all(len(text) <= 50 for text, _ in lines)
    assert any(text.startswith("x" * 10) for text, _ in lines)  # the name on a line of its own, wrapped


class _Out:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.lines: list[str] = []
        self.statuses: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def clear(self) -> None:
        self.statuses.append("")


def _feed(progress: ItemProgress, clock: list[float]) -> None:
    for trial in (1, 2):
        for rnd in ("cold", "warm"):
            progress(f"trial {trial} {rnd}: 2 warm-up requests")
            for done in (12, 24, 36, 48):
                clock[0] += 0.1
                progress(f"trial {trial} {rnd}: {done}/48 requests")
    progress("the first run looks worse: confirming with run 2 on a fresh server")


def test_verbose_progress_is_one_line_per_round():
    out, clock = _Out(tty=False), [0.0]
    _feed(ItemProgress("prefill[cpu-1k-c8]", out, verbose=True, clock=lambda: clock[0]), clock)
    assert out.lines == [f"  kvcache prefill[cpu-1k-c8]: trial {t} {r}: 48/48 requests in 0.4 s, after 2 warm-up "
                         "requests" for t in (1, 2) for r in ("cold", "warm")] + [
        "  kvcache prefill[cpu-1k-c8]: the first run looks worse: confirming with run 2 on a fresh server"]


def test_quiet_progress_is_a_throttled_status_on_a_terminal_and_rare_lines_in_a_log():
    tty, clock = _Out(tty=True), [0.0]
    _feed(ItemProgress("p[cpu]", tty, verbose=False, clock=lambda: clock[0], status_every=0.25), clock)
    assert tty.lines == [] and 0 < len(tty.statuses) <= 8  # 21 updates in 1.6 s, at most one per 0.25 s
    assert tty.statuses[0] == "p[cpu]: trial 1 cold: 2 warm-up requests"
    log, clock = _Out(tty=False), [0.0]
    progress = ItemProgress("p[cpu]", log, verbose=False, clock=lambda: clock[0], line_every=30.0)
    for step in range(600):  # ten minutes of updates every second
        clock[0] = float(step)
        progress(f"trial 1 warm: {step}/600 requests")
    assert 18 <= len(log.lines) <= 20 and log.lines[0].endswith("(30 s into the item)")
