"""A server subprocess with a log file, a readiness probe and a clean teardown.

The process runs in its own process group (so teardown reaches its children too) and,
on Linux, gets SIGTERM if the pytest process dies, so no server outlives a crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..errors import ServerError

__all__ = ["ManagedProcess", "free_port", "http_ready", "log_tail", "redis_ready", "tcp_ready"]


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False
    return check


def tcp_ready(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False
    return check


def redis_ready(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    """PING in RESP, without a Redis client library."""
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
    return check


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """Start ``argv``, wait until it is ready, stop the whole group.

    Ready: ``health_url`` answers 200, or ``ready`` (a check) returns True. While
    waiting, the process's exit and the readiness of the processes it depends on
    (``watch``: other ManagedProcesses) are checked, so a dead dependency ends the wait
    at once with its own name and log tail."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, health_url: str | None = None,
                 env: Mapping[str, str] | None = None, ready_timeout: float = 60.0,
                 ready: Callable[[], bool] | None = None, watch: Sequence[ManagedProcess] = (),
                 nice: int = 0) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.health_url = health_url
        self._ready = ready or (http_ready(health_url) if health_url else (lambda: True))
        self.watch = list(watch)
        self.nice = nice
        self.env = dict(env) if env is not None else None
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_report(self, grace: float = 0.0) -> str | None:
        """None while it runs (or after :meth:`stop`); once it died on its own: its name,
        pid, exit status and the tail of its log. ``grace``: seconds to wait for a process
        whose failure a client saw before the process was gone."""
        if self._proc is None:
            return None
        try:
            code = self._proc.wait(grace) if grace > 0 else self._proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return None
        how = f"exited with code {code}"
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        return f"{self.name} (pid {self._proc.pid}) {how} (log {self.log_path}):\n{log_tail(self.log_path)}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.env, start_new_session=True, preexec_fn=self._in_child,
                )
            except OSError as exc:
                raise ServerError(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") from None
        try:
            self._wait_ready()
        except BaseException:  # an interrupt while it starts must not leave it running
            self.stop()
            raise

    def _in_child(self) -> None:  # between fork and exec
        _die_with_parent()
        if self.nice:
            os.nice(self.nice)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self._proc.poll() if self._proc else None
            if code is not None:
                raise ServerError(
                    f"{self.name} exited with code {code} while starting (log {self.log_path}):\n"
                    f"{log_tail(self.log_path)}"
                )
            for dep in self.watch:
                if not dep.alive():
                    self.stop()
                    raise ServerError(
                        f"{dep.name} died while {self.name} was starting (log {dep.log_path}):\n"
                        f"{log_tail(dep.log_path)}\n  {self.name} log {self.log_path}:\n"
                        f"{log_tail(self.log_path, 10)}"
                    )
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                what = self.health_url or "its readiness check"
                raise ServerError(
                    f"{self.name} did not answer {what} within {self.ready_timeout:g}s "
                    f"(log {self.log_path}):\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)  # polling interval of the readiness probe

    def stop(self, grace: float = 10.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._proc = None  # only now: a stop cut short by an interrupt is done again by the next one
