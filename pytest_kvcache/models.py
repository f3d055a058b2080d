"""Frozen dataclasses passed between the plugin's modules.

The core modules (scenarios, workloads, loadgen, metrics, stats, baselines) exchange
these and nothing else, so each can be used and tested without pytest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the session's types, named only in annotations: those modules import this one
    from .backends import BackendConfig
    from .decision import Verdict
    from .identity import Identity, KeyMoves
    from .outputs import OutputCheck
    from .stats import MetricComparison

__all__ = [
    "BACKENDS",
    "LMCACHE_MODES",
    "PHASES",
    "ROUNDS",
    "DEFAULT_CLIENT_FLOOR",
    "SERVER_KINDS",
    "CaseResult",
    "HistoryReport",
    "ItemOutcome",
    "Measurement",
    "MetricThreshold",
    "RequestRecord",
    "RoundResult",
    "Scenario",
    "ScenarioCase",
    "ServerSettings",
    "Settings",
    "TrialResult",
    "format_tokens",
]

#: The client guard's default floor: delivered concurrency and arrival rate below this share
#: of the configured ones make a round invalid (--kv-client-floor; docs/measuring.md).
DEFAULT_CLIENT_FLOOR = 0.95

#: Offload backends a scenario may name; each is also a pytest marker.
BACKENDS: tuple[str, ...] = (
    "none",
    "cpu",
    "disk",
    "gds",
    "redis",
    "lmcache_server",
    "mooncake",
    "native",
    "waterfall",
)

#: How LMCache runs beside vLLM: in vLLM's process (``LMCacheConnectorV1``), as its
#: multi-process server (``LMCacheMPConnector`` + ``lmcache server``), or probed (auto).
LMCACHE_MODES: tuple[str, ...] = ("auto", "inprocess", "mp")

#: Phases (kinds of benchmark) a scenario may declare; each is also a pytest marker.
PHASES: tuple[str, ...] = (
    "prefill",
    "sharegpt",
    "multiturn",
    "cache_miss",
    "shared_prefix",
    "chunk_size",
    "kv_size",
    "decode",
    "storage",  # KV tiers measured as storage, no inference server (storage/)
)

#: Round names: ``cold`` fills the offload tier, ``warm`` should hit it.
ROUNDS: tuple[str, ...] = ("cold", "warm")


def format_tokens(n: int) -> str:
    """Short human form of a token count as used in ids: 100, 1k, 10k, 1m, 1500."""
    for size, suffix in ((1_000_000, "m"), (1_000, "k")):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


@dataclass(frozen=True)
class MetricThreshold:
    """How much worse a metric may get before a significant change fails the test.

    ``threshold`` is relative: 0.10 means 10% worse, in the metric's bad direction.
    """

    metric: str
    direction: str  # "lower" (latencies) or "higher" (throughputs)
    threshold: float


@dataclass(frozen=True)
class Scenario:
    """One scenario file (or one document in it) before matrix expansion."""

    name: str
    path: str
    phase: str
    description: str
    cases: tuple[ScenarioCase, ...]


@dataclass(frozen=True)
class ScenarioCase:
    """One point of a scenario's matrix, or one load of a benchmark written in Python
    (fixtures.py): what the runner sends and what the gate compares."""

    scenario: str
    path: str
    phase: str
    case_id: str
    backend: str
    input_len: int
    concurrency: int
    output_len: int
    num_prompts: int
    dataset: str
    rounds: tuple[str, ...]
    measure_round: str
    trials: int
    seed: int
    api: str  # "completions" or "chat"
    request_rate: float  # requests per second; math.inf sends as fast as slots allow
    thresholds: tuple[MetricThreshold, ...]
    burstiness: float = 1.0  # gamma shape of the arrivals (1 = Poisson)
    #: Paired design: the backend run interleaved with this one, trial by trial, and
    #: compared with it directly instead of with a stored baseline.
    reference_backend: str | None = None
    #: The dataset's options as canonical JSON ("" when none), see workloads.
    dataset_options: str = ""
    #: Requests sent before each round and not recorded (warm-up).
    warmup_requests: int = 0
    #: Service-level objectives for goodput, (metric, ms) with metric ttft, tpot or e2el.
    slos: tuple[tuple[str, float], ...] = ()
    #: KV-size target in GB (10^9 bytes) that chose num_prompts; 0 when none.
    kv_target_gb: float = 0.0
    #: The LMCache mode the scenario asks for (one of LMCACHE_MODES); None: the runner's
    #: default decides. Not a workload parameter: the backend's configuration carries it.
    lmcache_mode: str | None = None
    #: The mode is an axis of the scenario's matrix: the item exists to measure that mode.
    compares_lmcache_modes: bool = False
    #: Prompts given as they are (text, or token ids sent as ids), sent in every trial
    #: instead of a dataset's (``dataset`` is then "prompts"); a Python benchmark's.
    prompts: tuple[str | tuple[int, ...], ...] = ()
    #: Compare each warm round's answers with the cold round's (outputs.py); None: where
    #: answers are longer than one token. Not a workload parameter (not in the testbed).
    check_outputs: bool | None = None

    @property
    def options(self) -> dict:
        """``dataset_options`` as a dict."""
        import json

        return json.loads(self.dataset_options) if self.dataset_options else {}

    @property
    def name(self) -> str:
        """The pytest item name, e.g. ``prefill[cpu-10k-c16]`` (a Python benchmark's
        without parameters: its function name)."""
        return f"{self.scenario}[{self.case_id}]" if self.case_id else self.scenario

    @property
    def workload_params(self) -> dict[str, object]:
        """What determines the prompts and the load (hashed into the testbed)."""
        return {
            "dataset": self.dataset,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "num_prompts": self.num_prompts,
            "concurrency": self.concurrency,
            "request_rate": "inf" if math.isinf(self.request_rate) else self.request_rate,
            "burstiness": self.burstiness,
            "rounds": list(self.rounds),
            "measure_round": self.measure_round,
            "seed": self.seed,
            "api": self.api,
            "reference_backend": self.reference_backend,
            # only when set, so the testbeds of older scenarios do not change
            **({"dataset_options": self.options} if self.dataset_options else {}),
            **({"warmup_requests": self.warmup_requests} if self.warmup_requests else {}),
            **({"kv_target_gb": self.kv_target_gb} if self.kv_target_gb else {}),
            **({"prompts_sha256": _digest(self.prompts)} if self.prompts else {}),
        }


def _digest(prompts: Sequence[str | tuple[int, ...]]) -> str:
    """What identifies given prompts in the testbed without holding them."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([p if isinstance(p, str) else list(p) for p in prompts]).encode()).hexdigest()


@dataclass(frozen=True)
class RequestRecord:
    """Everything observed about one request, with raw per-chunk timestamps.

    Times are ``time.perf_counter()`` seconds. ``start`` is taken after the request
    got its concurrency slot; ``queue_wait`` is the time it waited for that slot.
    ``chunk_times``/``chunk_tokens`` hold one entry per streamed chunk with
    non-empty text, so every latency definition can be derived afterwards.
    """

    index: int
    prompt_len: int
    output_len_requested: int
    scheduled: float
    start: float
    end: float
    chunk_times: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    prompt_tokens_reported: int | None = None
    output_tokens_reported: int | None = None
    error: str | None = None
    #: the generated text, every chunk's in order (what a conversation sends back next turn)
    text: str = ""
    #: characters of the first streamed chunk's text: the first generated token's (outputs.py)
    first_chars: int = 0

    @property
    def queue_wait(self) -> float:
        return self.start - self.scheduled

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        if self.output_tokens_reported is not None:
            return self.output_tokens_reported
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> tuple[float, ...]:
        times = self.chunk_times
        return tuple(b - a for a, b in zip(times, times[1:]))

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1), vLLM's definition; None for 1 token."""
        n = self.output_tokens
        if n <= 1:
            return None
        return (self.e2el - self.ttft) / (n - 1)


@dataclass(frozen=True)
class RoundResult:
    """One round (cold or warm) of one trial: its records and the client's guard."""

    round: str
    records: tuple[RequestRecord, ...]
    duration: float
    summary: Mapping[str, float | int | None]
    max_loop_lag_ms: float
    invalid_reason: str | None = None
    telemetry: Mapping[str, float] = field(default_factory=dict)
    #: how reads were stamped: "kernel" (the kernel's receive time, SO_TIMESTAMPNS) or
    #: "user" (perf_counter when the client process handled the read)
    client_stamps: str = "user"

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if not r.success)

    @property
    def texts(self) -> tuple[str, ...]:
        """The generated text of each request, in the order of its prompts."""
        return tuple(r.text for r in sorted(self.records, key=lambda r: r.index))

    @staticmethod
    def stamps_of(parts: Sequence[RoundResult]) -> str:
        """``client_stamps`` of a round made of ``parts`` (turns, client processes):
        "kernel" only when every part's reads were."""
        return "kernel" if all(p.client_stamps == "kernel" for p in parts) else "user"

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.invalid_reason is None


@dataclass(frozen=True)
class TrialResult:
    """One trial: its rounds in order; the measured round feeds the comparison."""

    index: int
    rounds: tuple[RoundResult, ...]
    measure_round: str
    #: the cold round's prompts recomputed with a fresh cache_salt after the measured rounds
    #: (outputs.py): not measured, not part of ``usable``
    control: RoundResult | None = None

    @property
    def measured(self) -> RoundResult:
        for r in self.rounds:
            if r.round == self.measure_round:
                return r
        raise LookupError(self.measure_round)

    @property
    def usable(self) -> bool:
        """Complete and valid in every round: only such trials are compared."""
        return all(r.complete for r in self.rounds)

    @property
    def problem(self) -> str | None:
        for r in self.rounds:
            if r.invalid_reason:
                return f"{r.round} round invalid: {r.invalid_reason}"
            if r.failed:
                return f"{r.round} round incomplete: {r.failed} of {len(r.records)} requests failed"
        return None


@dataclass(frozen=True)
class CaseResult:
    """All trials of one scenario item."""

    case: ScenarioCase
    trials: tuple[TrialResult, ...]
    server: Mapping[str, str]

    @property
    def usable_trials(self) -> tuple[TrialResult, ...]:
        return tuple(t for t in self.trials if t.usable)

    def metric_values(self, metric: str) -> list[float]:
        """The metric's per-trial values over the usable trials (None dropped)."""
        values = []
        for t in self.usable_trials:
            v = t.measured.summary.get(metric)
            if v is not None:
                values.append(float(v))
        return values


# -- a session's boundary types: the plugin and fixtures make them, the reports read them


#: ``--kv-server`` choices.
SERVER_KINDS: tuple[str, ...] = ("emulator", "vllm", "external")


@dataclass(frozen=True)
class ServerSettings:
    """What the options say about servers (one per session)."""

    kind: str = "emulator"
    endpoint: str | None = None
    model: str | None = None
    emulator_profile: str = "quick"
    emulator_slowdown: float = 1.0
    ready_timeout: float = 60.0
    extra_args: tuple[str, ...] = ()
    #: the interpreter that runs vLLM and LMCache (None: this one)
    python: str | None = None
    #: labels the fixture cannot set (bandwidth, arcc, direction, storage mount), recorded on every result
    labels: tuple[tuple[str, str], ...] = ()
    #: LMCache mode (backends.choose_lmcache_mode): ``lmcache_mode_override`` (--kv-lmcache-mode)
    #: beats a scenario's lmcache_mode, which beats ``lmcache_mode`` (ini); None: not given
    lmcache_mode: str | None = None
    lmcache_mode_override: str | None = None
    #: backend settings (see backends.BackendOptions)
    redis_url: str | None = None
    gds_path: str | None = None
    lmcache_overrides: tuple[tuple[str, str], ...] = ()
    #: vllm serve's engine settings (None: vLLM's default)
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None


@dataclass(frozen=True)
class Settings:
    """What the options and ini keys say (options.read_settings), for every module of a session."""

    server: ServerSettings
    tokenizer: str | None
    results_dir: Path
    baseline_dir: Path
    update_baselines: bool
    reset_baselines: bool
    strict_baselines: bool
    alpha: float
    trials: int | None
    #: keys moved between testbed and software (kvcache_testbed_keys / kvcache_software_keys)
    key_moves: KeyMoves
    #: the client guard's floor for delivered vs configured load (--kv-client-floor; loadgen.py)
    client_floor: float
    thresholds: tuple[tuple[str, float], ...] = ()  # --threshold overrides: (metric, fraction)
    verbose: int = 0
    #: a warm round of an offload backend must load at least this fraction of the whole
    #: chunks of its prompts from the tier (telemetry.check_hits); 0 turns the check off
    min_hit_ratio: float = 0.5
    #: percentiles reported for every latency (--percentiles)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    #: client processes each round is sent from (--kv-client-processes; spread.py)
    client_processes: int = 1
    #: the software under test the user names (--kv-version KEY=VALUE)
    versions: tuple[tuple[str, str], ...] = ()
    #: run-to-run noise (a fraction) assumed where no baseline can estimate it (--kv-run-noise)
    run_noise: float | None = None
    #: runs that confirm a suspicious first run before it is judged (--kv-confirm-runs)
    confirm_runs: int = 1
    #: where every run is recorded (--kv-history; None: off)
    history_url: str | None = None
    #: change points of the session's items are looked for among this many last runs
    history_window: int = 20
    #: seconds one benchmark request may take before it counts as failed (--kv-request-timeout)
    request_timeout: float = 600.0
    #: --kv-check-outputs / --no-kv-check-outputs (None: each scenario's check_outputs)
    check_outputs: bool | None = None


@dataclass(frozen=True)
class Measurement:
    """One measured load of an item: its trials, the offload backend they ran on, and the
    identity (testbed and software) that says which baselines they may be compared with."""

    result: CaseResult
    backend: BackendConfig | None  # None: an item that runs no server (the storage phase)
    identity: Identity


@dataclass
class ItemOutcome:
    """What one item measured and decided; the summary table is made from these."""

    nodeid: str
    case: ScenarioCase
    baseline_key: str = ""
    result: CaseResult | None = None
    #: runs that confirmed a suspicious first run (fresh servers), in order
    confirmations: list[CaseResult] = field(default_factory=list)
    comparisons: list[MetricComparison] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    status: str = "measured"  # measured | compared | baseline-updated | skipped | failed | interrupted
    message: str = ""
    json_path: Path | None = None
    reference: CaseResult | None = None  # paired design: the reference configuration's trials
    identity: Identity | None = None
    testbed_differs: bool = False
    baseline_updated: bool = False
    software_change: str = ""
    #: the check of the answers (outputs.py) of the latest run measured, None before one
    output_check: OutputCheck | None = None
    #: the answers of every round of that run, with the salt of its control round
    answers: tuple[TrialResult, ...] = ()


@dataclass(frozen=True)
class HistoryReport:
    """What the history store said at the session's end, for the reports."""

    location: str  # the store (a path, or a URL without its password)
    series: tuple[tuple[str, str, int, float], ...]  # (item, metric, runs, latest value) of the session's items
    change_points: tuple = ()  # history.HistoryChange of the last runs
    plots: tuple[str, ...] = ()  # plots of the series with change points, relative to the run folder
