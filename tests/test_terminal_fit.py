"""The session's terminal output fits the terminal: the verdict table drops columns by
priority, reasons stand whole on their own lines, progress is one line per round under
-v and a status that never floods without it; one real session at COLUMNS=100."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pytest_kvcache.decision import Zone
from pytest_kvcache.report.terminal import DROP_ORDER, SUMMARY_HEADER, ItemProgress, fit_table, render_summary

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


SMALL = """
name: prefill
phase: prefill
matrix:
  backend: [none, cpu]
  input_len: [1k]
  concurrency: [8]
  output_len: [1]
num_prompts: 8
rounds: [cold, warm]
trials: 3
"""


def run_in_terminal(args: list[str], cwd, columns: int = 100, timeout: float = 300) -> tuple[int, list[str]]:
    """pytest run on a pseudo-terminal ``columns`` wide (COLUMNS too), as a person runs it;
    its exit status and its lines as the terminal shows them (see :func:`rendered`)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}  # pytest shortens off CI
    env["COLUMNS"] = str(columns)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--color=no", *args], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            proc.kill()
            pytest.fail("pytest did not end in time:\n" + b"".join(chunks).decode(errors="replace")[-3000:])
    finally:
        os.close(master)
    return proc.wait(), rendered(b"".join(chunks).decode(errors="replace"))


def rendered(text: str) -> list[str]:
    """Lines as a terminal shows them: \\r goes back to the line's start, \\b one column
    back (what a status erased is gone), colour codes take no room."""
    import re

    lines = []
    for raw in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).split("\n"):
        cells: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
            elif ch == "\b":
                col = max(0, col - 1)
            else:
                cells[col:col + 1] = [ch]
                col += 1
        lines.append("".join(cells).rstrip())
    return lines


@pytest.mark.parametrize("verbose", [False, True])
def test_a_session_at_100_columns_fits_and_cuts_no_reason(tmp_path, verbose):
    """On a terminal 100 columns wide, a skipped item (no baseline) and a failed one (a tier
    that stores nothing): every line within 100 columns, both reasons whole; the failed item
    stops after its first trial; -v prints a line per round; no pytest-benchmark table."""
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "small.yaml").write_text(SMALL)
    results = tmp_path / "kvcache-results" / "a-rather-long-run-folder-name-to-wrap-at-the-terminal-edge"
    status, lines = run_in_terminal([*(["-v"] if verbose else []), f"--kv-results-dir={results}",
                                     "--kv-server-args=--offload-disabled"], cwd=tmp_path)
    assert status == pytest.ExitCode.TESTS_FAILED, "\n".join(lines)
    # pytest's own first line under -v ends with the interpreter's path: pytest writes it before
    # any plugin can shape a line (its length is this machine's, not the plugin's)
    too_wide = [line for line in lines if len(line) > 100 and not line.startswith("platform ")]
    assert too_wide == [], too_wide
    text = " ".join(" ".join(line.split()) for line in lines)
    assert f"no baseline for small/prefill[none-1k-c8] in {tmp_path / 'baselines'}; run with " \
           "--update-baselines to create one" in text
    assert "prefill[cpu-1k-c8] FAILED: trial 1 warm round of backend 'cpu' loaded 0 tokens" in text
    assert "(2 more trial(s) not run: they would miss the same way)" in text
    assert "server log: " in text and "server log: None" not in text
    assert "OPS" not in text and "Name (time in" not in text  # no pytest-benchmark table unless asked
    assert "kvcache prefill[none-1k-c8]: trial 1 cold" not in text or verbose
    rounds = [line for line in lines if line.startswith("  kvcache prefill[none-1k-c8]: trial")]
    if verbose:
        assert len(rounds) == 6 and all("/8 requests in " in line for line in rounds)
        assert len([line for line in lines if line.startswith("  kvcache prefill[cpu-1k-c8]: trial")]) == 2
    else:
        assert rounds == []  # the status after the dots was erased before each item's letter
        assert any(line.startswith("scenarios/small.yaml sF") for line in lines), lines
