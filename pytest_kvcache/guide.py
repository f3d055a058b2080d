"""What a session tells its user about the items it runs: which backend an external server
runs (and which items it therefore deselects), what exists when a selection leaves
nothing, and failure texts that fit the terminal.

:class:`SessionGuide` is a plugin object the main plugin registers in ``pytest_configure``.
"""

from __future__ import annotations

import difflib
import re

import pytest

from .models import BACKENDS, PHASES, format_tokens
from .report.redact import redact_url
from .report.progress import TerminalProgress
from .report.text import fit_lines, terminal_width

__all__ = ["SessionGuide"]

#: words of a -m expression that are no marker
_MARK_WORDS = frozenset({"and", "or", "not", "True", "False"})


class SessionGuide:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.external = _option(config, "kv_server", "kvcache_server") == "external"
        named = _option(config, "kv_external_backend", "kvcache_external_backend")
        if named is not None and named not in BACKENDS:
            raise pytest.UsageError(f"--kv-external-backend / kvcache_external_backend = {named!r}: use one of "
                                    f"{', '.join(BACKENDS)} (the offload backend the external server runs; none "
                                    "for a server without a tier)")
        if config.getoption("kv_external_backend", None) is not None and not self.external:
            # (the ini key may stand in a shared configuration; the option is said for this run)
            raise pytest.UsageError(f"--kv-external-backend {named} names the backend of a server somebody else "
                                    "runs: it goes with --kv-server external --kv-endpoint URL")
        self.named = named
        self.points: list = []  # what selects each benchmark item (_point), before any deselection
        self.lines: list[str] = []  # said under "collected N items"
        self._progress: TerminalProgress | None = None

    # -- collection -------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list) -> None:
        self.points = [point for point in map(_point, items) if point is not None]
        if self.external and self.points:
            self._external_selection(config, items)

    def _external_selection(self, config: pytest.Config, items: list) -> None:
        """An external server has one configuration: only the items of its backend can run on it."""
        from .servers.external import external_backend

        endpoint = _option(config, "kv_endpoint", "kvcache_endpoint")
        shown = redact_url(endpoint) if endpoint else "?"
        said, why = external_backend(endpoint) if endpoint else (None, "no --kv-endpoint")
        if self.named and said and said != self.named:
            raise pytest.UsageError(f"--kv-external-backend / kvcache_external_backend = {self.named!r}, but the "
                                    f"server at {shown} says it runs backend {said!r} (its GET /version); pass "
                                    f"--kv-external-backend {said}, or point --kv-endpoint at the {self.named} server")
        backend = self.named or said
        if backend is None:
            self.lines.append(f"kvcache: the external server at {shown} does not say which offload backend it runs "
                              f"({why}): every backend's items run against it; pass --kv-external-backend NAME "
                              "(none for a server without a tier) to run only its backend's items")
            return
        source = "--kv-external-backend" if self.named else "its GET /version"
        points = {id(i): _point(i) for i in items}
        others = [i for i in items if points[id(i)] is not None and points[id(i)].backend != backend]
        paired = [i for i in items if points[id(i)] is not None and points[id(i)].backend == backend
                  and getattr(points[id(i)], "reference_backend", None) is not None]
        dropped = others + paired
        what = f"kvcache: the external server at {shown} runs backend '{backend}' ({source})"
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            gone = {id(i) for i in dropped}
            items[:] = [i for i in items if id(i) not in gone]
            parts = []
            if others:
                names = ", ".join(dict.fromkeys(points[id(i)].backend for i in others))
                parts.append(f"{len(others)} item(s) of other backends ({names})")
            if paired:
                parts.append(f"{len(paired)} paired item(s), which need two server configurations")
            what += ": deselected " + " and ".join(parts)
        self.lines.append(what)

    def pytest_report_collectionfinish(self, config: pytest.Config) -> list[str]:
        return fit_lines(self.lines, terminal_width(config))

    # -- an empty selection -----------------------------------------------------------------

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        if exitstatus != pytest.ExitCode.NO_TESTS_COLLECTED or not self.points:
            return
        for line in fit_lines(self.empty_selection_hint(config), terminal_width(config)):
            terminalreporter.write_line(line, yellow=True)

    def empty_selection_hint(self, config: pytest.Config) -> list[str]:
        """What the collected benchmark items have, and which of the user's selectors matched none of it."""
        points = self.points

        def values(dim: str) -> list:
            return sorted({v for p in points if (v := getattr(p, dim, None)) is not None})

        backends = [b for b in BACKENDS if b in values("backend")]
        phases = [p for p in PHASES if p in values("phase") and p not in BACKENDS]
        markers = {"kvcache", *backends, *phases}
        lengths = values("input_len")
        lines = [f"pytest-kvcache: no item selected of the {len(points)} benchmark item(s) collected; what they "
                 "have:",
                 f"  markers (-m): kvcache; backends {', '.join(backends)}"
                 + (f"; phases {', '.join(phases)}" if phases else ""),
                 f"  --input-len: {', '.join(format_tokens(n) for n in lengths)}",
                 f"  --backend: {', '.join(backends)}",
                 f"  --concurrency: {', '.join(str(n) for n in values('concurrency'))}",
                 f"  --output-len: {', '.join(str(n) for n in values('output_len'))}"]
        expression = config.getoption("markexpr", "") or ""
        for word in dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression)):
            if word not in _MARK_WORDS and word not in markers:
                close = difflib.get_close_matches(word, sorted(markers), n=1)
                lines.append(f"  -m {expression}: no item has the marker '{word}'"
                             + (f"; did you mean {close[0]}?" if close else ""))
        for option, given, have, show in (
                ("input-len", config.getoption("input_len"), set(lengths), format_tokens),
                ("backend", config.getoption("backend"), set(backends), str),
                ("concurrency", config.getoption("concurrency"), set(values("concurrency")), str),
                ("output-len", config.getoption("output_len"), set(values("output_len")), str)):
            missing = [v for group in given or () for v in group if v not in have]
            if missing:
                lines.append(f"  --{option} {','.join(show(v) for v in missing)}: no item has "
                             + ("these values" if len(missing) > 1 else "this value"))
        return lines

    # -- progress -------------------------------------------------------------------------------

    def progress_output(self) -> TerminalProgress | None:
        """Where running items show their progress; None without a terminal (an xdist worker)."""
        if self._progress is None:
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            capture = self.config.pluginmanager.get_plugin("capturemanager")
            if reporter is not None and capture is not None:
                self._progress = TerminalProgress(reporter, capture)
        return self._progress

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # an item's status goes before pytest writes the item's letter in its place
        if self._progress is not None:
            self._progress.clear()

    # -- lines that fit the terminal ----------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_report_header(self, config: pytest.Config):
        """Every plugin's header lines (ours, pytest's plugins line, pytest-benchmark's
        defaults) wrapped to the terminal's width; run.json keeps ours as they are."""
        results = yield
        width = terminal_width(config)
        return [fit_lines([lines] if isinstance(lines, str) else list(lines), width) for lines in results]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        """A scenario item's failure text (pytest.fail(..., pytrace=False): printed as it is)
        wrapped to the terminal's width; the message itself is unchanged in JSON and reports."""
        report = yield
        width = terminal_width(self.config)
        if report.failed and width and _is_scenario(item):
            traceback = getattr(report.longrepr, "reprtraceback", None)
            for entry in getattr(traceback, "reprentries", ()):
                if getattr(entry, "style", None) == "value":
                    entry.lines = fit_lines(list(entry.lines), width - 1)
        return report


def _is_scenario(item) -> bool:
    return getattr(item, "case", None) is not None and hasattr(item, "baseline_key")


def _point(item):
    """What selects a benchmark item (backend, lengths, concurrency, phase): a scenario
    item's case, or the kvcache-marker combination of a test using the kv_* fixtures;
    None for any other test, and for a storage item (storage_items.py: no server, no lengths)."""
    if getattr(item, "storage", None) is not None:
        return None
    if _is_scenario(item):
        return item.case
    from .fixtures import item_params

    return item_params(item)


def _option(config: pytest.Config, name: str, ini: str):
    value = config.getoption(name, None)
    if value is None or value == "":
        value = config.getini(ini)
    return value if value != "" else None
