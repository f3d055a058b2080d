"""A plugin run as a process that a test interrupts, and what /proc says about its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


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
