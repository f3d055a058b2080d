"""Scenario YAML files -> :class:`~pytest_kvcache.models.Scenario` with expanded cases.

A scenario file holds one mapping::

    name: prefill                 # item names: prefill[cpu-10k-c16]
    phase: prefill                # one of models.PHASES, also a marker
    description: ...
    matrix:                       # every combination becomes one item
      backend: [none, cpu, disk, gds]
      input_len: [100, 1k, 10k, 50k, 100k]
      concurrency: [16]
      output_len: [1]
    dataset: random               # keys of the matrix may also stand here, as scalars
    num_prompts: 50
    rounds: [cold, warm]
    measure: warm                 # the round that is compared with the baseline
    trials: 3
    seed: 0
    api: completions              # or chat
    request_rate: inf             # requests per second (Poisson arrivals), or inf
    burstiness: 1.0               # gamma arrivals as in vLLM: < 1 burstier, > 1 more regular
    paired_with: {backend: none}  # optional: run each item interleaved with this backend
                                  # and compare the two trial by trial (no baseline needed)
    thresholds:
      median_ttft_ms: {direction: lower, threshold: 10%}
      total_token_throughput: {direction: higher, threshold: 5%}
    dataset_options: {hit_ratio: 0.8}   # the dataset's own settings (see workloads):
                                  #   sharegpt: path, min_len, max_total_len, output_len
                                  #   multiturn: num_turns, common_prefix_num_tokens,
                                  #     prefix_num_tokens, num_tokens, output_num_tokens
                                  #   shared_prefix: hit_ratio, num_prefixes
    kv_target_gb: [50, 100]       # choose num_prompts so a round writes this much KV
    model_config: config.json     #   ... of this model (file, folder or mapping)
    warmup_requests: 4            # sent before each round, not recorded
    slo: {ttft: 500, tpot: 50}    # ms; goodput (request_goodput) counts requests meeting all
    lmcache_mode: mp              # auto | inprocess | mp: how LMCache runs beside vLLM; under
                                  #   --kv-lmcache-mode, over kvcache_lmcache_mode (see backends).
                                  #   matrix: {lmcache_mode: [inprocess, mp]} compares the two
                                  #   (one item per mode, the mode in the id)

Every error names the file and the key (:class:`~pytest_kvcache.errors.ScenarioError`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ScenarioError
from .models import (
    BACKENDS,
    LMCACHE_MODES,
    PHASES,
    ROUNDS,
    MetricThreshold,
    Scenario,
    ScenarioCase,
    format_tokens,
)

__all__ = [
    "DATASETS",
    "MATRIX_KEYS",
    "TOKEN_COUNT_FORMS",
    "default_thresholds",
    "is_known_metric",
    "load_scenario",
    "override_thresholds",
    "parse_scenario",
    "parse_threshold_override",
    "parse_token_count",
]

#: Keys that may vary in ``matrix`` (or stand at top level as one value).
MATRIX_KEYS: tuple[str, ...] = ("backend", "input_len", "concurrency", "output_len", "num_prompts", "dataset",
                                 "kv_target_gb", "lmcache_mode")
DATASETS: tuple[str, ...] = ("random", "sharegpt", "multiturn", "shared_prefix")
SLO_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")
APIS: tuple[str, ...] = ("completions", "chat")
TOP_KEYS: frozenset[str] = frozenset(
    {"name", "phase", "description", "matrix", "rounds", "measure", "trials", "seed", "api",
     "request_rate", "burstiness", "thresholds", "paired_with", "dataset_options", "model_config",
     "warmup_requests", "slo", *MATRIX_KEYS}
)
DEFAULTS: dict[str, Any] = {
    "dataset": "random",
    "output_len": 1,
    "num_prompts": 50,
    "concurrency": 16,
    "rounds": ["cold", "warm"],
    "trials": 3,
    "seed": 0,
    "api": "completions",
    "request_rate": math.inf,
}
TOKEN_COUNT_FORMS = "an integer with an optional k or m suffix, e.g. 100, 1k, 10k, 100k, 1m"
_TOKEN_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_METRIC = re.compile(r"^(mean|median|std|p\d{1,2}(?:\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")
_THROUGHPUTS = frozenset({"request_throughput", "output_throughput", "total_token_throughput"})


def parse_token_count(text: str | int) -> int:
    """``"10k"`` -> 10000. Raises ValueError with the accepted forms."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a token count; use {TOKEN_COUNT_FORMS}")
    if isinstance(text, int):
        value = text
    else:
        m = _TOKEN_COUNT.match(str(text))
        if not m:
            raise ValueError(f"{text!r} is not a token count; use {TOKEN_COUNT_FORMS}")
        number = float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
        if number != int(number):
            raise ValueError(f"{text!r} is not a whole number of tokens; use {TOKEN_COUNT_FORMS}")
        value = int(number)
    if value <= 0:
        raise ValueError(f"{text!r} must be positive; use {TOKEN_COUNT_FORMS}")
    return value


def is_known_metric(name: str) -> bool:
    return bool(_METRIC.match(name)) or name in _THROUGHPUTS


def default_thresholds(output_len: int) -> tuple[MetricThreshold, ...]:
    """TTFT +10% and throughput -5%; TPOT +10% once there is more than one token."""
    thresholds = [
        MetricThreshold("median_ttft_ms", "lower", 0.10),
        MetricThreshold("total_token_throughput", "higher", 0.05),
    ]
    if output_len > 1:
        thresholds.append(MetricThreshold("median_tpot_ms", "lower", 0.10))
    return tuple(thresholds)


def load_scenario(path: Path) -> Scenario:
    """Read and validate one scenario file."""
    import yaml  # only when scenarios are collected

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(path, "<file>", f"cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(path, "<yaml>", f"not valid YAML{where}: {problem}") from None
    return parse_scenario(data, path)


def parse_scenario(data: Any, path: Path | str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(path, "<top>", "a scenario file must hold a mapping with at least 'name' and 'matrix'")
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        raise ScenarioError(path, unknown[0], f"unknown key; allowed keys: {', '.join(sorted(TOP_KEYS))}")

    name = _require(data, "name", path)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScenarioError(path, "name", f"{name!r} must be an identifier (letters, digits, _), e.g. prefill")
    if "phase" not in data and name not in PHASES:
        raise ScenarioError(path, "phase", f"is required (one of: {', '.join(PHASES)})")
    phase = data.get("phase", name)
    if phase not in PHASES:
        raise ScenarioError(path, "phase", f"{phase!r} is not a known phase; use one of: {', '.join(PHASES)}")
    description = str(data.get("description", "")).strip()

    matrix = _require(data, "matrix", path)
    if not isinstance(matrix, dict) or not matrix:
        raise ScenarioError(path, "matrix", "must be a mapping of dimension -> list of values, e.g. {backend: [none, cpu]}")
    for key in matrix:
        if key not in MATRIX_KEYS:
            raise ScenarioError(path, f"matrix.{key}", f"unknown dimension; allowed: {', '.join(MATRIX_KEYS)}")
        if key in data:
            raise ScenarioError(path, key, "given both at top level and in matrix; keep one")

    dims: dict[str, list[Any]] = {}
    for key in MATRIX_KEYS:
        where = f"matrix.{key}" if key in matrix else key
        raw = matrix[key] if key in matrix else data.get(key, DEFAULTS.get(key))
        if key == "kv_target_gb" and raw is None:
            dims[key] = [0.0]
            continue
        if key == "lmcache_mode" and raw is None:
            dims[key] = [None]  # the runner's default decides
            continue
        if raw is None:
            raise ScenarioError(path, key, "is required (in matrix or at top level)")
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise ScenarioError(path, where, "must not be an empty list")
        dims[key] = [_check_dim(key, v, where, path) for v in values]
        if len(set(dims[key])) != len(dims[key]):
            raise ScenarioError(path, where, f"repeats a value: {raw!r}")

    rounds = data.get("rounds", DEFAULTS["rounds"])
    if not isinstance(rounds, list) or not rounds or any(r not in ROUNDS for r in rounds):
        raise ScenarioError(path, "rounds", f"{rounds!r} must be a non-empty list of {', '.join(ROUNDS)}")
    measure = data.get("measure", rounds[-1])
    if measure not in rounds:
        raise ScenarioError(path, "measure", f"{measure!r} must be one of the rounds {rounds}")
    trials = _positive_int(data.get("trials", DEFAULTS["trials"]), "trials", path)
    seed = data.get("seed", DEFAULTS["seed"])
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ScenarioError(path, "seed", f"{seed!r} must be a non-negative integer")
    api = data.get("api", DEFAULTS["api"])
    if api not in APIS:
        raise ScenarioError(path, "api", f"{api!r} must be one of {', '.join(APIS)}")
    request_rate = _rate(data.get("request_rate", DEFAULTS["request_rate"]), path)
    burstiness = data.get("burstiness", 1.0)
    if isinstance(burstiness, bool) or not isinstance(burstiness, (int, float)) or not 0 < burstiness < math.inf:
        raise ScenarioError(path, "burstiness", f"{burstiness!r} must be a positive number (1 = Poisson arrivals)")
    explicit = _thresholds(data.get("thresholds"), path)
    reference = _paired_with(data.get("paired_with"), path)
    options_json = _dataset_options(data.get("dataset_options"), dims["dataset"], path)
    warmup = data.get("warmup_requests", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ScenarioError(path, "warmup_requests", f"{warmup!r} must be a non-negative integer")
    slos = _slos(data.get("slo"), path)
    kv_per_token = _kv_per_token(data, dims, matrix, path)

    varying = [k for k in MATRIX_KEYS if len(dims[k]) > 1]
    cases = []
    for combo in itertools.product(*(dims[k] for k in MATRIX_KEYS)):
        values = dict(zip(MATRIX_KEYS, combo))
        if reference is not None and values["backend"] == reference:
            continue  # a backend paired with itself compares nothing
        if values["kv_target_gb"]:
            from .kvsize import prompts_for_kv_target

            values["num_prompts"] = prompts_for_kv_target(values["kv_target_gb"], kv_per_token, values["input_len"],
                                                          values["output_len"])
        cases.append(
            ScenarioCase(
                scenario=name,
                path=str(path),
                phase=phase,
                case_id=_case_id(values, varying, reference),
                backend=values["backend"],
                input_len=values["input_len"],
                concurrency=values["concurrency"],
                output_len=values["output_len"],
                num_prompts=values["num_prompts"],
                dataset=values["dataset"],
                rounds=tuple(rounds),
                measure_round=measure,
                trials=trials,
                seed=seed,
                api=api,
                request_rate=request_rate,
                burstiness=float(burstiness),
                thresholds=explicit if explicit is not None else default_thresholds(values["output_len"]),
                reference_backend=reference,
                dataset_options=options_json,
                warmup_requests=warmup,
                slos=slos,
                kv_target_gb=float(values["kv_target_gb"]),
                lmcache_mode=values["lmcache_mode"],
                compares_lmcache_modes="lmcache_mode" in varying,
            )
        )
    if not cases:
        raise ScenarioError(path, "paired_with", "leaves no item: every backend of the matrix is the reference")
    return Scenario(name=name, path=str(path), phase=phase, description=description, cases=tuple(cases))


def _dataset_options(raw: Any, datasets: list[str], path: Path | str) -> str:
    """Validated options as canonical JSON ("" when none)."""
    import json

    from .workloads import OptionProblem, check_dataset_options

    if raw is None:
        return ""
    if not isinstance(raw, dict):
        raise ScenarioError(path, "dataset_options", f"{raw!r} must be a mapping of option -> value")
    if len(datasets) > 1:
        raise ScenarioError(path, "dataset_options", "cannot apply to several datasets; "
                            "use one scenario file per dataset")
    options = dict(raw)
    if isinstance(options.get("path"), str) and not Path(options["path"]).is_absolute():
        beside = Path(str(path)).parent / options["path"]
        if beside.exists():
            options["path"] = str(beside)
    try:
        options = check_dataset_options(datasets[0], options)
    except OptionProblem as exc:
        raise ScenarioError(path, f"dataset_options.{exc.key}", exc.problem) from None
    return json.dumps(options, sort_keys=True) if options else ""


def _slos(raw: Any, path: Path | str) -> tuple[tuple[str, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ScenarioError(path, "slo", "must map ttft, tpot or e2el to milliseconds, e.g. {ttft: 500, tpot: 50}")
    out = []
    for metric, value in raw.items():
        if metric not in SLO_METRICS:
            raise ScenarioError(path, f"slo.{metric}", f"unknown; use {', '.join(SLO_METRICS)} (milliseconds)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ScenarioError(path, f"slo.{metric}", f"{value!r} must be a positive number of milliseconds")
        out.append((metric, float(value)))
    return tuple(out)


def _kv_per_token(data: dict, dims: dict, matrix: dict, path: Path | str) -> int:
    """KV bytes per token of ``model_config`` when a KV-size target is set, else 0."""
    from .kvsize import kv_bytes_per_token

    targeted = any(dims["kv_target_gb"])
    raw = data.get("model_config")
    if not targeted:
        if raw is not None:
            raise ScenarioError(path, "model_config", "is only used with kv_target_gb; set both or neither")
        return 0
    if "num_prompts" in data or "num_prompts" in matrix:
        raise ScenarioError(path, "kv_target_gb", "chooses num_prompts itself; remove num_prompts")
    if raw is None:
        raise ScenarioError(path, "model_config", "is required with kv_target_gb: the model's config.json "
                            "(a path, relative to this file or absolute) or its mapping")
    if isinstance(raw, str) and not Path(raw).is_absolute() and (Path(str(path)).parent / raw).exists():
        raw = str(Path(str(path)).parent / raw)
    if not isinstance(raw, (str, dict)):
        raise ScenarioError(path, "model_config", f"{raw!r} must be a path to config.json or a mapping")
    try:
        return kv_bytes_per_token(raw)
    except (ValueError, TypeError) as exc:
        raise ScenarioError(path, "model_config", str(exc)) from None


def _require(data: dict, key: str, path: Path | str) -> Any:
    if key not in data:
        raise ScenarioError(path, key, "is required")
    return data[key]


def _check_dim(key: str, value: Any, where: str, path: Path | str) -> Any:
    if key == "backend":
        if value not in BACKENDS:
            raise ScenarioError(path, where, f"unknown backend {value!r}; use one of: {', '.join(BACKENDS)}")
        return value
    if key == "dataset":
        if value not in DATASETS:
            raise ScenarioError(path, where, f"unknown dataset {value!r}; use one of: {', '.join(DATASETS)}")
        return value
    if key == "lmcache_mode":
        if value not in LMCACHE_MODES:
            raise ScenarioError(path, where, f"unknown LMCache mode {value!r}; use one of: {', '.join(LMCACHE_MODES)}")
        return value
    if key == "kv_target_gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ScenarioError(path, where, f"{value!r} must be a positive number of GB (10^9 bytes), e.g. 50")
        return float(value)
    if key == "input_len":
        try:
            return parse_token_count(value)
        except ValueError as exc:
            raise ScenarioError(path, where, str(exc)) from None
    return _positive_int(value, where, path)


def _positive_int(value: Any, where: str, path: Path | str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ScenarioError(path, where, f"{value!r} must be a positive integer")
    return value


def _rate(value: Any, path: Path | str) -> float:
    if value in ("inf", math.inf):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ScenarioError(path, "request_rate", f"{value!r} must be a positive number of requests per second or 'inf'")
    return float(value)


def _thresholds(raw: Any, path: Path | str) -> tuple[MetricThreshold, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ScenarioError(path, "thresholds", "must map metric names to {direction: lower|higher, threshold: 10%}")
    out = []
    for metric, spec in raw.items():
        where = f"thresholds.{metric}"
        if not is_known_metric(str(metric)):
            raise ScenarioError(
                path, where, "unknown metric; use vLLM's names such as median_ttft_ms, p99_ttft_ms, "
                "mean_tpot_ms, median_itl_ms, total_token_throughput, output_throughput"
            )
        if not isinstance(spec, dict) or set(spec) - {"direction", "threshold"}:
            raise ScenarioError(path, where, "must be {direction: lower|higher, threshold: 10%}")
        direction = spec.get("direction", "higher" if "throughput" in str(metric) else "lower")
        if direction not in ("lower", "higher"):
            raise ScenarioError(path, f"{where}.direction", f"{direction!r} must be 'lower' or 'higher' (which is better)")
        out.append(MetricThreshold(str(metric), direction, _fraction(spec.get("threshold"), f"{where}.threshold", path)))
    return tuple(out)


def parse_threshold_override(text: str) -> tuple[str, float]:
    """``"median_ttft_ms=15%"`` -> ("median_ttft_ms", 0.15)."""
    metric, sep, value = text.partition("=")
    metric = metric.strip()
    if not sep or not is_known_metric(metric):
        raise ValueError(f"{text!r}: use METRIC=PCT with a vLLM metric name, e.g. median_ttft_ms=15% or "
                         "total_token_throughput=5%")
    value = value.strip()
    try:
        return metric, _fraction(value if value.endswith("%") else float(value), "threshold", "<command line>")
    except (ValueError, ScenarioError):
        raise ValueError(f"{text!r}: the threshold must be a percentage above 0, e.g. 15%") from None


def override_thresholds(case: ScenarioCase, overrides: Iterable[tuple[str, float]]) -> ScenarioCase:
    """The case with these metrics' thresholds replaced (or added, lower-is-better
    unless the metric is a throughput)."""
    thresholds = {t.metric: t for t in case.thresholds}
    changed = False
    for metric, value in overrides:
        direction = thresholds[metric].direction if metric in thresholds else (
            "higher" if metric in _THROUGHPUTS else "lower")
        thresholds[metric] = MetricThreshold(metric, direction, value)
        changed = True
    return replace(case, thresholds=tuple(thresholds.values())) if changed else case


def _fraction(value: Any, where: str, path: Path | str) -> float:
    """``10%`` or ``0.10`` -> 0.10."""
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            number = float(value.strip()[:-1]) / 100
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            raise ValueError
    except ValueError:
        raise ScenarioError(path, where, f"{value!r} must be a percentage such as 10% (or a fraction such as 0.10)") from None
    if not 0 < number < 10:
        raise ScenarioError(path, where, f"{value!r} must be above 0%")
    return number


def _paired_with(raw: Any, path: Path | str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"backend"}:
        raise ScenarioError(path, "paired_with", "must be {backend: NAME}, the configuration to compare against")
    if raw["backend"] not in BACKENDS:
        raise ScenarioError(path, "paired_with.backend",
                            f"unknown backend {raw['backend']!r}; use one of: {', '.join(BACKENDS)}")
    return raw["backend"]


def _case_id(values: dict[str, Any], varying: Iterable[str], reference: str | None = None) -> str:
    """Readable id: backend, human input length, then the other dimensions that vary."""
    backend = values["backend"] if reference is None else f"{values['backend']}-vs-{reference}"
    parts = [backend, format_tokens(values["input_len"]), f"c{values['concurrency']}"]
    varying = set(varying)
    if "output_len" in varying:
        parts.append(f"o{values['output_len']}")
    if "num_prompts" in varying:
        parts.append(f"n{values['num_prompts']}")
    if "dataset" in varying:
        parts.append(values["dataset"])
    if "kv_target_gb" in varying:
        parts.append(f"{values['kv_target_gb']:g}gb")
    if "lmcache_mode" in varying:
        parts.append(values["lmcache_mode"])
    return "-".join(parts)
