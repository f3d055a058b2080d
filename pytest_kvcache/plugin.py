"""pytest hooks of pytest-kvcache: the session's settings, markers, the end of the session
(the gate, the history, the run files, the summary) and interrupts.

The options are declared in :mod:`.options`, scenario files are collected by
:mod:`.collection`, pytest-xdist's controller and workers talk through :mod:`._xdist`
and the kv_* fixtures live in :mod:`.fixtures`. This module is imported by every pytest
run of an environment where the package is installed, so it imports only pytest and
light modules at the top; the rest is imported where a hook needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._stash import (
    COLLECTED_KEY,
    GUIDE_KEY,
    ORDER_KEY,
    PLANNED_KEY,
    SCENARIO_ITEMS_KEY,
    SESSION_KEY,
    SETTINGS_KEY,
    STARTED_KEY,
    kv_session,
)
from ._xdist import worker_id

if TYPE_CHECKING:
    from .session import KVSession

__all__ = ["SETTINGS_KEY", "item_progress", "kv_session", "record_item"]

# kv_backend, kv_server, kv_load, kv_gate; scenario files and the items' filters
pytest_plugins = ("pytest_kvcache.fixtures", "pytest_kvcache.collection")


def pytest_addoption(parser: pytest.Parser) -> None:
    from .options import add_options

    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def pytest_configure(config: pytest.Config) -> None:
    from .guide import SessionGuide
    from .models import BACKENDS, PHASES
    from .options import gpus_per_worker, read_settings

    config.addinivalue_line("markers", "kvcache(backend=[...], input_len=[...], concurrency=[...], output_len=[...], "
                            "phase=..., thresholds=..., lmcache_mode=..., server_args=...): a pytest-kvcache "
                            "benchmark, from a scenario file or a test using the kv_* fixtures (one test per "
                            "combination of the lists)")
    for backend in BACKENDS:
        config.addinivalue_line("markers", f"{backend}: items of the '{backend}' offload backend")
    for phase in PHASES:
        if phase not in BACKENDS:
            config.addinivalue_line("markers", f"{phase}: items of the '{phase}' phase")
    settings = config.stash[SETTINGS_KEY] = read_settings(config)
    config.stash[STARTED_KEY] = datetime.now(timezone.utc)
    # an external server's backend and the items it deselects, hints for an empty selection, progress
    config.stash[GUIDE_KEY] = SessionGuide(config)
    _sweep_scratch(settings.results_dir)
    per_worker = gpus_per_worker(config)  # a bad value is a usage error in every process
    if config.pluginmanager.hasplugin("xdist"):
        from . import _xdist

        config.pluginmanager.register(_xdist, "kvcache-xdist")
        _xdist.setup_worker_gpus(config, per_worker)
    config.pluginmanager.register(config.stash[GUIDE_KEY], "kvcache-guide")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    guard = config.stash.get(_GUARD_KEY, None)
    if guard is not None:
        guard.ending = True  # an interrupt now would leave servers or the scratch behind
    try:
        if session is not None:
            session.close()
            import shutil

            shutil.rmtree(session.pool.workdir, ignore_errors=True)
    finally:
        if guard is not None:
            guard.restore()


# -- interrupts: SIGTERM as Ctrl-C, a quiet cleanup, scratch of dead runs -------------------


class _SignalGuard:
    """SIGTERM (how CI runners stop a job) ends the run as Ctrl-C does: a KeyboardInterrupt,
    so the servers and their services stop, the run files are written marked interrupted,
    the scratch folder goes, and pytest exits with status 2. Once the run is ending, a
    further SIGINT or SIGTERM is held rather than raised, so the cleanup is never cut
    short into a traceback; it is bounded (each server gets 10 s, then SIGKILL)."""

    def __init__(self) -> None:
        self.received: list[str] = []  # signal names, in order
        self.ending = False
        self._held = 0
        self._previous: dict[int, Any] = {}  # signal handlers as signal.signal returns them

    def install(self) -> None:
        import signal
        import threading

        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        import asyncio
        import signal

        name = signal.Signals(signum).name
        self.received.append(name)
        if not self.ending:
            self.ending = True
            interrupt = KeyboardInterrupt() if name == "SIGINT" else KeyboardInterrupt(f"{name} received")
            loop = asyncio._get_running_loop()
            if loop is not None and asyncio.current_task(loop) is not None:
                # raised from a callback of its own instead: a task that ended with it would be
                # logged with a traceback ("exception was never retrieved") at exit, while
                # asyncio.run cancels the tasks still running, so their cleanup runs
                loop.call_soon(_raise, interrupt)
                return
            raise interrupt
        self._held += 1
        if self._held == 1:  # said once; os.write: a buffered stream may be mid-write below us
            os.write(2, f"\npytest-kvcache: {name} held: stopping the servers, writing the run files and removing "
                        f"the scratch folder first (kill -9 {os.getpid()} abandons that)\n".encode())


def _raise(exc: BaseException) -> None:
    raise exc


_GUARD_KEY = pytest.StashKey[_SignalGuard]()


def _pid_gone(pid: int) -> bool:
    """No such process here (or only its zombie): its scratch folder is nobody's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _sweep_scratch(results_dir: Path) -> None:
    """Remove the ``.scratch-<pid>`` folders of runs whose process is gone (kill -9, a lost
    machine): in this results folder and in its siblings, since the default results folder
    is a new ``run-<time>`` folder each run. A live process's folder is left alone."""
    import shutil

    found = {*results_dir.glob(".scratch-*"), *results_dir.parent.glob("*/.scratch-*")}
    for folder in sorted(found):
        pid = folder.name.removeprefix(".scratch-")
        if pid.isdigit() and int(pid) != os.getpid() and folder.is_dir() and not folder.is_symlink() \
                and _pid_gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    from .collection import ScenarioItem
    from .fixtures import baseline_key, item_params, planned_thresholds

    # Counted after -m/-k deselection: the comparisons this session may make, scenario
    # items' and fixture tests' (those that use kv_gate) alike.
    overrides = session.config.stash[SETTINGS_KEY].thresholds
    gated = [(item.baseline_key, item.case.thresholds, item.case.reference_backend is None)
             for item in session.items if isinstance(item, ScenarioItem)]
    gated += [(baseline_key(item), planned_thresholds(item, overrides), True)
              for item in session.items if item_params(item) is not None]
    session.config.stash[PLANNED_KEY] = max(1, sum(len(thresholds) for _, thresholds, _ in gated))
    # the items whose stored baselines tell this runner's run-to-run noise (session._prior)
    session.config.stash[COLLECTED_KEY] = tuple((key, tuple(t.metric for t in thresholds))
                                                for key, thresholds, against_baseline in gated
                                                if against_baseline and thresholds)
    session.config.stash[ORDER_KEY] = {item.nodeid: i for i, item in enumerate(session.items)}
    session.config.stash[SCENARIO_ITEMS_KEY] = tuple(
        item.nodeid for item in session.items if isinstance(item, ScenarioItem) or item_params(item) is not None)
    if worker_id(session.config) is None and session.config.stash[SCENARIO_ITEMS_KEY]:
        # only where servers will run: other suites keep Python's own SIGINT and SIGTERM
        guard = session.config.stash.setdefault(_GUARD_KEY, _SignalGuard())
        guard.install()


@pytest.fixture(scope="session")
def kvcache_session(pytestconfig: pytest.Config) -> KVSession:
    """The session object of pytest-kvcache: settings, server pool, results."""
    return kv_session(pytestconfig)


def item_progress(request: pytest.FixtureRequest, name: str) -> Callable[[str], None]:
    """Where an item's progress goes (scenario items and fixture tests alike): a line per
    round under -v, else a status that never floods (see report.progress.ItemProgress)."""
    from .report.progress import ItemProgress

    verbose = request.config.stash[SETTINGS_KEY].verbose
    return ItemProgress(name, request.config.stash[GUIDE_KEY].progress_output(), verbose=verbose > 0)


def record_item(request: pytest.FixtureRequest, kv: KVSession) -> None:
    """JUnit properties and the pytest-benchmark entry of the item that just ran."""
    item = request.node
    outcome = next((o for o in reversed(kv.outcomes) if o.nodeid == item.nodeid), None)
    if outcome is None:
        return
    from .report.properties import benchmark_wanted, fill_benchmark, junit_properties

    item.user_properties.extend(junit_properties(outcome, kv.settings.results_dir))
    bench = getattr(request.config, "_benchmarksession", None)
    if benchmark_wanted(bench) and outcome.result is not None and outcome.result.usable_trials:
        fill_benchmark(request.getfixturevalue("benchmark"), outcome)


# -- end of session -------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    kv = session.config.stash.get(SESSION_KEY, None)
    if kv is None:
        return
    guard = session.config.stash.get(_GUARD_KEY, None)
    if guard is not None:
        guard.ending = True  # from here on an interrupt is held until the cleanup is done
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        kv.interrupted = guard.received[0] if guard is not None and guard.received else "KeyboardInterrupt"
    kv.close()
    if worker_id(session.config) is not None:
        from ._xdist import finish_worker

        finish_worker(session.config, kv)  # the controller decides and writes the run files
        return
    from .decision import GateEntry, session_gate

    order = session.config.stash.get(ORDER_KEY, {})
    kv.outcomes.sort(key=lambda o: order.get(o.nodeid, len(order)))  # xdist: back in collection order
    kv.gate = gate = session_gate([GateEntry(item=o.case.name, comparisons=tuple(o.comparisons), status=o.status,
                                             message=o.message, testbed_differs=o.testbed_differs)
                                   for o in kv.outcomes if o.status != "baseline-updated"], kv.settings.alpha)
    if gate.failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _record_history(session.config, kv)
    _write_run_files(session, kv)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    kv = config.stash.get(SESSION_KEY, None)
    if kv is None or not kv.outcomes:
        return
    from .report.terminal import render_summary
    from .report.text import fit_lines, terminal_width

    width = terminal_width(config)  # every line fits the terminal (where there is one), nothing is cut

    def say(text: str, colour: str | None = None) -> None:
        for line in fit_lines([text], width):
            terminalreporter.write_line(line, **({colour: True} if colour else {}))

    for line, colour in render_summary(kv.outcomes, kv.gate, kv.settings, change_points=kv.change_points,
                                       interrupted=kv.interrupted, not_run=_not_run(config, kv), width=width):
        terminalreporter.write_line(line, **({colour: True} if colour else {}))
    problem = config.stash.get(_HISTORY_KEY, None)
    if problem:
        say(f"pytest-kvcache: WARNING: {problem}", "yellow")
    files = config.stash.get(_RUN_FILES_KEY, None)
    if isinstance(files, Exception):
        say(f"pytest-kvcache: the run files could not be written: {type(files).__name__}: {files}", "red")
    elif files:
        say(f"pytest-kvcache: report {files['report.html']} (CSV, markdown, plots beside it)")


# -- run files, header, JUnit properties, pytest-benchmark (report/) ---------------------

#: the run files written (name -> path), or why they could not be
_RUN_FILES_KEY: pytest.StashKey[dict[str, Path] | Exception] = pytest.StashKey()


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash.get(SETTINGS_KEY, None)
    if settings is None:
        return []
    from .backends.probe import detect_gpus
    from .report.terminal import header_lines

    server = settings.server
    versions = None
    if server.kind == "emulator":
        gpu = f"emulated (cost-model profile {server.emulator_profile})"
    else:
        names = detect_gpus()
        gpu = f"{len(names)} x {names[0]}" if names and len(set(names)) == 1 else (", ".join(names) or "none")
        if server.kind == "vllm":
            try:
                versions = kv_session(config).pool.probe.info()
            except Exception as exc:  # the header must not stop the run; the server start will say more
                versions = {"probe": f"failed: {exc}"}
    return header_lines(settings, gpu=gpu, versions=versions)


_HISTORY_KEY = pytest.StashKey[str]()


def _record_history(config: pytest.Config, kv: KVSession) -> None:
    problem = kv.record_history(config.rootpath)
    if problem:
        config.stash[_HISTORY_KEY] = problem


def _not_run(config: pytest.Config, kv: KVSession) -> tuple[str, ...]:
    """The selected items that never started (an interrupted run), in collection order."""
    if not kv.interrupted:
        return ()
    started = {o.nodeid for o in kv.outcomes}
    return tuple(nodeid for nodeid in config.stash.get(SCENARIO_ITEMS_KEY, ()) if nodeid not in started)


def _write_run_files(session: pytest.Session, kv: KVSession) -> None:
    if not kv.outcomes:
        return
    from .report.run_files import write_run_files

    config = session.config
    try:
        header = pytest_report_header(config)
        config.stash[_RUN_FILES_KEY] = write_run_files(kv.settings.results_dir, kv.outcomes, kv.gate, kv.settings,
                                                       store=kv.store, header=header, started=kv.started,
                                                       history=kv.history, interrupted=kv.interrupted,
                                                       not_run=_not_run(config, kv))
    except Exception as exc:  # the verdicts stand without the report files; say what went wrong
        config.stash[_RUN_FILES_KEY] = exc
