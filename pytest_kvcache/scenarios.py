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
    check_outputs: true           # warm answers must equal the cold round's recomputation
                                  #   (default: where output_len > 1; see outputs.py)
    lmcache_mode: mp              # auto | inprocess | mp: how LMCache runs beside vLLM; under
                                  #   --kv-lmcache-mode, over kvcache_lmcache_mode (see backends).
                                  #   matrix: {lmcache_mode: [inprocess, mp]} compares the two
                                  #   (one item per mode, the mode in the id)

Every error names the file and the key (:class:`~pytest_kvcache.errors.ScenarioError`).

Limits (checked here, before anything is built or sent; each message names the limit):
the file is at most :data:`MAX_FILE_BYTES` of UTF-8 YAML of at most :data:`MAX_YAML_NODES`
nodes with every alias expanded and :data:`MAX_YAML_DEPTH` levels; a matrix makes at most
:data:`MAX_ITEMS` items; token counts are at most :data:`MAX_TOKENS`, and one round of an
item at most :data:`MAX_ROUND_TOKENS` (its requests' prompt + output tokens, counted at
the datasets' maxima); :data:`MAX_PROMPTS` prompts, :data:`MAX_WARMUP` warm-up requests,
:data:`MAX_TRIALS` trials, :data:`MAX_CONCURRENCY` concurrency, :data:`MAX_TURNS` turns;
a request rate low enough to stretch a round past :data:`MAX_ROUND_SECONDS` is refused.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, replace
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
from .workloads._options import MAX_PROMPTS, MAX_TOKENS, MAX_TURNS
from .workloads._options import show as _show

__all__ = [
    "DATASETS",
    "MATRIX_KEYS",
    "MAX_CONCURRENCY",
    "MAX_FILE_BYTES",
    "MAX_ITEMS",
    "MAX_PROMPTS",
    "MAX_ROUND_SECONDS",
    "MAX_ROUND_TOKENS",
    "MAX_TOKENS",
    "MAX_TRIALS",
    "MAX_TURNS",
    "MAX_WARMUP",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "TOKEN_COUNT_FORMS",
    "default_thresholds",
    "is_known_metric",
    "load_scenario",
    "override_thresholds",
    "parse_scenario",
    "parse_threshold_override",
    "parse_token_count",
    "read_scenario_data",
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
     "warmup_requests", "slo", "check_outputs", *MATRIX_KEYS}
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

# -- limits: a hostile or mistyped file fails here in milliseconds, never at run time
#: bytes of one scenario file (the largest shipped one is about 1.2 KB)
MAX_FILE_BYTES = 256 * 1024
#: nodes of the YAML document with every alias expanded (an alias bomb expands exponentially)
MAX_YAML_NODES = 100_000
#: nesting levels of the YAML document (a scenario needs 4)
MAX_YAML_DEPTH = 32
#: items one file's matrix makes
MAX_ITEMS = 1000
#: prompt + output tokens of one round of an item, all its requests together: 100m
#: (MAX_TOKENS, MAX_PROMPTS and MAX_TURNS live with the datasets that check them too)
MAX_ROUND_TOKENS = 100_000_000
MAX_WARMUP = 10_000
MAX_TRIALS = 100
#: concurrent requests of an item (one connection each)
MAX_CONCURRENCY = 4096
#: a request rate must send a round's requests within this (seconds, at the mean rate)
MAX_ROUND_SECONDS = 3600
#: burstiness (gamma shape): below 0.01 one gap can hold a round for 100 times its mean length
BURSTINESS_RANGE = (0.01, 100.0)
#: a KV-size target (GB); MAX_PROMPTS bounds what it may ask for in practice
MAX_KV_TARGET_GB = 1_000_000
#: characters of a scenario name (it names baseline and result files)
MAX_NAME_CHARS = 64
_MAX_SEED = 2**63 - 1


def parse_token_count(text: str | int) -> int:
    """``"10k"`` -> 10000. Raises ValueError with the accepted forms."""
    if isinstance(text, bool):
        raise ValueError(f"{_show(text)} is not a token count; use {TOKEN_COUNT_FORMS}")
    if isinstance(text, int):
        value = text
    else:
        m = _TOKEN_COUNT.match(str(text))
        if not m:
            raise ValueError(f"{_show(text)} is not a token count; use {TOKEN_COUNT_FORMS}")
        number = float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
        if number > MAX_TOKENS:  # before int(): a long digit string is inf here
            raise ValueError(f"{_show(text)} is more than {format_tokens(MAX_TOKENS)} tokens, the limit of a prompt "
                             "or an answer")
        if number != int(number):
            raise ValueError(f"{_show(text)} is not a whole number of tokens; use {TOKEN_COUNT_FORMS}")
        value = int(number)
    if value <= 0:
        raise ValueError(f"{_show(text)} must be positive; use {TOKEN_COUNT_FORMS}")
    if value > MAX_TOKENS:
        raise ValueError(f"{_show(text)} is more than {format_tokens(MAX_TOKENS)} tokens, the limit of a prompt or "
                         "an answer")
    return value


def is_known_metric(name: str) -> bool:
    return bool(_METRIC.fullmatch(name)) or name in _THROUGHPUTS


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
    return parse_scenario(read_scenario_data(path), path)


def read_scenario_data(path: Path | str) -> Any:
    """A scenario file's YAML, read within the limits of a scenario file (size, UTF-8,
    depth, expanded size); any problem is a ScenarioError naming the file."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ScenarioError(path, "<file>", f"cannot be read: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError(path, "<file>", f"is larger than {MAX_FILE_BYTES // 1024} KiB, the limit of a scenario "
                            "file; split it into several files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(path, "<file>", f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                            "save it as UTF-8 YAML") from None
    return _load_yaml(text, path)


def _load_yaml(text: str, path: Path | str) -> Any:
    """``yaml.safe_load`` within the limits: depth while composing, expanded size before
    constructing (an alias bomb is a small graph that only grows when expanded)."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise yaml.composer.ComposerError(
                        None, None, f"nested deeper than {MAX_YAML_DEPTH} levels, the limit of a scenario file",
                        self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = None
    try:
        loader = Loader(text)  # reads the text at once: a NUL or other control character fails here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        raise ScenarioError(path, "<yaml>", f"not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError) as exc:  # a scalar its type cannot hold: 2024-13-45, a 5000-digit int
        raise ScenarioError(path, "<yaml>", f"a value cannot be read: {' '.join(str(exc).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expanded(root: Any, path: Path | str) -> None:
    """Refuse a document over MAX_YAML_NODES nodes or MAX_YAML_DEPTH levels once its
    aliases are expanded, or with a recursive alias; counted on the node graph, each
    shared node once."""
    import yaml

    def children(node: Any) -> list:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order: an expanded depth may be far beyond the recursion limit
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_nodes.discard(key)
            if size[key] > MAX_YAML_NODES:
                raise ScenarioError(path, "<yaml>", f"expands to more than {MAX_YAML_NODES:,} nodes (aliases "
                                    "expanded), the limit of a scenario file")
            if depth[key] > MAX_YAML_DEPTH:
                raise ScenarioError(path, "<yaml>", f"nests deeper than {MAX_YAML_DEPTH} levels (aliases "
                                    "expanded), the limit of a scenario file")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ScenarioError(path, "<yaml>", "an alias refers to a node that contains it (a recursive "
                                f"structure) at line {node.start_mark.line + 1}; write the values out")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in children(node))


@dataclass(frozen=True)
class _Settings:
    """What a scenario file sets for every item of its matrix, validated."""

    rounds: tuple[str, ...]
    measure: str
    trials: int
    seed: int
    api: str
    request_rate: float
    burstiness: float
    thresholds: tuple[MetricThreshold, ...] | None  # None: each item's defaults
    reference: str | None
    options_json: str
    warmup: int
    slos: tuple[tuple[str, float], ...]
    check_outputs: bool | None


def parse_scenario(data: Any, path: Path | str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(path, "<top>", "a scenario file must hold a mapping with at least 'name' and 'matrix'")
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        raise ScenarioError(path, _key(unknown[0]), f"unknown key; allowed keys: {', '.join(sorted(TOP_KEYS))}")
    name, phase = _name_and_phase(data, path)
    description = data.get("description", "")
    if isinstance(description, (list, dict)):
        raise ScenarioError(path, "description", "must be text (one string)")
    matrix = _matrix(data, path)
    dims = _dimensions(data, matrix, path)
    settings = _settings(data, dims, path)
    kv_per_token = _kv_per_token(data, dims, matrix, path)
    options = json.loads(settings.options_json) if settings.options_json else {}
    _output_len_from_options(dims, options, matrix, data, path)
    cases = _cases(name, phase, settings, dims, matrix, options, kv_per_token, path)
    if not cases:
        raise ScenarioError(path, "paired_with", "leaves no item: every backend of the matrix is the reference")
    return Scenario(name=name, path=str(path), phase=phase, description=str(description).strip(), cases=cases)


def _name_and_phase(data: dict, path: Path | str) -> tuple[str, str]:
    name = _require(data, "name", path)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise ScenarioError(path, "name", f"{_show(name)} must be an identifier (letters, digits, _) of at most "
                            f"{MAX_NAME_CHARS} characters, e.g. prefill")
    if "phase" not in data and name not in PHASES:
        raise ScenarioError(path, "phase", f"is required (one of: {', '.join(PHASES)})")
    phase = data.get("phase", name)
    if phase not in PHASES:
        raise ScenarioError(path, "phase", f"{_show(phase)} is not a known phase; use one of: {', '.join(PHASES)}")
    return name, phase


def _matrix(data: dict, path: Path | str) -> dict:
    matrix = _require(data, "matrix", path)
    if not isinstance(matrix, dict) or not matrix:
        raise ScenarioError(path, "matrix",
                            "must be a mapping of dimension -> list of values, e.g. {backend: [none, cpu]}")
    for key in matrix:
        if key not in MATRIX_KEYS:
            raise ScenarioError(path, f"matrix.{_key(key)}", f"unknown dimension; allowed: {', '.join(MATRIX_KEYS)}")
        if key in data:
            raise ScenarioError(path, key, "given both at top level and in matrix; keep one")
    return matrix


def _dimensions(data: dict, matrix: dict, path: Path | str) -> dict[str, list[Any]]:
    """Each matrix key's checked values (from the matrix, the top level or the defaults)."""
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
            raise ScenarioError(path, where, f"repeats a value: {_show(raw)}")
    items = math.prod(len(values) for values in dims.values())
    if items > MAX_ITEMS:  # before expanding: 8 x 200 x 200 x 200 is 64 million items
        raise ScenarioError(path, "matrix", f"makes {items:,} items ({' x '.join(str(len(v)) for v in dims.values())})"
                            f", more than {MAX_ITEMS:,}, the limit of a scenario file; split it or drop values")
    return dims


def _settings(data: dict, dims: dict[str, list[Any]], path: Path | str) -> _Settings:
    """The file's settings outside the matrix, checked in the order of the keys' documentation."""
    rounds, measure = _rounds(data, path)
    trials = _positive_int(data.get("trials", DEFAULTS["trials"]), "trials", path, MAX_TRIALS)
    seed = data.get("seed", DEFAULTS["seed"])
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
        raise ScenarioError(path, "seed", f"{_show(seed)} must be an integer from 0 to 2**63 - 1")
    api = data.get("api", DEFAULTS["api"])
    if api not in APIS:
        raise ScenarioError(path, "api", f"{_show(api)} must be one of {', '.join(APIS)}")
    request_rate = _rate(data.get("request_rate", DEFAULTS["request_rate"]), path)
    burstiness = _burstiness(data.get("burstiness", 1.0), path)
    thresholds = _thresholds(data.get("thresholds"), path)
    reference = _paired_with(data.get("paired_with"), path)
    options_json = _dataset_options(data.get("dataset_options"), dims["dataset"], path)
    warmup = data.get("warmup_requests", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= MAX_WARMUP:
        raise ScenarioError(path, "warmup_requests", f"{_show(warmup)} must be an integer from 0 to {MAX_WARMUP:,}")
    slos = _slos(data.get("slo"), path)
    check = data.get("check_outputs")
    if check is not None and not isinstance(check, bool):
        raise ScenarioError(path, "check_outputs", f"{_show(check)} must be true or false (default: true where "
                            "output_len > 1)")
    return _Settings(rounds=rounds, measure=measure, trials=trials, seed=seed, api=api, request_rate=request_rate,
                     burstiness=burstiness, thresholds=thresholds, reference=reference, options_json=options_json,
                     warmup=warmup, slos=slos, check_outputs=check)


def _rounds(data: dict, path: Path | str) -> tuple[tuple[str, ...], str]:
    rounds: Any = data.get("rounds", DEFAULTS["rounds"])
    if (not isinstance(rounds, list) or not rounds or any(r not in ROUNDS for r in rounds)
            or len(set(rounds)) != len(rounds)):
        raise ScenarioError(path, "rounds", f"{_show(rounds)} must be a non-empty list of {', '.join(ROUNDS)}, "
                            "each at most once")
    measure: Any = data.get("measure", rounds[-1])
    if measure not in rounds:
        raise ScenarioError(path, "measure", f"{_show(measure)} must be one of the rounds {rounds}")
    return tuple(rounds), measure


def _burstiness(value: Any, path: Path | str) -> float:
    low, high = BURSTINESS_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ScenarioError(path, "burstiness", f"{_show(value)} must be a number from {low:g} to {high:g} "
                            "(1 = Poisson arrivals, smaller is burstier)")
    return float(value)


def _cases(name: str, phase: str, settings: _Settings, dims: dict[str, list[Any]], matrix: dict, options: dict,
           kv_per_token: int, path: Path | str) -> tuple[ScenarioCase, ...]:
    """One case for each combination of the matrix's values, each within the load limits."""
    varying = [k for k in MATRIX_KEYS if len(dims[k]) > 1]
    reference = settings.reference
    cases = []
    for combo in itertools.product(*(dims[k] for k in MATRIX_KEYS)):
        values = dict(zip(MATRIX_KEYS, combo))
        if reference is not None and values["backend"] == reference:
            continue  # a backend paired with itself compares nothing
        if values["kv_target_gb"]:
            from .kvsize import prompts_for_kv_target

            values["num_prompts"] = prompts_for_kv_target(values["kv_target_gb"], kv_per_token, values["input_len"],
                                                          values["output_len"])
        case_id = _case_id(values, varying, reference)
        prompts_key = "kv_target_gb" if values["kv_target_gb"] else (
            "matrix.num_prompts" if "num_prompts" in matrix else "num_prompts")
        _check_load(f"{name}[{case_id}]", values, options, settings.warmup, settings.request_rate, prompts_key,
                    path)
        cases.append(_case(name, phase, case_id, values, "lmcache_mode" in varying, settings, path))
    return tuple(cases)


def _case(name: str, phase: str, case_id: str, values: dict[str, Any], compares_lmcache_modes: bool,
          settings: _Settings, path: Path | str) -> ScenarioCase:
    thresholds = settings.thresholds
    return ScenarioCase(
        scenario=name,
        path=str(path),
        phase=phase,
        case_id=case_id,
        backend=values["backend"],
        input_len=values["input_len"],
        concurrency=values["concurrency"],
        output_len=values["output_len"],
        num_prompts=values["num_prompts"],
        dataset=values["dataset"],
        rounds=settings.rounds,
        measure_round=settings.measure,
        trials=settings.trials,
        seed=settings.seed,
        api=settings.api,
        request_rate=settings.request_rate,
        burstiness=settings.burstiness,
        thresholds=thresholds if thresholds is not None else default_thresholds(values["output_len"]),
        reference_backend=settings.reference,
        dataset_options=settings.options_json,
        warmup_requests=settings.warmup,
        slos=settings.slos,
        kv_target_gb=float(values["kv_target_gb"]),
        lmcache_mode=values["lmcache_mode"],
        compares_lmcache_modes=compares_lmcache_modes,
        check_outputs=settings.check_outputs,
    )


def _output_len_from_options(dims: dict[str, list[Any]], options: dict, matrix: dict, data: dict,
                             path: Path | str) -> None:
    """Where a dataset option sets the answers' lengths (multiturn's output_num_tokens,
    sharegpt's answers, output_len or not), a scenario's own ``output_len`` would have no
    effect: refused, naming it. The option's length is then the items' output_len (a
    distribution's mean), so ids, thresholds and warm-up requests follow the answers."""
    from .workloads.multiturn import answer_len

    dataset = dims["dataset"][0]
    if dataset == "multiturn" and "output_num_tokens" in options:
        length, because = answer_len(options), ("dataset_options.output_num_tokens sets each answer's length in "
                                                 "a multi-turn conversation")
    elif dataset == "sharegpt" and len(dims["dataset"]) == 1:
        length, because = options.get("output_len"), ("a ShareGPT answer has its conversation's length, or "
                                                       "dataset_options.output_len")
    else:
        return
    where = "matrix.output_len" if "output_len" in matrix else "output_len" if "output_len" in data else None
    if where is not None:
        raise ScenarioError(path, where, f"{_show(matrix.get('output_len', data.get('output_len')))} has no effect: "
                            f"{because}; drop {where}" + (" (the items' output_len is then that length)"
                                                           if length else ""))
    if length:
        dims["output_len"] = [length]


def _check_load(item: str, values: dict[str, Any], options: dict, warmup: int, rate: float, prompts_key: str,
                path: Path | str) -> None:
    """One item's load within the limits: its prompts, the tokens of a round (at the
    dataset's maxima), and how long its request rate takes to send a round."""
    from .workloads import request_bounds

    n = values["num_prompts"]
    if n > MAX_PROMPTS:
        raise ScenarioError(path, prompts_key, f"item {item} would send {n:,} prompts a round, more than "
                            f"{MAX_PROMPTS:,}, the limit of an item")
    requests, prompt, request = request_bounds(values["dataset"], input_len=values["input_len"],
                                               output_len=values["output_len"], num_prompts=n, options=options)
    if prompt > MAX_TOKENS:
        raise ScenarioError(path, "dataset_options", f"item {item}: a conversation's last prompt may hold "
                            f"{prompt:,} tokens, more than {MAX_TOKENS:,}, the limit of a prompt; fewer turns or "
                            "shorter turns")
    if requests * request > MAX_ROUND_TOKENS:
        raise ScenarioError(path, prompts_key, f"item {item}: {requests:,} requests of up to {request:,} tokens "
                            f"(prompt + output) make up to {requests * request:,} tokens a round, more than "
                            f"{MAX_ROUND_TOKENS:,}, the limit; fewer prompts or shorter ones")
    warm_tokens = warmup * (values["input_len"] + values["output_len"])
    if requests * request + warm_tokens > MAX_ROUND_TOKENS:
        raise ScenarioError(path, "warmup_requests", f"item {item}: {warmup:,} warm-up requests of "
                            f"{values['input_len'] + values['output_len']:,} tokens take the round past "
                            f"{MAX_ROUND_TOKENS:,} tokens, the limit; fewer warm-up requests")
    seconds = (requests + warmup) / rate
    if seconds > MAX_ROUND_SECONDS:
        raise ScenarioError(path, "request_rate", f"item {item}: {requests + warmup:,} requests at {rate:g} per "
                            f"second take about {seconds:,.0f} s a round, more than {MAX_ROUND_SECONDS:,} s, the "
                            f"limit; use a request_rate of at least {(requests + warmup) / MAX_ROUND_SECONDS:.3g} "
                            "(or inf)")


def _dataset_options(raw: Any, datasets: list[str], path: Path | str) -> str:
    """Validated options as canonical JSON ("" when none)."""
    from .workloads import OptionProblem, check_dataset_options

    if raw is None:
        return ""
    if not isinstance(raw, dict):
        raise ScenarioError(path, "dataset_options", f"{_show(raw)} must be a mapping of option -> value")
    if len(datasets) > 1:
        raise ScenarioError(path, "dataset_options", "cannot apply to several datasets; "
                            "use one scenario file per dataset")
    options = dict(raw)
    if isinstance(options.get("path"), str) and not Path(options["path"]).is_absolute():
        beside = Path(str(path)).parent / options["path"]
        if _exists(beside):
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
            raise ScenarioError(path, f"slo.{_key(metric)}", f"unknown; use {', '.join(SLO_METRICS)} (milliseconds)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ScenarioError(path, f"slo.{metric}", f"{_show(value)} must be a positive number of milliseconds")
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
    if isinstance(raw, str) and not Path(raw).is_absolute() and _exists(Path(str(path)).parent / raw):
        raw = str(Path(str(path)).parent / raw)
    if not isinstance(raw, (str, dict)):
        raise ScenarioError(path, "model_config", f"{_show(raw)} must be a path to config.json or a mapping")
    try:
        return kv_bytes_per_token(raw)
    except (ValueError, TypeError) as exc:
        raise ScenarioError(path, "model_config", str(exc)) from None


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a name the system cannot hold (too long, a NUL) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _key(key: Any, limit: int = 60) -> str:
    """A key of the file as an error names it: its text, cut short if it is long."""
    text = str(key)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _require(data: dict, key: str, path: Path | str) -> Any:
    if key not in data:
        raise ScenarioError(path, key, "is required")
    return data[key]


def _check_dim(key: str, value: Any, where: str, path: Path | str) -> Any:
    if key == "backend":
        if value not in BACKENDS:
            raise ScenarioError(path, where, f"unknown backend {_show(value)}; use one of: {', '.join(BACKENDS)}")
        return value
    if key == "dataset":
        if value not in DATASETS:
            raise ScenarioError(path, where, f"unknown dataset {_show(value)}; use one of: {', '.join(DATASETS)}")
        return value
    if key == "lmcache_mode":
        if value not in LMCACHE_MODES:
            raise ScenarioError(path, where,
                                f"unknown LMCache mode {_show(value)}; use one of: {', '.join(LMCACHE_MODES)}")
        return value
    if key == "kv_target_gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_KV_TARGET_GB:
            raise ScenarioError(path, where, f"{_show(value)} must be a number of GB (10^9 bytes) above 0 and at most "
                                f"{MAX_KV_TARGET_GB:,}, e.g. 50")
        return float(value)
    if key == "input_len":
        try:
            return parse_token_count(value)
        except ValueError as exc:
            raise ScenarioError(path, where, str(exc)) from None
    high = {"concurrency": MAX_CONCURRENCY, "num_prompts": MAX_PROMPTS, "output_len": MAX_TOKENS}[key]
    return _positive_int(value, where, path, high)


def _positive_int(value: Any, where: str, path: Path | str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
        raise ScenarioError(path, where, f"{_show(value)} must be a positive integer up to {high:,}")
    return value


def _rate(value: Any, path: Path | str) -> float:
    if isinstance(value, str) and value == "inf":
        return math.inf
    # NaN fails every comparison, so it is refused here too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= math.inf:
        raise ScenarioError(path, "request_rate", f"{_show(value)} must be a positive number of requests per second "
                            "or inf")
    return float(value)


def _thresholds(raw: Any, path: Path | str) -> tuple[MetricThreshold, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ScenarioError(path, "thresholds", "must map metric names to {direction: lower|higher, threshold: 10%}")
    out = []
    for metric, spec in raw.items():
        where = f"thresholds.{_key(metric)}"
        if not is_known_metric(str(metric)):
            raise ScenarioError(
                path, where, "unknown metric; use vLLM's names such as median_ttft_ms, p99_ttft_ms, "
                "mean_tpot_ms, median_itl_ms, total_token_throughput, output_throughput"
            )
        if not isinstance(spec, dict) or set(spec) - {"direction", "threshold"}:
            raise ScenarioError(path, where, "must be {direction: lower|higher, threshold: 10%}")
        direction = spec.get("direction", "higher" if "throughput" in str(metric) else "lower")
        if direction not in ("lower", "higher"):
            raise ScenarioError(path, f"{where}.direction",
                                f"{_show(direction)} must be 'lower' or 'higher' (which is better)")
        fraction = _fraction(spec.get("threshold"), f"{where}.threshold", path)
        out.append(MetricThreshold(str(metric), direction, fraction))
    return tuple(out)


def parse_threshold_override(text: str) -> tuple[str, float]:
    """``"median_ttft_ms=15%"`` -> ("median_ttft_ms", 0.15)."""
    metric, sep, value = text.partition("=")
    metric = metric.strip()
    if not sep or not is_known_metric(metric):
        raise ValueError(f"{_show(text)}: use METRIC=PCT with a vLLM metric name, e.g. median_ttft_ms=15% or "
                         "total_token_throughput=5%")
    value = value.strip()
    try:
        return metric, _fraction(value if value.endswith("%") else float(value), "threshold", "<command line>")
    except (ValueError, ScenarioError):
        raise ValueError(f"{_show(text)}: the threshold must be a percentage above 0, e.g. 15%") from None


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
        raise ScenarioError(path, where,
                            f"{_show(value)} must be a percentage such as 10% (or a fraction such as 0.10)") from None
    if not 0 < number < 10:
        raise ScenarioError(path, where, f"{_show(value)} must be above 0%")
    return number


def _paired_with(raw: Any, path: Path | str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"backend"}:
        raise ScenarioError(path, "paired_with", "must be {backend: NAME}, the configuration to compare against")
    if raw["backend"] not in BACKENDS:
        raise ScenarioError(path, "paired_with.backend",
                            f"unknown backend {_show(raw['backend'])}; use one of: {', '.join(BACKENDS)}")
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
