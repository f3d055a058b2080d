"""The session's terminal output fits the terminal: the verdict table drops columns by
priority, reasons stand whole on their own lines, progress is one line per round under
-v and a status that never floods without it; one real session at COLUMNS=100."""

from __future__ import annotations

import os

import pytest


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
