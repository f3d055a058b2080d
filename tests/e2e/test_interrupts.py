"""Interrupts end a run cleanly and honestly: Ctrl-C, a double Ctrl-C, SIGTERM, kill -9.

Each test starts pytest as a separate process on a small emulator project (the disk tier,
so there is a scratch folder; two client processes for SIGTERM and kill -9), waits until
the first item is measuring, sends the signal and checks what is left: processes of the
run (every descendant seen while it ran, and any process naming its folder), a listening
port, ``.scratch-*`` folders, changed baselines, and what the run files say. Every wait
polls with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.kvproject import make_project
from helpers.interrupts import ITEMS, Run, SCENARIO

if not Path("/proc/self/stat").exists():
    pytest.skip("the process checks read /proc (Linux)", allow_module_level=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj", SCENARIO)
    stored = root / "baselines" / "small"
    stored.mkdir(parents=True)
    for item in ITEMS:  # a baseline another testbed recorded: --update-baselines would rewrite it
        (stored / f"{item}.json").write_text(json.dumps({
            "schema_version": 2, "key": f"small/{item}", "testbed": {"gpu": "other"},
            "runs": [{"run_id": "r0", "created": "2026-11-01T00:00:00+00:00", "software": {}, "commit": None,
                      "trials": [{"index": 0, "summary": {"median_ttft_ms": 250.0}}]}]}, indent=1) + "\n")
    return root


def _baselines(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / "baselines").rglob("*.json"))}


def _check_clean_end(run: Run, before: dict[str, bytes], *, leftover_wait: float = 5) -> None:
    text = run.output()
    assert "Traceback" not in text, text[-4000:]
    assert run.leftovers(leftover_wait) == []
    assert [p for p in run.ports() if _listening(p)] == []
    assert _baselines(run.project) == before


def _check_interrupted_files(run: Run, signal_name: str) -> None:
    doc = json.loads((run.out / "run.json").read_text())
    assert doc["interrupted"] is True and doc["interrupted_by"] == signal_name
    assert doc["not_run"] == [f"scenarios/small.yaml::{ITEMS[1]}"]
    assert "INCOMPLETE" in doc["gate"]["line"] and doc["gate"]["unjudged"] == 2
    item = json.loads((run.out / "small" / f"{ITEMS[0]}.json").read_text())
    assert item["status"] == "interrupted"
    assert "Run INTERRUPTED" in (run.out / "summary.md").read_text()
    assert "interrupted" in (run.out / "report.html").read_text()
    assert "INTERRUPTED" in run.output()
    assert list(run.out.glob(".scratch-*")) == []


def test_ctrl_c_ends_the_run_cleanly_and_says_so(project: Path) -> None:
    before = _baselines(project)
    run = Run(project, "--update-baselines")
    run.measuring()
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == pytest.ExitCode.INTERRUPTED
    _check_clean_end(run, before)
    _check_interrupted_files(run, "SIGINT")


def test_double_ctrl_c_is_quiet_and_still_cleans_up(project: Path) -> None:
    before = _baselines(project)
    run = Run(project, "--update-baselines")
    run.measuring()
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the second one lands in the cleanup the first one started
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
    assert run.finish() == pytest.ExitCode.INTERRUPTED
    _check_clean_end(run, before)
    _check_interrupted_files(run, "SIGINT")
    assert "pytest-kvcache: SIGINT held: stopping the servers" in run.output()


def test_sigterm_ends_the_run_like_ctrl_c(project: Path) -> None:
    before = _baselines(project)
    run = Run(project, "--update-baselines", "--kv-client-processes=2")
    run.measuring()
    assert any(b"pytest_kvcache.spread" in line for line in run.cmdlines.values()), "no client process was seen"
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == pytest.ExitCode.INTERRUPTED
    _check_clean_end(run, before)
    _check_interrupted_files(run, "SIGTERM")
    assert "SIGTERM received" in run.output()


def test_kill_9_leaves_nothing_after_the_next_run(project: Path) -> None:
    before = _baselines(project)
    run = Run(project, "--update-baselines", "--kv-client-processes=2")
    run.measuring()
    scratch = list(run.out.glob(".scratch-*"))
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    # the servers die with pytest (PDEATHSIG); the client processes once their socket closes
    _check_clean_end(run, before, leftover_wait=30)
    assert [p for p in scratch if p.exists()] == scratch  # nobody was left to remove it
    assert not (run.out / "run.json").exists()
    nxt = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "-q",
                          f"--kv-results-dir={run.out}"],
                         check=False, cwd=project, capture_output=True, text=True, timeout=120)
    assert nxt.returncode == 0, nxt.stdout + nxt.stderr
    assert list(run.out.glob(".scratch-*")) == []


def test_sweep_removes_only_the_scratch_of_dead_runs(tmp_path: Path) -> None:
    from pytest_kvcache.plugin import _sweep_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here, sibling, other = tmp_path / "run-2", tmp_path / "run-1", tmp_path / "elsewhere"
    folders = {name: path / f".scratch-{pid}" for name, path, pid in (
        ("dead here", here, dead.pid), ("dead sibling", sibling, dead.pid), ("alive", sibling, os.getppid()),
        ("not a pid", here, "x1"))}
    for folder in folders.values():
        (folder / "disk").mkdir(parents=True)
        (folder / "disk" / "chunk").write_bytes(b"kv")
    (other / "deeper" / f".scratch-{dead.pid}").mkdir(parents=True)  # not a run folder of these results
    _sweep_scratch(here)
    assert {name for name, folder in folders.items() if folder.exists()} == {"alive", "not a pid"}
    assert (other / "deeper" / f".scratch-{dead.pid}").exists()
