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
from collections.abc import Callable
from pathlib import Path

import pytest
from kvproject import make_project

if not Path("/proc/self/stat").exists():
    pytest.skip("the process checks read /proc (Linux)", allow_module_level=True)

# The fixed profile: every request takes 250 ms to its first token, so a trial lasts
# seconds and the signal lands while the first item measures.
SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [disk]
  input_len: [1k]
  concurrency: [4, 8]
  output_len: [4]
num_prompts: 48
rounds: [cold]
trials: 3
"""
ITEMS = ("prefill[disk-1k-c4]", "prefill[disk-1k-c8]")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class Run:
    """A pytest process on the project, its output in files, its process tree watched."""

    def __init__(self, project: Path, *args: str) -> None:
        self.project = project
        self.out = project / "out"
        with open(project / "pytest.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", f"--kv-results-dir={self.out}",
                 "--emulator-profile=fixed", "--kv-server-args=--fixed-ttft-ms 250 --fixed-itl-ms 5", *args],
                cwd=project, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, int] = {}  # pid -> start time of every descendant seen
        self.cmdlines: dict[int, bytes] = {}  # pid -> its command line when first seen (it may be gone since)

    def watch(self) -> None:
        parents: dict[int, list[int]] = {}
        for pid in _all_pids():
            info = _stat(pid)
            if info:
                parents.setdefault(info[0], []).append(pid)
        todo = [self.proc.pid]
        while todo:
            for child in parents.get(todo.pop(), []):
                info = _stat(child)
                if info:
                    if child not in self.seen:
                        self.cmdlines[child] = _cmdline(child)
                    self.seen.setdefault(child, info[2])
                    todo.append(child)

    def output(self) -> str:
        return (self.project / "pytest.log").read_text(errors="replace")

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.watch()
            if self.proc.poll() is not None:
                pytest.fail(f"pytest ended (status {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:g}s:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.watch()

    def measuring(self) -> None:
        """Wait until the first item has sent requests and its tier has written to the scratch."""
        def ready() -> bool:
            scratch = list(self.out.glob(".scratch-*/**/*"))
            return "requests" in self.output() and any(p.is_file() for p in scratch)

        self.wait_until("measurement with a filled scratch folder", ready)

    def finish(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.watch()
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(f"pytest did not end within {timeout:g}s of the signal:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        return self.proc.returncode

    def ports(self) -> list[int]:
        """The ports the run's servers listened on (from the command lines in their logs)."""
        found = []
        for log in self.out.glob("logs/*.log"):
            words = log.read_text(errors="replace").splitlines()[0].split()
            found += [int(words[i + 1]) for i, w in enumerate(words[:-1]) if w == "--port"]
        return found

    def leftovers(self, timeout: float) -> list[str]:
        """Processes of the run still alive after ``timeout`` seconds (polled)."""
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for pid, started in self.seen.items():
                info = _stat(pid)
                if info and info[2] == started and info[1] != "Z":
                    left.append(f"{pid}: {_cmdline(pid)[:200]!r}")
            marker = str(self.project).encode()
            for pid in _all_pids():
                if pid not in self.seen and pid != os.getpid() and marker in _cmdline(pid):
                    left.append(f"{pid} (names the project): {_cmdline(pid)[:200]!r}")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


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
