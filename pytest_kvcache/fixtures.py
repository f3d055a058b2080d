"""Fixtures for benchmarks written as Python tests, on the engine of the scenario items.

A test asks for what it needs, as with pytest-benchmark::

    @pytest.mark.kvcache(backend=["none", "cpu"], input_len=["1k", "10k"])
    def test_prefill(kv_load, kv_gate):
        result = kv_load.run(num_prompts=32)      # 3 trials of a cold and a warm round
        kv_gate.check(result)                     # against the stored baseline

``@pytest.mark.kvcache(...)`` lists what the test runs with: ``backend``, and optionally
``input_len``, ``concurrency`` and ``output_len`` (a value or a list). Each combination
is one test, named like ``test_prefill[cpu-1k]``, marked with its backend (``-m cpu``)
and its ``phase`` (default ``prefill``), and kept or deselected by ``--backend``,
``--input-len``, ``--concurrency`` and ``--output-len`` as scenario items are (a filter
on a list the marker does not give deselects the test). The marker also takes
``thresholds`` (the gate's metrics: names, ``{metric: "10%"}`` or
``{metric: {direction, threshold}}``; counted in the session's planned comparisons),
``lmcache_mode``, and ``server_args`` (added to the started server's arguments, so
part of its configuration and testbed).

* :func:`kv_params` (:class:`KVParams`): this test's combination;
* :func:`kv_backend` (:class:`~pytest_kvcache.backends.BackendConfig`): its offload
  backend, provisioned; skipped with the reason where it cannot run here;
* :func:`kv_server` (:class:`KVServer`): that backend's server, shared with every test
  and scenario item of the same configuration (the session's server pool);
* :func:`kv_load` (:class:`KVLoad`): load measured as scenario items are;
* :func:`kv_gate` (:class:`KVGate`): the verdict against the stored baseline.

A test that uses them is an item of the session like a scenario item: a row in the
summary table and every report, a JSON file, a history entry, its comparisons in the
gate. Its baseline key is ``<module stem>/<test name>``, e.g.
``test_prefill/test_prefill[cpu-1k]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .errors import KVCacheError, ScenarioError
from .models import (
    BACKENDS,
    LMCACHE_MODES,
    PHASES,
    CaseResult,
    ItemOutcome,
    Measurement,
    MetricThreshold,
    RoundResult,
    ScenarioCase,
    format_tokens,
)

if TYPE_CHECKING:  # imported where used: pytest imports this module in every run (see plugin.py)
    from .backends import BackendConfig
    from .decision import Verdict, Zone
    from .runner import CaseRunner
    from .session import KVSession
    from .stats import MetricComparison
    from .telemetry import TelemetrySource

__all__ = [
    "GateVerdict",
    "KVGate",
    "KVLoad",
    "KVParams",
    "KVServer",
    "PairedResult",
    "Prompts",
    "Thresholds",
    "kv_backend",
    "kv_gate",
    "kv_load",
    "kv_params",
    "kv_server",
    "parse_thresholds",
]

#: Prompts given as they are: text, or token ids (sent as ids with the completions API).
Prompts = Sequence[str | Sequence[int]]
#: The gate's metrics: names (10% worse allowed, 5% for throughputs), ``{metric: "10%"}``
#: or ``{metric: {"direction": "lower", "threshold": "10%"}}``.
Thresholds = Sequence[str] | Mapping[str, Any]

_MARKER_KEYS = ("backend", "input_len", "concurrency", "output_len", "phase", "thresholds", "lmcache_mode",
                "server_args")
_THROUGHPUTS = ("request_throughput", "output_throughput", "total_token_throughput")


@dataclass(frozen=True)
class KVParams:
    """One combination of a test's ``@pytest.mark.kvcache`` lists; None where the marker
    gives no such list (:meth:`KVLoad.run` then uses the scenario default)."""

    backend: str = "none"
    input_len: int | None = None
    concurrency: int | None = None
    output_len: int | None = None

    @property
    def id(self) -> str:
        """The test id's part: ``cpu-1k-c16-o4``, each dimension the marker gives."""
        parts = [self.backend]
        if self.input_len is not None:
            parts.append(format_tokens(self.input_len))
        if self.concurrency is not None:
            parts.append(f"c{self.concurrency}")
        if self.output_len is not None:
            parts.append(f"o{self.output_len}")
        return "-".join(parts)


@dataclass(frozen=True)
class KVMarker:
    """What ``@pytest.mark.kvcache(...)`` says of a test (closest mark first, module and
    class marks fill in)."""

    backends: tuple[str, ...] = ("none",)
    input_lens: tuple[int | None, ...] = (None,)
    concurrencies: tuple[int | None, ...] = (None,)
    output_lens: tuple[int | None, ...] = (None,)
    phase: str = "prefill"
    thresholds: tuple[MetricThreshold, ...] | None = None
    lmcache_mode: str | None = None
    server_args: tuple[str, ...] = ()

    def params(self) -> list[KVParams]:
        return [KVParams(*combo) for combo in itertools.product(self.backends, self.input_lens, self.concurrencies,
                                                                self.output_lens)]


@dataclass(frozen=True)
class KVServer:
    """The running server of a test's backend: where to send requests and what it is."""

    kind: str  # emulator | vllm | external
    backend: str
    base_url: str
    model: str
    info: Mapping[str, str]
    telemetry: TelemetrySource
    log_path: Path | None
    _runner: CaseRunner = field(repr=False, compare=False)

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids as the server counts them (the local ``--tokenizer`` if given)."""
        return self._runner.tokenize(self.base_url, self.model, text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._runner.detokenize(self.base_url, self.model, ids)

    def metrics(self) -> dict[str, float]:
        """The server's ``/metrics`` now, each metric summed over its labels."""
        import httpx

        from .runner import parse_prometheus

        return parse_prometheus(httpx.get(f"{self.base_url}/metrics", timeout=30).text)


@dataclass(frozen=True)
class PairedResult:
    """Two backends measured trial by trial in one test, alternating which goes first."""

    reference: CaseResult
    candidate: CaseResult


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided of a test (it has already failed or skipped the test where
    the gate says so): ``status`` as in the summary (compared, baseline-updated)."""

    status: str
    zone: Zone | None
    comparisons: tuple[MetricComparison, ...]
    verdicts: tuple[Verdict, ...]
    message: str = ""


def parse_thresholds(spec: Thresholds) -> tuple[MetricThreshold, ...]:
    """Metric names (10% worse allowed, 5% for throughputs), ``{metric: "10%"}``, or
    ``{metric: {"direction": "lower", "threshold": "10%"}}``; ValueError names what is wrong."""
    from .scenarios import parse_threshold_override

    if isinstance(spec, str) or not isinstance(spec, (Sequence, Mapping)) or not spec:
        raise ValueError(f"thresholds={spec!r}: give metric names, {{metric: '10%'}} or "
                         "{metric: {'direction': 'lower', 'threshold': '10%'}}")
    items = spec.items() if isinstance(spec, Mapping) else ((metric, None) for metric in spec)
    out = []
    for metric, value in items:
        higher = metric in _THROUGHPUTS
        direction = "higher" if higher else "lower"
        if isinstance(value, Mapping):
            if set(value) - {"direction", "threshold"} or value.get("direction", direction) not in ("lower", "higher"):
                raise ValueError(f"thresholds[{metric!r}] = {value!r}: use {{'direction': 'lower' or 'higher', "
                                 "'threshold': '10%'}")
            direction, value = value.get("direction", direction), value.get("threshold")
        if value is None:
            value = "5%" if higher else "10%"
        name, fraction = parse_threshold_override(f"{metric}={value}")
        out.append(MetricThreshold(name, direction, fraction))
    return tuple(out)


def _values(raw: Any, key: str, parse: Callable[[Any], Any]) -> tuple:
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not values:
        raise ValueError(f"{key}=[]: give at least one value")
    try:
        parsed = tuple(parse(v) for v in values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key}={raw!r}: {exc}") from None
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"{key}={raw!r} repeats a value")
    return parsed


def _backend(value: Any) -> str:
    if value not in BACKENDS:
        raise ValueError(f"unknown backend {value!r}; use one of {', '.join(BACKENDS)}")
    return value


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def read_marker(node: pytest.Item | Any) -> KVMarker:
    """The test's ``@pytest.mark.kvcache`` settings; ValueError names a bad one."""
    from .scenarios import parse_token_count

    given: dict[str, Any] = {}
    for mark in node.iter_markers("kvcache"):
        if mark.args:
            raise ValueError(f"@pytest.mark.kvcache takes keywords ({', '.join(_MARKER_KEYS)}), not {mark.args!r}")
        for key, value in mark.kwargs.items():
            given.setdefault(key, value)
    unknown = sorted(set(given) - set(_MARKER_KEYS))
    if unknown:
        raise ValueError(f"@pytest.mark.kvcache({unknown[0]}=...): unknown; use {', '.join(_MARKER_KEYS)}")
    out = KVMarker()
    if "backend" in given:
        out = replace(out, backends=_values(given["backend"], "backend", _backend))
    if "input_len" in given:
        out = replace(out, input_lens=_values(given["input_len"], "input_len", parse_token_count))
    if "concurrency" in given:
        out = replace(out, concurrencies=_values(given["concurrency"], "concurrency", _positive))
    if "output_len" in given:
        out = replace(out, output_lens=_values(given["output_len"], "output_len", _positive))
    phase = given.get("phase", out.phase)
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: use one of {', '.join(PHASES)}")
    mode = given.get("lmcache_mode")
    if mode is not None and mode not in LMCACHE_MODES:
        raise ValueError(f"lmcache_mode={mode!r}: use one of {', '.join(LMCACHE_MODES)}")
    args = given.get("server_args", ())
    if isinstance(args, str):
        import shlex

        args = shlex.split(args)
    if not all(isinstance(a, str) for a in args):
        raise ValueError(f"server_args={given['server_args']!r}: give a string or a list of strings")
    thresholds = parse_thresholds(given["thresholds"]) if "thresholds" in given else None
    return replace(out, phase=phase, thresholds=thresholds, lmcache_mode=mode, server_args=tuple(args))


# -- collection (the hooks of collection.py and plugin.py call these) ---------------------------


def parametrize(metafunc: pytest.Metafunc) -> None:
    """One test per combination of the marker's lists, marked with its backend and phase."""
    try:
        marker = read_marker(metafunc.definition)
    except ValueError as exc:
        raise pytest.Collector.CollectError(f"{metafunc.definition.nodeid}: {exc}") from None
    phase = [getattr(pytest.mark, marker.phase)] if marker.phase not in BACKENDS else []
    metafunc.parametrize("kv_params", [
        pytest.param(p, id=p.id, marks=[pytest.mark.kvcache, getattr(pytest.mark, p.backend), *phase])
        for p in marker.params()], indirect=True)


def item_params(item: pytest.Item) -> KVParams | None:
    """The combination of a test that uses the fixtures; None for any other item."""
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("kv_params") if callspec is not None else None
    return value if isinstance(value, KVParams) else None


def baseline_key(item: pytest.Item) -> str:
    return f"{item.path.stem}/{item.name}"


def server_group(item: pytest.Item, params: KVParams) -> tuple:
    """Tests of one group share a server configuration: kept together, they share one server."""
    marker = read_marker(item)
    return params.backend, marker.server_args, marker.lmcache_mode


def planned_thresholds(item: pytest.Item, overrides: Sequence[tuple[str, float]]) -> tuple[MetricThreshold, ...]:
    """The comparisons a test that uses :func:`kv_gate` plans: its marker's thresholds, else
    the scenario defaults; none for a test without the gate."""
    from .scenarios import default_thresholds, override_thresholds

    params = item_params(item)
    if params is None or "kv_gate" not in getattr(item, "fixturenames", ()):
        return ()
    marker = read_marker(item)
    thresholds = marker.thresholds or default_thresholds(params.output_len or 1)
    probe = ScenarioCase(scenario="", path="", phase=marker.phase, case_id="", backend=params.backend, input_len=1,
                         concurrency=1, output_len=1, num_prompts=1, dataset="random", rounds=("cold",),
                         measure_round="cold", trials=1, seed=0, api="completions", request_rate=math.inf,
                         thresholds=thresholds)
    return override_thresholds(probe, overrides).thresholds


# -- one test -----------------------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """After the body, while its fixtures are up: its outcome, JSON, JUnit properties and
    pytest-benchmark entry (a failure or skip of the body is the outcome's status unless
    the gate decided it)."""
    test = item.stash.get(_TEST_KEY, None)
    try:
        return (yield)
    except BaseException as exc:
        if test is not None:
            test.ended = exc
        raise
    finally:
        if test is not None:
            test.close(in_body=True)


_TEST_KEY = pytest.StashKey["_Test"]()


class _Test:
    """One test's part in the session: its outcome (opened on first use), what its load
    measured, and whether it was judged."""

    def __init__(self, request: pytest.FixtureRequest, session: KVSession, params: KVParams) -> None:
        from .plugin import item_progress

        self.request = request
        self.session = session
        self.params = params
        self.node = request.node
        self.marker = read_marker(self.node)
        self.key = baseline_key(self.node)
        self.planned = len(planned_thresholds(self.node, session.settings.thresholds))
        self.progress = item_progress(request, self.node.name)
        self._outcome: ItemOutcome | None = None
        # id(result) -> (result, what measured it): results are not hashable, and kept alive here
        self._measured: dict[int, tuple[object, Any]] = {}
        self.judged = False
        self.ended: BaseException | None = None  # how the body ended, when it raised
        self.closed = False

    @property
    def outcome(self) -> ItemOutcome:
        if self._outcome is None:
            case = self.case(self.params.backend, {}, placeholder=True)
            self._outcome = self.session.open_item(self.node.nodeid, case, self.key)
        return self._outcome

    def fail(self, message: str) -> NoReturn:
        self.outcome.status, self.outcome.message = "failed", message
        pytest.fail(message, pytrace=False)

    def case(self, backend: str, workload: Mapping[str, Any], *, reference: str | None = None,
             placeholder: bool = False, caller: str = "kv_load.run") -> ScenarioCase:
        """The case of a load: the workload checked as a scenario file's (same limits and
        messages), the params' values where the call gives none."""
        from .scenarios import override_thresholds, parse_scenario

        p = self.params
        data: dict[str, Any] = {"name": "benchmark", "phase": self.marker.phase, "matrix": {"backend": [backend]}}
        for key, value in (("input_len", p.input_len or (1 if placeholder else None)), ("concurrency", p.concurrency),
                           ("output_len", p.output_len)):
            if value is not None:
                data[key] = value
        data.update({k: list(v) if k == "rounds" else dict(v) if isinstance(v, Mapping) else v
                     for k, v in workload.items() if v is not None})
        if reference is not None:
            data["paired_with"] = {"backend": reference}
        if self.marker.thresholds:
            data["thresholds"] = {t.metric: {"direction": t.direction, "threshold": t.threshold}
                                  for t in self.marker.thresholds}
        if self.marker.lmcache_mode:
            data["lmcache_mode"] = self.marker.lmcache_mode
        try:
            case = parse_scenario(data, self.node.path).cases[0]
        except ScenarioError as exc:
            problem = f"{caller}: {exc.key}: {exc.problem}"
            if placeholder:  # the outcome is being opened: nothing to record it in yet
                pytest.fail(problem, pytrace=False)
        else:
            case = override_thresholds(case, self.session.settings.thresholds)
            callspec = getattr(self.node, "callspec", None)
            return replace(case, scenario=self.node.originalname, case_id=callspec.id if callspec else "",
                           input_len=case.input_len if p.input_len or not placeholder else 0)
        self.fail(problem)

    def backend(self, name: str) -> BackendConfig:
        return self.session.backend(self.outcome, name, self.marker.lmcache_mode, self.marker.server_args)

    def trials(self, trials: int | Sequence[int] | None, caller: str) -> list[int]:
        from .scenarios import MAX_TRIALS

        if trials is None or isinstance(trials, int):
            n = self.session.settings.trials or (3 if trials is None else trials)
            indices = list(range(n)) if not isinstance(n, bool) and 0 < n <= MAX_TRIALS else []
        else:
            indices = list(trials)
            if len(set(indices)) != len(indices) or not all(isinstance(i, int) and 0 <= i < 10**6 for i in indices):
                indices = []
        if not 0 < len(indices) <= MAX_TRIALS:
            self.fail(f"{caller}: trials={trials!r}: give a number of trials from 1 to {MAX_TRIALS}, or the "
                      "indices of the trials to run (each fixes its prompts)")
        return indices

    def given(self, backend: BackendConfig, prompts: Prompts, workload: dict,
              caller: str) -> tuple[dict, tuple[str | tuple[int, ...], ...]]:
        """The workload of given prompts (their lengths counted by the server's tokenizer), and the prompts."""
        if workload.get("dataset") is not None or workload.get("num_prompts") is not None:
            self.fail(f"{caller}: prompts=...: the prompts are the workload; leave out dataset and num_prompts")
        normalized = _normalized(prompts)
        if normalized is None:
            self.fail(f"{caller}: prompts: give a non-empty list of non-empty strings or of token id lists")
        if workload.get("api") == "chat" and any(not isinstance(p, str) for p in normalized):
            self.fail(f"{caller}: prompts: token ids are sent with the completions API; use api='completions' "
                      "or give text")
        server = self.session.server(self.outcome, backend)
        try:
            lengths = self.session.case_runner.prompt_lengths(server.base_url, server.model, normalized)
        except KVCacheError as exc:
            error = str(exc)
        else:
            return {**workload, "input_len": max(lengths), "num_prompts": len(normalized)}, normalized
        self.fail(f"{caller}: {error}")

    def remember(self, result: CaseResult | PairedResult,
                 measured: Measurement | tuple[Measurement, Measurement]) -> None:
        self._measured[id(result)] = (result, measured)

    def measured(self, result: object, caller: str, paired: bool) -> Any:
        """What measured ``result``: a Measurement, or the reference's and the candidate's."""
        entry = self._measured.get(id(result))
        if entry is None or entry[0] is not result or isinstance(entry[0], PairedResult) != paired:
            what = "a kv_load.paired result" if paired else "a kv_load.run result"
            self.fail(f"{caller}: pass {what} of this test")
        if self.judged:
            self.fail(f"{caller}: a test is judged once; kv_gate was called before")
        return entry[1]

    def thresholds(self, case: ScenarioCase, spec: Thresholds | None, caller: str) -> ScenarioCase:
        """The case with the gate's thresholds; comparisons beyond those planned at
        collection are added to the session's planned count."""
        from .scenarios import override_thresholds

        if spec is not None:
            try:
                case = override_thresholds(replace(case, thresholds=parse_thresholds(spec)),
                                           self.session.settings.thresholds)
            except ValueError as exc:
                self.fail(f"{caller}: {exc}")
        if len(case.thresholds) > self.planned:
            self.session.plan_more(len(case.thresholds) - self.planned)
            self.planned = len(case.thresholds)
        return case

    def verdict(self) -> GateVerdict:
        from .decision import worst_zone

        o = self.outcome
        return GateVerdict(status=o.status, zone=worst_zone([v.zone for v in o.verdicts]),
                           comparisons=tuple(o.comparisons), verdicts=tuple(o.verdicts), message=o.message)

    def close(self, in_body: bool) -> None:
        """The outcome says how the body ended unless the gate did; then its JSON and, in
        the body's phase (its fixtures still up), its JUnit properties and benchmark
        entry. A test that measured nothing and was not skipped leaves no outcome."""
        o = self._outcome
        if o is None or self.closed:
            return
        self.closed = True
        if isinstance(self.ended, KeyboardInterrupt):
            self.session.cut_off(o)
        elif o.status == "measured" and self.ended is not None:
            skipped = isinstance(self.ended, pytest.skip.Exception)
            o.status = "skipped" if skipped else "failed"
            o.message = str(self.ended) if isinstance(self.ended, pytest.fail.Exception) or skipped else \
                f"{type(self.ended).__name__}: {self.ended}".strip()
        if o.result is None and o.status == "measured":
            self.session.outcomes.remove(o)
            return
        self.session.close_item(o)
        if in_body:
            from .plugin import record_item

            record_item(self.request, self.session)


def _normalized(prompts: Any) -> tuple[str | tuple[int, ...], ...] | None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        return None
    out: list[str | tuple[int, ...]] = []
    for p in prompts:
        if isinstance(p, str) and p:
            out.append(p)
        elif (isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and p
              and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p)):
            out.append(tuple(p))
        else:
            return None
    return tuple(out)


class KVLoad:
    """Load on the test's server, measured as scenario items are: the same client, prompts,
    rounds, guards and server checks (a warm round of an offload backend must hit it).

    Workload keywords are a scenario file's, defaulting as there (and to the test's
    params): ``input_len``, ``concurrency``, ``output_len``, ``num_prompts``,
    ``dataset``, ``dataset_options``, ``request_rate``, ``burstiness``, ``rounds``,
    ``measure``, ``trials`` (a number, or trial indices), ``warmup_requests``, ``seed``,
    ``api``, ``slo``; ``prompts`` gives the prompts themselves (text or token ids, the
    same in every trial) instead of a dataset; ``backend`` another backend than the
    test's. ``--trials`` overrides a number of trials.
    """

    def __init__(self, test: _Test) -> None:
        self._test = test

    def run(self, *, backend: str | None = None, trials: int | Sequence[int] | None = None,
            prompts: Prompts | None = None, **workload: Any) -> CaseResult:
        """Trials of cold and warm rounds (or ``rounds``); the typed result, vLLM's field
        names in each round's ``summary``, every request in its ``records``."""
        t = self._test
        name = backend or t.params.backend
        config = t.backend(name)
        indices = t.trials(trials, "kv_load.run")
        case = self._case(config, name, prompts, workload, len(indices), None, "kv_load.run")
        with t.session.step(t.outcome):
            measured = t.session.measure(t.outcome, case, config, indices, t.progress)
        t.remember(measured.result, measured)
        return measured.result

    def paired(self, reference: str, *, backend: str | None = None, trials: int | Sequence[int] | None = None,
               prompts: Prompts | None = None, **workload: Any) -> PairedResult:
        """The test's backend (the candidate) and ``reference`` trial by trial, alternating
        which goes first, as a scenario's ``paired_with``; judge it with :meth:`KVGate.paired`."""
        t = self._test
        name = backend or t.params.backend
        indices = t.trials(trials, "kv_load.paired")
        ref_config, config = t.backend(reference), t.backend(name)
        case = self._case(config, name, prompts, workload, len(indices), reference, "kv_load.paired")
        t.session.require_pairs(t.outcome, case, len(indices),
                                "--trials" if t.session.settings.trials else "trials of kv_load.paired")
        with t.session.step(t.outcome):
            ref, cand = t.session.measure_paired(t.outcome, case, ref_config, config, indices, t.progress)
        result = PairedResult(reference=ref.result, candidate=cand.result)
        t.remember(result, (ref, cand))
        return result

    def send(self, prompts: Prompts, *, backend: str | None = None, output_len: int | None = None,
             concurrency: int | None = None, api: str = "completions", request_rate: float = math.inf,
             burstiness: float = 1.0, seed: int = 0, round_name: str = "custom") -> RoundResult:
        """One round of these prompts, measured as any round (``records``, ``summary``,
        ``telemetry``), with each answer's text in ``texts``: for workloads that build
        the next round from the answers. No hit check, not part of the test's result."""
        t = self._test
        name = backend or t.params.backend
        config = t.backend(name)
        workload = {"output_len": output_len, "concurrency": concurrency, "api": api, "request_rate": request_rate,
                    "burstiness": burstiness, "seed": seed, "rounds": ["cold"]}
        case = self._case(config, name, prompts, workload, 1, None, "kv_load.send")
        server = t.session.server(t.outcome, config)
        with t.session.step(t.outcome):
            try:
                return t.session.case_runner.send(
                    server.base_url, server.model, case.prompts, output_len=case.output_len,
                    concurrency=case.concurrency, api=case.api, request_rate=case.request_rate,
                    burstiness=case.burstiness, seed=case.seed, round_name=round_name, telemetry=server.telemetry,
                    progress=t.progress)
            except KVCacheError as exc:
                error = str(exc)
        t.fail(f"kv_load.send: {error}")

    async def arun(self, **kwargs: Any) -> CaseResult:
        """:meth:`run` from an async test, asyncio's or trio's (in a worker thread: the load
        runs its own event loop, never the test's)."""
        return await _in_thread(self.run, **kwargs)

    async def apaired(self, reference: str, **kwargs: Any) -> PairedResult:
        return await _in_thread(self.paired, reference, **kwargs)

    async def asend(self, prompts: Prompts, **kwargs: Any) -> RoundResult:
        return await _in_thread(self.send, prompts, **kwargs)

    def _case(self, config: BackendConfig, name: str, prompts: Prompts | None, workload: dict, trials: int,
              reference: str | None, caller: str) -> ScenarioCase:
        unknown = sorted(set(workload) - _WORKLOAD_KEYS)
        if unknown:
            self._test.fail(f"{caller}: unknown keyword {unknown[0]!r}; use {', '.join(sorted(_WORKLOAD_KEYS))}, "
                            "trials, prompts or backend")
        workload = {**workload, "trials": trials}
        given: tuple[str | tuple[int, ...], ...] = ()
        if prompts is not None:
            workload, given = self._test.given(config, prompts, workload, caller)
        case = self._test.case(name, workload, reference=reference, caller=caller)
        return replace(case, dataset="prompts", prompts=given) if given else case


async def _in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import functools

    import anyio  # httpx's dependency: runs under asyncio and trio alike

    return await anyio.to_thread.run_sync(functools.partial(call, *args, **kwargs))


_WORKLOAD_KEYS = frozenset({"input_len", "concurrency", "output_len", "num_prompts", "dataset", "dataset_options",
                            "request_rate", "burstiness", "rounds", "measure", "warmup_requests", "seed", "api",
                            "slo", "check_outputs"})


class KVGate:
    """The test's verdict against its stored baseline, with the session's statistics: its
    testbed, run-level noise, confirmation runs, Bonferroni over the session's planned
    comparisons (Holm over all of them for the exit status). It fails the test with a
    scenario item's message, or skips it without a baseline; under
    ``--update-baselines`` / ``--reset-baselines`` it stores the result instead, with
    the same refusals. One call per test."""

    def __init__(self, test: _Test) -> None:
        self._test = test

    def check(self, result: CaseResult, thresholds: Thresholds | None = None) -> GateVerdict:
        """Judge ``result`` (from this test's :meth:`KVLoad.run`) on ``thresholds``: the
        marker's, else the scenario defaults (median TTFT 10%, total throughput 5%, TPOT
        10% with more than one output token)."""
        t = self._test
        measured: Measurement = t.measured(result, "kv_gate.check", paired=False)
        case = t.thresholds(measured.result.case, thresholds, "kv_gate.check")
        missing = [m.metric for m in case.thresholds
                   if not any(m.metric in trial.measured.summary for trial in result.trials)]
        if missing:
            t.fail(f"kv_gate.check: {missing[0]} was not measured; declare it in @pytest.mark.kvcache(thresholds=...) "
                   "so the load computes it, or add its percentile to --percentiles")
        t.judged = True
        with t.session.step(t.outcome):
            t.session.judge(t.outcome, replace(measured, result=replace(measured.result, case=case)), t.progress)
        return t.verdict()

    def paired(self, result: PairedResult, thresholds: Thresholds | None = None) -> GateVerdict:
        """Judge a :meth:`KVLoad.paired` result pair by pair (no baseline: the candidate
        must not be worse than the reference beyond the thresholds)."""
        t = self._test
        reference, candidate = t.measured(result, "kv_gate.paired", paired=True)
        case = t.thresholds(candidate.result.case, thresholds, "kv_gate.paired")
        t.judged = True
        with t.session.step(t.outcome):
            candidate = replace(candidate, result=replace(candidate.result, case=case))
            t.session.judge_paired(t.outcome, reference, candidate)
        return t.verdict()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def kv_params(request: pytest.FixtureRequest) -> KVParams:
    """This test's combination of its ``@pytest.mark.kvcache`` lists."""
    return getattr(request, "param", KVParams())


@pytest.fixture
def _kvcache_test(request: pytest.FixtureRequest, kvcache_session: KVSession, kv_params: KVParams) -> Iterator[_Test]:
    test = _Test(request, kvcache_session, kv_params)
    request.node.stash[_TEST_KEY] = test
    yield test
    test.close(in_body=False)  # a test skipped or failed before its body: the outcome it opened


@pytest.fixture
def kv_backend(_kvcache_test: _Test) -> BackendConfig:
    """The test's offload backend, provisioned for the session's server kind (a scratch
    folder for disk tiers, LMCache's settings, services to start); the test is skipped
    with the reason where the backend cannot run here."""
    return _kvcache_test.backend(_kvcache_test.params.backend)


@pytest.fixture
def kv_server(_kvcache_test: _Test, kv_backend: BackendConfig) -> KVServer:
    """The backend's server (emulator, vLLM or the external endpoint, from the options),
    started once for every test and scenario item of the same configuration."""
    from .session import _server_record

    t = _kvcache_test
    handle = t.session.server(t.outcome, kv_backend)
    return KVServer(kind=handle.kind, backend=kv_backend.name, base_url=handle.base_url, model=handle.model,
                    info=_server_record(handle, kv_backend), telemetry=handle.telemetry, log_path=handle.log_path,
                    _runner=t.session.case_runner)


@pytest.fixture
def kv_load(_kvcache_test: _Test, kv_backend: BackendConfig) -> KVLoad:
    """Streaming load on the test's server, measured as scenario items are (:class:`KVLoad`)."""
    return KVLoad(_kvcache_test)


@pytest.fixture
def kv_gate(_kvcache_test: _Test) -> KVGate:
    """The comparison with the test's stored baseline (:class:`KVGate`)."""
    return KVGate(_kvcache_test)
