"""A running item's progress on the terminal or in a log (fed the runner's texts)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Protocol

from .text import fit_lines, terminal_width

__all__ = ["ItemProgress", "ProgressOutput", "TerminalProgress"]


class ProgressOutput(Protocol):
    """Where :class:`ItemProgress` writes: whole lines, and (on a terminal) a status that
    the next status or :meth:`clear` replaces."""

    tty: bool

    def line(self, text: str) -> None: ...

    def status(self, text: str) -> None: ...

    def clear(self) -> None: ...


#: the runner's progress texts (runner.CaseRunner): a round's requests done, its warm-up requests
_ROUND_PROGRESS = re.compile(r"^(?P<round>.*): (?P<done>\d+)/(?P<total>\d+) requests$")
_WARMUP = re.compile(r"^(?P<round>.*): (?P<n>\d+) warm-up requests$")


class ItemProgress:
    """What a running item shows of its progress, fed the runner's texts (``__call__``).

    ``-v``: one line per round, when it ends (with its time and warm-up requests), and
    every other message (a confirmation run). Otherwise: on a terminal one status after
    the item's dots, rewritten in place at most every ``status_every`` seconds (its output
    clears it before pytest reports the item); in a log (no terminal), one line at most
    every ``line_every`` seconds, so an item of minutes shows it is alive and a short one
    adds nothing."""

    def __init__(self, name: str, out: ProgressOutput | None, verbose: bool, *,
                 clock: Callable[[], float] | None = None, status_every: float = 0.2, line_every: float = 30.0) -> None:
        import time

        self.name = name
        self.out = out
        self.verbose = verbose
        self._clock = clock or time.monotonic
        self._status_every = status_every
        self._line_every = line_every
        self._started = self._mark = self._clock()
        self._last_status = -math.inf
        self._last_line = self._started  # the first line only once an item has run line_every seconds
        self._warmups: str | None = None

    def __call__(self, text: str) -> None:
        if self.out is None:
            return
        now = self._clock()
        done = _ROUND_PROGRESS.match(text)
        if self.verbose:
            warmup = _WARMUP.match(text)
            if warmup:
                self._warmups = warmup["n"]
            elif done is None:
                self.out.line(f"  kvcache {self.name}: {text}")
            elif done["done"] == done["total"]:
                extra = f", after {self._warmups} warm-up requests" if self._warmups else ""
                self.out.line(f"  kvcache {self.name}: {text} in {now - self._mark:.1f} s{extra}")
                self._mark, self._warmups = now, None
            return
        if self.out.tty:
            if now - self._last_status >= self._status_every:
                self.out.status(f"{self.name}: {text}")
                self._last_status = now
        elif now - self._last_line >= self._line_every:
            self.out.line(f"  kvcache {self.name}: {text} ({now - self._started:.0f} s into the item)")
            self._last_line = now


class TerminalProgress:
    """:class:`ProgressOutput` on pytest's terminal. Writes bypass pytest's capture; the
    status is written raw after the item's dots (pytest does not count it in its line, so
    its own layout is unchanged) and erased with backspaces."""

    def __init__(self, reporter, capture) -> None:
        self._reporter = reporter
        self._capture = capture
        self._tw = reporter.config.get_terminal_writer()
        isatty = reporter.isatty  # a method since pytest 8.1, a bool before
        self.tty = bool(isatty() if callable(isatty) else isatty)
        self._width = terminal_width(reporter.config)
        self._shown = 0

    def line(self, text: str) -> None:
        with self._capture.global_and_fixture_disabled():
            self._erase()
            for part in fit_lines([text], self._width):
                self._reporter.write_line(part)

    def status(self, text: str) -> None:
        room = self._tw.fullwidth - self._tw.width_of_current_line - len(" [100%]") - 2
        with self._capture.global_and_fixture_disabled():
            self._erase()
            if room >= 12:
                text = " " + (text if len(text) <= room else text[:room - 1] + "…")
                self._tw.write_raw(text, flush=True)
                self._shown = len(text)

    def clear(self) -> None:
        if self._shown:
            with self._capture.global_and_fixture_disabled():
                self._erase()

    def _erase(self) -> None:
        if self._shown:
            n, self._shown = self._shown, 0
            self._tw.write_raw("\b" * n + " " * n + "\b" * n, flush=True)
