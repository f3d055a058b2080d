"""Lines that fit the terminal: its width, and wrapping that never cuts a word off.

Kept apart from the summary table (terminal.py), which needs the verdicts: every pytest
run wraps its header lines with these, benchmark or not."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fit_lines", "terminal_width"]


def terminal_width(config) -> int | None:
    """The width every line of the session fits: the terminal's (COLUMNS, else the tty's
    own), where the output is a terminal; None for a log (CI, a pipe, a file), which has no
    width to fit and keeps its lines whole to be searched, as pytest keeps its summary lines
    whole on CI. (COLUMNS alone tells no terminal: GNU readline exports it in any process
    that loads it, and children inherit it.)"""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:  # an xdist worker
        return None
    isatty = reporter.isatty  # a method since pytest 8.1, a bool before
    return config.get_terminal_writer().fullwidth if (isatty() if callable(isatty) else isatty) else None


def fit_lines(lines: Sequence[str], width: int | None, indent: str = "    ") -> list[str]:
    """Each line wrapped to ``width`` columns (None: as they are), its continuation lines
    indented under it. A long word (a path) starts a line of its own, and only one longer
    than a whole line is broken: nothing is ever cut off."""
    import textwrap

    if not width:
        return list(lines)
    out = []
    for line in lines:
        lead = line[:len(line) - len(line.lstrip())]
        more = (lead + indent)[:max(0, width // 2)]
        for part in textwrap.wrap(line, width=width, subsequent_indent=more, break_long_words=False,
                                  break_on_hyphens=False) or [""]:
            while len(part) > width:
                out.append(part[:width])
                part = more + part[width:]
            out.append(part)
    return out
