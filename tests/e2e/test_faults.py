"""Faults that must end honestly: a server that dies mid-run, a paired item with one trial,
and files the plugin writes that others must be able to read."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from pathlib import Path

import pytest
from helpers.kvproject import make_project, run_pytest
from helpers.interrupts import SCENARIO, Run, _cmdline, _stat

PAIRED = """
name: gain
phase: prefill
matrix:
  backend: [cpu]
  input_len: [1k]
  concurrency: [4]
  output_len: [1]
num_prompts: 8
rounds: [cold]
trials: 3
paired_with: {backend: none}
"""


def test_paired_item_with_one_trial_says_why(tmp_path: Path) -> None:
    project = make_project(tmp_path, PAIRED)
    old = os.umask(0o022)
    try:
        result = run_pytest(project, "--trials=1", f"--kv-results-dir={tmp_path / 'out'}", timeout=120)
    finally:
        os.umask(old)
    text = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, text[-3000:]
    assert "a paired comparison (cpu against none) needs at least 2 trials" in text and "--trials is 1" in text
    assert "Traceback" not in text
    # what the plugin wrote is readable by the runner's other users (not mkstemp's 0600)
    for name in ("run.json", "summary.md", "report.html", "results.csv", "small/gain[cpu-vs-none-1k-c4].json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_a_server_that_dies_is_named_with_its_exit_status_and_log(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", SCENARIO)
    run = Run(project, "--trials=2")
    run.measuring()
    emulator = next(pid for pid in run.seen if _stat(pid) and b"pytest_kvcache.emulator" in _cmdline(pid))
    os.kill(emulator, signal.SIGKILL)
    assert run.finish() == pytest.ExitCode.TESTS_FAILED
    text = run.output()
    assert f"the server died during the run: emulator (disk) (pid {emulator}) was killed by SIGKILL (log " in text
    # the log's tail under it (its last lines, whatever the server logged last)
    assert re.search(r"emulator-disk-0\.log\):\n {4}\S", text), text[-3000:]
    assert "Traceback" not in text
    item = json.loads((run.out / "small" / "prefill[disk-1k-c4].json").read_text())
    assert item["status"] == "failed" and "was killed by SIGKILL" in item["message"]
