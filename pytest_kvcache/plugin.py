"""pytest hooks: options and their ini twins, markers, YAML collection, summary, exit status.

Scenario files (``*.yaml`` in a folder named ``scenarios``, or any YAML file named on
the command line) become one item per matrix point, named like
``prefill[cpu-10k-c16]`` and marked with their backend and phase.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
from pathlib import Path

import pytest

from .errors import KVCacheError, ScenarioError
from .models import BACKENDS, PHASES, ScenarioCase
from .scenarios import TOKEN_COUNT_FORMS, load_scenario, parse_token_count
from .servers import SERVER_KINDS, ServerSettings
from .session import KVSession, Settings

__all__ = ["SESSION_KEY", "ScenarioFile", "ScenarioItem"]

SESSION_KEY = pytest.StashKey[KVSession]()
_URL = re.compile(r"^https?://[^/\s:]+(:\d+)?(/.*)?$")


# -- option value types: each raises ArgumentTypeError, which pytest turns into a usage error


def _token_counts(text: str) -> list[int]:
    parts = [part for part in text.split(",") if part.strip()]
    try:
        values = [parse_token_count(part) for part in parts]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: use {TOKEN_COUNT_FORMS}, or a comma list such as 1k,10k")
    return values


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: use positive integers, or a comma list such as 1,16")
    return values


def _backends(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    bad = [v for v in values if v not in BACKENDS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: use one or more of {', '.join(BACKENDS)} (comma-separated)")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive integer")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvcache", "KV-cache offloading benchmarks (pytest-kvcache)")
    group.addoption("--input-len", action="append", type=_token_counts, default=[], metavar="LEN[,LEN]",
                    help=f"run only items with these input lengths; {TOKEN_COUNT_FORMS}; repeatable")
    group.addoption("--concurrency", action="append", type=_positive_ints, default=[], metavar="N[,N]",
                    help="run only items with these concurrencies; repeatable")
    group.addoption("--backend", action="append", type=_backends, default=[], metavar="NAME[,NAME]",
                    help=f"run only items of these offload backends: {', '.join(BACKENDS)}; repeatable")
    group.addoption("--output-len", action="append", type=_positive_ints, default=[], metavar="N[,N]",
                    help="run only items with these output lengths; repeatable")
    group.addoption("--trials", type=_positive_int, default=None, metavar="N",
                    help="trials per item, overriding the scenarios' value")
    group.addoption("--kv-server", choices=SERVER_KINDS, default=None,
                    help="server to benchmark: the built-in emulator (default), a real vllm serve process, "
                         "or an external endpoint (ini: kvcache_server)")
    group.addoption("--kv-endpoint", default=None, metavar="URL",
                    help="base URL of the server for --kv-server external, e.g. http://127.0.0.1:8000 "
                         "(ini: kvcache_endpoint)")
    group.addoption("--kv-server-args", default=None, metavar="ARGS",
                    help="extra arguments for the started server (vllm serve or the emulator), one quoted "
                         "string, e.g. --kv-server-args='--max-model-len 16384' (ini: kvcache_server_args)")
    group.addoption("--model", default=None, metavar="NAME",
                    help="model name or folder to serve / request (ini: kvcache_model)")
    group.addoption("--tokenizer", default=None, metavar="PATH",
                    help="local tokenizer (folder with tokenizer.json) for exact prompt lengths; default: the "
                         "server's /tokenize (ini: kvcache_tokenizer)")
    group.addoption("--kv-results-dir", default=None, metavar="DIR",
                    help="folder for per-item JSON results and server logs (ini: kvcache_results_dir; "
                         "default kvcache-results/run-<timestamp>)")
    group.addoption("--baseline-dir", default=None, metavar="DIR",
                    help="folder of stored baselines (ini: kvcache_baseline_dir; default baselines)")
    group.addoption("--update-baselines", action="store_true", default=False,
                    help="append this run to the stored baselines instead of comparing")
    group.addoption("--reset-baselines", action="store_true", default=False,
                    help="replace the stored baselines' history with this run (after an intended change)")
    group.addoption("--strict-baselines", action="store_true", default=None,
                    help="fail, rather than skip, items without a matching baseline (ini: kvcache_strict_baselines)")
    group.addoption("--alpha", default=None, metavar="P",
                    help="significance level of the regression gate, 0 < P < 0.5 (ini: kvcache_alpha; default 0.05)")
    group.addoption("--emulator-slowdown", default=None, metavar="FACTOR",
                    help="multiply every modeled time of the emulator by FACTOR > 0, to rehearse a regression "
                         "(ini: kvcache_emulator_slowdown; default 1.0)")

    parser.addini("kvcache_server", f"default of --kv-server: {', '.join(SERVER_KINDS)}", default="emulator")
    parser.addini("kvcache_endpoint", "default of --kv-endpoint", default="")
    parser.addini("kvcache_server_args", "default of --kv-server-args", default="")
    parser.addini("kvcache_model", "default of --model", default="")
    parser.addini("kvcache_tokenizer", "default of --tokenizer", default="")
    parser.addini("kvcache_results_dir", "default of --kv-results-dir", default="")
    parser.addini("kvcache_baseline_dir", "default of --baseline-dir", default="baselines")
    parser.addini("kvcache_strict_baselines", "default of --strict-baselines", type="bool", default=False)
    parser.addini("kvcache_alpha", "default of --alpha", default="0.05")
    parser.addini("kvcache_emulator_slowdown", "default of --emulator-slowdown", default="1.0")


def _option(config: pytest.Config, name: str, ini: str):
    value = config.getoption(name)
    if value is None or value == "":
        value = config.getini(ini)
    return value if value != "" else None


def _float_setting(config: pytest.Config, name: str, ini: str, low: float, high: float, form: str) -> float:
    raw = _option(config, name, ini)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not low < value < high:
        raise pytest.UsageError(f"--{name.replace('_', '-')} / {ini} = {raw!r}: use {form}")
    return value


def _settings(config: pytest.Config) -> Settings:
    kind = _option(config, "kv_server", "kvcache_server")
    if kind not in SERVER_KINDS:
        raise pytest.UsageError(f"kvcache_server = {kind!r}: use one of {', '.join(SERVER_KINDS)}")
    endpoint = _option(config, "kv_endpoint", "kvcache_endpoint")
    if endpoint is not None and not _URL.match(endpoint):
        raise pytest.UsageError(f"--kv-endpoint / kvcache_endpoint = {endpoint!r}: use a URL such as "
                                "http://127.0.0.1:8000")
    if kind == "external" and endpoint is None:
        raise pytest.UsageError("--kv-server external needs --kv-endpoint URL (e.g. http://127.0.0.1:8000)")
    server_args = _option(config, "kv_server_args", "kvcache_server_args") or ""
    try:
        extra_args = tuple(shlex.split(server_args))
    except ValueError as exc:
        raise pytest.UsageError(f"--kv-server-args / kvcache_server_args = {server_args!r}: {exc}; "
                                "quote it as one shell string") from None
    tokenizer = _option(config, "tokenizer", "kvcache_tokenizer")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise pytest.UsageError(f"--tokenizer / kvcache_tokenizer = {tokenizer!r}: no such file or folder; "
                                "pass a model folder with tokenizer.json")
    root = config.rootpath
    results = _option(config, "kv_results_dir", "kvcache_results_dir")
    if results is None:
        import datetime as _dt

        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        results = root / "kvcache-results" / f"run-{stamp}"
    strict = config.getoption("strict_baselines")
    return Settings(
        server=ServerSettings(
            kind=kind,
            endpoint=endpoint,
            model=_option(config, "model", "kvcache_model"),
            extra_args=extra_args,
            emulator_slowdown=_float_setting(config, "emulator_slowdown", "kvcache_emulator_slowdown", 0, 1000,
                                             "a factor above 0, e.g. 1.3"),
        ),
        tokenizer=tokenizer,
        results_dir=(root / results) if not Path(results).is_absolute() else Path(results),
        baseline_dir=root / _option(config, "baseline_dir", "kvcache_baseline_dir"),
        update_baselines=config.getoption("update_baselines"),
        reset_baselines=config.getoption("reset_baselines"),
        strict_baselines=bool(strict if strict is not None else config.getini("kvcache_strict_baselines")),
        alpha=_float_setting(config, "alpha", "kvcache_alpha", 0, 0.5, "a significance level such as 0.05"),
        trials=config.getoption("trials"),
        verbose=config.getoption("verbose"),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvcache: an item generated from a pytest-kvcache scenario file")
    for backend in BACKENDS:
        config.addinivalue_line("markers", f"{backend}: items of the '{backend}' offload backend")
    for phase in PHASES:
        if phase not in BACKENDS:
            config.addinivalue_line("markers", f"{phase}: items of the '{phase}' phase")
    settings = _settings(config)
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="kvcache-"))
    config.stash[SESSION_KEY] = KVSession(settings, workdir, planned_comparisons=lambda: _planned(config))


def _planned(config: pytest.Config) -> int:
    return config.stash.get(_PLANNED_KEY, 1)


_PLANNED_KEY = pytest.StashKey[int]()


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
        import shutil

        shutil.rmtree(session.pool.workdir, ignore_errors=True)


# -- collection ---------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    explicit = {Path(arg.split("::")[0]).resolve() for arg in parent.config.args}
    if file_path.parent.name == "scenarios" or file_path.resolve() in explicit:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _scenario_test(request: pytest.FixtureRequest, kvcache_session: KVSession) -> None:
    """The body of every scenario item: measure, store, compare (see KVSession.run_item)."""
    item = request.node
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")

    def progress(text: str) -> None:
        if kvcache_session.settings.verbose > 0 and reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # progress must reach the terminal now
                reporter.write_line(f"  kvcache {item.case.name}: {text}")

    kvcache_session.run_item(item.nodeid, item.case, item.baseline_key, progress)


class ScenarioFile(pytest.File):
    def collect(self):
        try:
            scenario = load_scenario(self.path)
        except ScenarioError as exc:
            raise self.CollectError(str(exc)) from None
        for case in scenario.cases:
            yield ScenarioItem.from_parent(self, name=case.name, callobj=_scenario_test, case=case)

    class CollectError(Exception):
        pass

    def repr_failure(self, excinfo):
        if excinfo.errisinstance((self.CollectError, KVCacheError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class ScenarioItem(pytest.Function):
    """A scenario case run as a test; fixtures work as for a test function."""

    def __init__(self, *, case: ScenarioCase, **kwargs) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.add_marker("kvcache")
        self.add_marker(case.backend)
        if case.phase not in BACKENDS:
            self.add_marker(case.phase)

    @property
    def baseline_key(self) -> str:
        return f"{Path(self.case.path).stem}/{self.case.name}"

    def reportinfo(self):
        return self.path, None, f"{self.case.name} ({Path(self.case.path).name})"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    filters = {
        "input_len": {v for values in config.getoption("input_len") for v in values},
        "concurrency": {v for values in config.getoption("concurrency") for v in values},
        "backend": {v for values in config.getoption("backend") for v in values},
        "output_len": {v for values in config.getoption("output_len") for v in values},
    }
    selected, deselected = [], []
    for item in items:
        case = getattr(item, "case", None)
        if isinstance(item, ScenarioItem) and any(
            wanted and getattr(case, dim) not in wanted for dim, wanted in filters.items()
        ):
            deselected.append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def pytest_collection_finish(session: pytest.Session) -> None:
    # Counted after -m/-k deselection: the comparisons this session may make.
    planned = sum(len(item.case.thresholds) for item in session.items if isinstance(item, ScenarioItem))
    session.config.stash[_PLANNED_KEY] = max(1, planned)


@pytest.fixture(scope="session")
def kvcache_session(pytestconfig: pytest.Config) -> KVSession:
    """The session object of pytest-kvcache: settings, server pool, results."""
    return pytestconfig.stash[SESSION_KEY]


# -- end of session -------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    kv = session.config.stash.get(SESSION_KEY, None)
    if kv is None:
        return
    kv.close()
    from .report.terminal import session_gate

    kv.gate = gate = session_gate(kv.outcomes, kv.settings.alpha)
    if gate.failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    kv = config.stash.get(SESSION_KEY, None)
    if kv is None or not kv.outcomes:
        return
    from .report.terminal import render_summary

    for line in render_summary(kv.outcomes, kv.gate, kv.settings):
        terminalreporter.write_line(line)
