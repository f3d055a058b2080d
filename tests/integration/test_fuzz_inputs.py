"""Property-based fuzzing of every input the plugin reads (issue 13): scenario files and
every option and ini value.

Scenarios: mutations of valid scenarios (wrong types, out-of-range numbers, NaN and inf,
unknown and missing keys, bombs, broken YAML, binary bytes, deep nesting) go through the
parser in-process; each either loads or raises ScenarioError naming the file and the key,
within bounded time (and memory, for the bombs), never another exception. A sample goes
through pytest itself (--collect-only). Options: bad values of every option and ini key go
through pytest --collect-only in a pytester project; each is a usage error (exit 4)
naming the option or the ini key, never a traceback. Free-text options (a model name, a
folder that will be made) are fuzzed too: accepted or a usage error, never a traceback.

Reproducible: Hypothesis runs derandomized. ``pytest -s`` prints the counts at the end.
"""

from __future__ import annotations

import collections
import copy
import math
import re
import shlex
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_kvcache.errors import ScenarioError
from pytest_kvcache.kvsize import DTYPE_BYTES
from pytest_kvcache.models import BACKENDS, LMCACHE_MODES, PHASES
from pytest_kvcache.scenarios import (
    APIS,
    DATASETS,
    MATRIX_KEYS,
    MAX_FILE_BYTES,
    MAX_ITEMS,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    TOP_KEYS,
    load_scenario,
    parse_threshold_override,
    parse_token_count,
)

pytest_plugins = ("pytester",)

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
#: (suite, outcome) -> inputs; outcome: loaded | clean-error | traceback | silently-accepted
COUNTS: collections.Counter = collections.Counter()
SECONDS = 10.0  # a file, however hostile, is judged within this (a bomb takes minutes; a busy runner, seconds)
BOMB_BYTES = 64 * 2**20  # ... and a bomb within this much memory


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for suite in sorted({s for s, _ in COUNTS}):
        tried = sum(n for (s, _), n in COUNTS.items() if s == suite)
        parts = ", ".join(f"{o} {COUNTS[suite, o]}" for o in ("loaded", "clean-error", "traceback",
                                                               "silently-accepted"))
        print(f"\nfuzz {suite}: {tried} inputs tried: {parts}")


# -- scenarios -----------------------------------------------------------------------------

BASES: list[dict[str, Any]] = [
    {"name": "prefill", "phase": "prefill", "description": "seed matrix",
     "matrix": {"backend": ["none", "cpu"], "input_len": [100, "1k"], "concurrency": [16], "output_len": [1]},
     "dataset": "random", "num_prompts": 50, "rounds": ["cold", "warm"], "measure": "warm", "trials": 3,
     "seed": 0, "api": "completions",
     "thresholds": {"median_ttft_ms": {"direction": "lower", "threshold": "10%"},
                    "total_token_throughput": {"direction": "higher", "threshold": "5%"}}},
    {"name": "multiturn", "phase": "multiturn", "matrix": {"backend": ["cpu"], "input_len": [128],
                                                           "concurrency": [8], "output_len": [16]},
     "dataset": "multiturn", "num_prompts": 8, "slo": {"ttft": 2000, "tpot": 100},
     "dataset_options": {"num_turns": {"distribution": "constant", "value": 3}, "common_prefix_num_tokens": 500,
                         "prefix_num_tokens": {"distribution": "lognormal", "average": 1000, "max": 3000},
                         "num_tokens": {"distribution": "uniform", "min": 120, "max": 160}}},
    {"name": "shared_prefix", "phase": "shared_prefix", "matrix": {"backend": ["cpu"], "input_len": ["4k"]},
     "dataset": "shared_prefix", "dataset_options": {"hit_ratio": 0.8, "num_prefixes": 2}, "num_prompts": 16,
     "warmup_requests": 2, "request_rate": 10, "burstiness": 0.5, "api": "chat"},
    {"name": "kv_size", "phase": "kv_size", "matrix": {"backend": ["disk"], "input_len": ["100k"],
                                                       "kv_target_gb": [50, 100]},
     "model_config": {"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512,
                      "qk_rope_head_dim": 64, "hidden_size": 7168, "torch_dtype": "bfloat16"}},
    {"name": "offload_gain", "phase": "prefill", "matrix": {"backend": ["cpu"], "input_len": ["10k"]},
     "paired_with": {"backend": "none"}, "trials": 4},
    {"name": "sharegpt", "phase": "sharegpt", "matrix": {"backend": ["none", "cpu"], "input_len": [1024]},
     "dataset": "sharegpt", "dataset_options": {"max_total_len": 2048, "min_len": 4}, "num_prompts": 100},
    {"name": "modes", "phase": "prefill", "matrix": {"backend": ["cpu"], "input_len": [100],
                                                     "lmcache_mode": ["inprocess", "mp"]}, "seed": 7},
]

NUMBERS_BAD = st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")), st.booleans(),
                        st.integers(max_value=0), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.text(max_size=12))


def _not_int_in(low: int, high: int) -> st.SearchStrategy:
    """Values that are no integer from low to high: out of range, floats, bools, text, NaN."""
    return st.one_of(NUMBERS_BAD, st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                     st.integers(min_value=high + 1, max_value=10**40), st.floats(allow_nan=True))


def _not_number_in(low: float, high: float, low_ok: bool = False, high_ok: bool = True) -> st.SearchStrategy:
    """Values that are no number from low to high: out of range, NaN, inf, bools, text, lists."""
    def inside(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and (low <= v if low_ok else low < v)
                and (v <= high if high_ok else v < high))

    parts = [NUMBERS_BAD, st.floats(allow_nan=True, allow_infinity=True)]
    if math.isfinite(high):
        parts.append(st.integers(min_value=math.floor(high) + 1))
    return st.one_of(*parts).filter(lambda v: not inside(v))


def _not_in(choices) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=20).filter(lambda t: t not in choices), st.integers(), st.booleans(),
                     st.floats(), st.lists(st.sampled_from(list(choices)), min_size=1, max_size=2))


def _bad_token_count(value: Any) -> bool:
    try:
        parse_token_count(value)
    except (ValueError, TypeError):
        return True
    return False


TOKEN_BAD = st.one_of(
    st.integers(max_value=0), st.integers(min_value=10_000_001, max_value=10**30),
    st.sampled_from(["1000m", "11m", "10.5m", "ten", "1.0001k", "k", "-5", "0", "", "1e9", "10000001"]),
    st.floats(allow_nan=True, allow_infinity=True).filter(_bad_token_count),
    st.text(max_size=12).filter(_bad_token_count), st.booleans(), st.lists(st.integers(), max_size=2))

#: key -> strategy of values that key must refuse (the mutation's must-fail set)
BAD: dict[str, st.SearchStrategy] = {
    "name": st.one_of(st.just(""), st.text(max_size=20).filter(lambda t: not re.fullmatch(r"[A-Za-z]\w*", t)
                                                                     or not t.isascii()),
                      st.from_regex(r"[a-z][a-z0-9_]{64,120}", fullmatch=True), st.integers(), st.lists(st.text())),
    "phase": _not_in(PHASES),
    "description": st.one_of(st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                         st.integers(), max_size=2)),
    "backend": _not_in(BACKENDS),
    "input_len": TOKEN_BAD,
    "concurrency": _not_int_in(1, 4096),
    "output_len": _not_int_in(1, 10_000_000),
    "num_prompts": _not_int_in(1, 100_000),
    "dataset": _not_in(DATASETS),
    "kv_target_gb": _not_number_in(0, 1_000_000),
    "lmcache_mode": _not_in(LMCACHE_MODES),
    "rounds": st.one_of(st.just([]), st.just(["cold", "cold"]), st.just("cold"),
                        st.lists(st.text(max_size=5).filter(lambda t: t not in ("cold", "warm")), min_size=1,
                                 max_size=3), st.integers()),
    "measure": st.one_of(st.text(max_size=6).filter(lambda t: t not in ("cold", "warm")), st.integers()),
    "trials": _not_int_in(1, 100),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63, max_value=2**100), st.floats(),
                      st.text(max_size=5), st.booleans()),
    "api": _not_in(APIS),
    "request_rate": st.one_of(st.floats(min_value=1e-12, max_value=1e-4), _not_number_in(0, math.inf).filter(
        lambda v: v != "inf")),
    "burstiness": _not_number_in(0.01, 100.0, low_ok=True),
    "warmup_requests": _not_int_in(0, 10_000).filter(lambda v: not (isinstance(v, int) and v == 0)),
    "slo": st.one_of(st.lists(st.integers(), max_size=2), st.just({}),
                     st.fixed_dictionaries({"latency": st.integers(1, 9)}),
                     st.fixed_dictionaries({"ttft": _not_number_in(0, math.inf, high_ok=False)})),
    "thresholds": st.one_of(
        st.just({}), st.lists(st.integers(), max_size=2),
        st.fixed_dictionaries({"speed": st.just({"threshold": "10%"})}),
        st.fixed_dictionaries({"median_ttft_ms": st.text(max_size=5)}),
        st.fixed_dictionaries({"median_ttft_ms": st.fixed_dictionaries({"direction": _not_in(("lower", "higher")),
                                                                        "threshold": st.just("10%")})}),
        st.fixed_dictionaries({"p99_itl_ms": st.fixed_dictionaries({"threshold": st.one_of(
            st.sampled_from(["-5%", "0%", "abc%", "1e999%", "nan%", "1000%", "ten", ""]), st.booleans(),
            st.floats(allow_nan=True).filter(lambda v: not 0 < v < 10),
            st.integers().filter(lambda v: not 0 < v < 10), st.lists(st.integers(), max_size=2))})}),
        st.fixed_dictionaries({"median_ttft_ms": st.fixed_dictionaries({"threshold": st.just("10%"),
                                                                        "extra": st.integers()})})),
    "paired_with": st.one_of(st.just("none"), st.just({"backend": "floppy"}), st.just({"backend": "none", "x": 1}),
                             st.just({}), st.lists(st.integers(), max_size=1)),
    "dataset_options": st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=5), st.integers()),
}

#: dataset -> strategy of dataset_options that dataset must refuse
BAD_OPTIONS: dict[str, st.SearchStrategy] = {
    "multiturn": st.one_of(
        st.fixed_dictionaries({"num_turns": _not_int_in(1, 1000)}),
        st.fixed_dictionaries({"num_tokens": _not_int_in(1, 10_000_000)}),
        st.fixed_dictionaries({"prefix_num_tokens": _not_int_in(0, 10_000_000).filter(lambda v: v != 0)}),
        st.fixed_dictionaries({"num_turns": st.fixed_dictionaries({"distribution": _not_in(
            ("constant", "uniform", "lognormal"))})}),
        st.fixed_dictionaries({"num_tokens": st.fixed_dictionaries({
            "distribution": st.just("uniform"), "min": st.integers(10, 20), "max": st.integers(1, 9)})}),
        st.fixed_dictionaries({"output_num_tokens": st.fixed_dictionaries({
            "distribution": st.just("lognormal"), "average": st.integers(1, 9),
            "sigma": _not_number_in(0, 5, high_ok=False)})}),
        st.fixed_dictionaries({"num_turns": st.just(1000), "num_tokens": st.integers(10_001, 10**6)}),
        st.fixed_dictionaries({"bogus": st.integers()})),
    "shared_prefix": st.one_of(
        st.fixed_dictionaries({"hit_ratio": _not_number_in(0, 1, low_ok=True)}),
        st.fixed_dictionaries({"num_prefixes": _not_int_in(1, 100_000)}),
        st.fixed_dictionaries({"num_turns": st.integers()})),
    "sharegpt": st.one_of(
        st.fixed_dictionaries({"min_len": _not_int_in(1, 10_000_000)}),
        st.fixed_dictionaries({"max_total_len": _not_int_in(1, 10_000_000)}),
        st.fixed_dictionaries({"path": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2))})),
    "random": st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), min_size=1, max_size=2),
}

BAD_MODEL_CONFIGS = st.one_of(
    st.just({}), st.lists(st.integers(), max_size=2), st.integers(),
    st.just("no/such/config.json"), st.just("x" * 300),
    st.fixed_dictionaries({"num_hidden_layers": _not_int_in(1, 1_000_000).filter(
        lambda v: not (isinstance(v, float) and v.is_integer() and 1 <= v <= 1_000_000)),
        "num_attention_heads": st.just(8), "hidden_size": st.just(512)}),
    st.fixed_dictionaries({"num_hidden_layers": st.just(4), "num_attention_heads": st.sampled_from([0, -1, 2**70]),
                           "hidden_size": st.just(512)}),
    st.fixed_dictionaries({"num_hidden_layers": st.just(4), "num_attention_heads": st.just(64),
                           "hidden_size": st.integers(1, 63)}),
    st.fixed_dictionaries({"num_hidden_layers": st.just(4), "num_attention_heads": st.just(8),
                           "hidden_size": st.just(512), "torch_dtype": _not_in(DTYPE_BYTES).filter(
                               lambda v: v and str(v).replace("torch.", "") not in DTYPE_BYTES)}),
    st.fixed_dictionaries({"num_hidden_layers": st.just(4), "kv_lora_rank": st.sampled_from([-1, "x", 1.5]),
                           "num_attention_heads": st.just(8), "hidden_size": st.just(512)}))

UNKNOWN_KEY = st.text(min_size=1, max_size=12).filter(lambda k: k not in TOP_KEYS)


def _set_dim(data: dict, key: str, value: Any) -> None:
    """A matrix dimension, in the matrix when the base has it there, else at top level; a
    list is one value (a list of values would be several, each maybe fine)."""
    if key in data["matrix"]:
        data["matrix"][key] = [value]
    else:
        data[key] = [value] if isinstance(value, list) else value


@st.composite
def bad_value_mutation(draw) -> tuple[dict, str]:
    """A valid base with one key made bad: (data, the key)."""
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    kind = draw(st.sampled_from(sorted(BAD) + ["dataset_options*", "model_config", "unknown", "unknown_dim",
                                                "missing", "paired_self", "matrix"]))
    if kind in MATRIX_KEYS:
        _set_dim(data, kind, draw(BAD[kind]))
    elif kind in BAD:
        data[kind] = draw(BAD[kind])
    elif kind == "dataset_options*":
        dataset = draw(st.sampled_from(sorted(BAD_OPTIONS)))
        data.pop("dataset", None)
        data["matrix"].pop("dataset", None)
        data["dataset"] = dataset
        data["dataset_options"] = draw(BAD_OPTIONS[dataset])
    elif kind == "model_config":
        data.pop("num_prompts", None)
        data["matrix"].pop("num_prompts", None)
        if "kv_target_gb" not in data["matrix"]:
            data["kv_target_gb"] = 1
        data["model_config"] = draw(BAD_MODEL_CONFIGS)
    elif kind == "unknown":
        data[draw(UNKNOWN_KEY)] = draw(st.integers())
    elif kind == "unknown_dim":
        data["matrix"][draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in MATRIX_KEYS))] = [1]
    elif kind == "missing":
        key = draw(st.sampled_from(["name", "matrix", "backend", "input_len"]))
        data.pop(key, None)
        if key != "matrix":
            data["matrix"].pop(key, None)
    elif kind == "paired_self":
        data["matrix"]["backend"] = ["cpu"]
        data["paired_with"] = {"backend": "cpu"}
    else:  # a matrix of too many items
        sizes = draw(st.lists(st.integers(2, 60), min_size=3, max_size=3).filter(
            lambda s: math.prod(s) > MAX_ITEMS))
        data["matrix"] = {"backend": ["cpu"], "input_len": list(range(1, sizes[0] + 1)),
                          "concurrency": list(range(1, sizes[1] + 1)), "output_len": list(range(1, sizes[2] + 1))}
        data.pop("paired_with", None)
    return data, kind


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10_000)


@st.composite
def bomb(draw) -> tuple[bytes, str]:
    """A file any parser must refuse: (bytes, what it is)."""
    base = _dump(draw(st.sampled_from(BASES)))
    kind = draw(st.sampled_from(["alias", "deep-flow", "deep-block", "huge", "binary", "non-utf8", "nul",
                                 "recursive"]))
    if kind == "alias":  # width ** depth nodes, over the limit
        width = draw(st.integers(2, 12))
        depth = max(draw(st.integers(3, 30)), math.ceil(math.log(MAX_YAML_NODES * 2) / math.log(width)) + 1)
        lines = [f"  - &a0 [{', '.join(['x'] * width)}]"]
        lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        key = draw(st.sampled_from(["description", "thresholds", "x_unknown", "slo"]))
        return (base + f"{key}:\n" + "\n".join(lines) + "\n").encode(), kind
    if kind == "deep-flow":
        depth = draw(st.integers(MAX_YAML_DEPTH, 50_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return (base + "description: " + opener * depth + "1" + closer * depth + "\n").encode(), kind
    if kind == "deep-block":
        depth = draw(st.integers(MAX_YAML_DEPTH, 400))
        return (base + "description:\n" + "".join(f"{'  ' * (i + 1)}k:\n" for i in range(depth))).encode(), kind
    if kind == "huge":
        filler = draw(st.sampled_from(["#", "x", " "]))
        return (base + "# " + filler * (MAX_FILE_BYTES + draw(st.integers(0, 2**20))) + "\n").encode(), kind
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=2000).filter(lambda b: _undecodable(b) or b"\x00" in b)), kind
    if kind == "non-utf8":
        at = draw(st.integers(0, len(base)))
        junk = draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3\x28", b"\x80\x80", b"\xed\xa0\x80"]))
        return base.encode()[:at] + junk + base.encode()[at:], kind
    if kind == "nul":
        at = draw(st.integers(0, len(base)))
        return base.encode()[:at] + b"\x00" + base.encode()[at:], kind
    return (base + "description: &loop [1, *loop]\n").encode(), kind


def _undecodable(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@st.composite
def text_mutation(draw) -> bytes:
    """Valid text, broken in a few random places: may still load, must never crash."""
    text = _dump(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "indent"]))
        piece = draw(st.text(alphabet=st.sampled_from(list("[]{}:,-&*!|>'\"#%@`\t\n ?.0123456789eE+abcnif")),
                             min_size=1, max_size=6))
        if op == "delete":
            text = text[:at] + text[at + len(piece):]
        elif op == "insert":
            text = text[:at] + piece + text[at:]
        elif op == "replace":
            text = text[:at] + piece + text[at + len(piece):]
        elif op == "truncate":
            text = text[:at]
        else:
            text = text[:at] + "   " + text[at:]
    return text.encode()


@st.composite
def value_noise(draw) -> dict:
    """A base with a key set to any small value: may load, must never crash."""
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    key = draw(st.sampled_from(sorted(TOP_KEYS)))
    value = draw(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                              lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                              max_leaves=6))
    if key in MATRIX_KEYS:
        _set_dim(data, key, value)
    else:
        data[key] = value
    return data


def judge(folder: Path, content: bytes, must_fail: bool, suite: str, memory: bool = False) -> ScenarioError | None:
    """Load ``content`` as a scenario file: it loads (only where it may) or raises a clean
    ScenarioError naming the file and a key, in time and memory; never anything else."""
    path = folder / "fuzzed.yaml"
    path.write_bytes(content)
    if memory:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        load_scenario(path)
    except ScenarioError as exc:
        error = exc
    except BaseException:
        COUNTS[suite, "traceback"] += 1
        raise
    else:
        error = None
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if memory else 0
        if memory:
            tracemalloc.stop()
    assert elapsed < SECONDS * (3 if memory else 1), f"{elapsed:.1f}s for {content[:200]!r}"
    assert peak < BOMB_BYTES, f"{peak / 2**20:.0f} MiB for {content[:200]!r}"
    if error is None:
        COUNTS[suite, "silently-accepted" if must_fail else "loaded"] += 1
        assert not must_fail, f"accepted: {content[:400]!r}"
        return None
    COUNTS[suite, "clean-error"] += 1
    message = str(error)
    assert message.startswith(f"{path}: key '{error.key}': ") and error.key and error.problem, message
    assert "\n" not in message and len(message) < 1200, message
    return error


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=400)
@given(mutation=bad_value_mutation())
def test_bad_values_are_clean_scenario_errors(folder, mutation):
    data, key = mutation
    error = judge(folder, _dump(data).encode(), must_fail=True, suite="scenario values")
    root = key.rstrip("*")
    if root in TOP_KEYS and root not in ("matrix",):  # the error names the key that was made bad
        assert root in error.key or error.key in ("matrix", "<top>", "model_config"), (key, str(error))


#: hostile values every key is tried with, beside the random ones
SPECIALS: tuple[Any, ...] = (float("nan"), float("inf"), float("-inf"), 0, -1, True, 10**12, 1e-300, 10**30, "x",
                             [], {}, None, [[1]], {"a": 1})
#: (key, special) pairs a key takes: 0 warm-up requests, an infinite request rate, no options...
TAKEN = [("name", "x"), ("seed", 0), ("seed", 10**12), ("request_rate", 10**12), ("request_rate", 10**30),
         ("warmup_requests", 0), ("request_rate", float("inf")), ("kv_target_gb", 1e-300),
         ("kv_target_gb", None), ("lmcache_mode", None), ("thresholds", None), ("slo", None), ("paired_with", None),
         ("dataset_options", None), ("dataset_options", {}), *(("description", v) for v in SPECIALS
                                                                 if not isinstance(v, (list, dict)))]
#: dataset -> option -> the specials it takes
OPTION_KEYS = {"multiturn": {"num_turns": (), "common_prefix_num_tokens": (0,), "prefix_num_tokens": (0,),
                             "num_tokens": (), "output_num_tokens": ()},
               "shared_prefix": {"hit_ratio": (0, 1e-300), "num_prefixes": ()},
               "sharegpt": {"path": ("x",), "min_len": (), "max_total_len": (), "output_len": ()}}


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included, and of one type (True is no 1 here)."""
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def test_every_key_refuses_every_hostile_special_value(folder):
    """Each key of every base with each special value it does not take: refused, naming the key."""
    tried = 0
    for base in BASES:
        for key in sorted(BAD):
            for value in SPECIALS:
                if any(k == key and _same(v, value) for k, v in TAKEN):
                    continue
                data = copy.deepcopy(base)
                if key in MATRIX_KEYS:
                    _set_dim(data, key, value)
                else:
                    data[key] = value
                error = judge(folder, _dump(data).encode(), must_fail=True, suite="scenario grid")
                assert key in error.key or error.key in ("matrix", "model_config"), (key, value, str(error))
                tried += 1
        for dataset, options in OPTION_KEYS.items():
            for option, taken in options.items():
                for value in SPECIALS:
                    if any(_same(value, t) for t in taken):
                        continue
                    data = copy.deepcopy(base)
                    data["matrix"].pop("dataset", None)
                    data.update(dataset=dataset, dataset_options={option: value})
                    error = judge(folder, _dump(data).encode(), must_fail=True, suite="scenario grid")
                    assert error.key.startswith("dataset_options"), (option, value, str(error))
                    tried += 1
    for field in ("num_hidden_layers", "num_attention_heads", "hidden_size", "num_key_value_heads", "head_dim"):
        for value in SPECIALS:
            if value in (None, 0, [], {}) and field in ("num_key_value_heads", "head_dim"):
                continue  # unset: derived from the others
            config = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512, field: value}
            data = {**copy.deepcopy(BASES[3]), "model_config": config}
            error = judge(folder, _dump(data).encode(), must_fail=True, suite="scenario grid")
            assert error.key == "model_config", (field, value, str(error))
            tried += 1
    assert tried > 1000


@settings(FUZZ, max_examples=120)
@given(case=bomb())
def test_bombs_binary_and_deep_files_are_refused_in_bounded_time_and_memory(folder, case):
    content, kind = case
    error = judge(folder, content, must_fail=True, suite="scenario bombs", memory=kind in ("alias", "deep-flow",
                                                                                            "recursive"))
    assert error.key in ("<file>", "<yaml>"), (kind, str(error))


@settings(FUZZ, max_examples=150)
@given(content=text_mutation())
def test_broken_yaml_loads_or_is_a_clean_error(folder, content):
    judge(folder, content, must_fail=False, suite="scenario text")


@settings(FUZZ, max_examples=150)
@given(data=value_noise())
def test_any_value_anywhere_loads_or_is_a_clean_error(folder, data):
    judge(folder, _dump(data).encode(), must_fail=False, suite="scenario noise")


@settings(FUZZ, max_examples=4)
@given(files=st.lists(st.one_of(bad_value_mutation().map(lambda m: _dump(m[0]).encode()),
                                bomb().filter(lambda b: b[1] != "huge").map(lambda b: b[0])),
                      min_size=8, max_size=8))
def test_bad_files_through_pytest_are_one_clean_collection_error_each(pytester, files):
    folder = pytester.path / "scenarios"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i, content in enumerate(files):
        (folder / f"f{i}.yaml").write_bytes(content)
    result = pytester.runpytest("--collect-only", "-p", "no:cacheprovider")
    text = result.stdout.str() + result.stderr.str()
    assert result.ret in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.USAGE_ERROR), text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    for i in range(len(files)):
        assert re.search(rf"scenarios/f{i}\.yaml: key '[^']+': ", text), (i, text)
    COUNTS["scenario files via pytest", "clean-error"] += len(files)


# -- options and ini keys ---------------------------------------------------------------------------

def _float_in(low: float, high: float, low_ok: bool = False, high_ok: bool = False):
    def valid(text: str) -> bool:
        try:
            v = float(text)
        except ValueError:
            return False
        return (low <= v if low_ok else low < v) and (v <= high if high_ok else v < high)
    return valid


def _int_in(low: int, high: int | None = None):
    def valid(text: str) -> bool:
        try:
            v = int(text)
        except ValueError:
            return False
        return low <= v and (high is None or v <= high)
    return valid


def _pct_in(text: str) -> bool:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        return False
    return 0 < v < 1


def _comma(valid_part):
    def valid(text: str) -> bool:
        parts = [p for p in text.split(",") if p.strip()]
        return bool(parts) and all(valid_part(p) for p in parts)
    return valid


def _token_ok(text: str) -> bool:
    return not _bad_token_count(text)


def _pairs_ok(text: str) -> bool:
    key, sep, value = text.partition("=")
    return bool(sep) and bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key.strip())) and bool(value.strip())


def _threshold_ok(text: str) -> bool:
    try:
        parse_threshold_override(text)
    except ValueError:
        return False
    return True


def _percentiles_ok(text: str) -> bool:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        return False
    return all(0 < v <= 100 for v in values) and len(set(values)) == len(values)


def _shlex_ok(text: str) -> bool:
    try:
        shlex.split(text)
    except ValueError:
        return False
    return True


def _strtobool_ok(text: str) -> bool:
    return text.strip().lower() in ("y", "yes", "t", "true", "on", "1", "n", "no", "f", "false", "off", "0")


def _endpoint_ok(text: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return False
    return bool(re.match(r"^https?://([^/\s@]+@)?[^/\s:@]+(:\d+)?(/.*)?$", text) and parts.hostname) and port != 0


def _profile_names() -> tuple[str, ...]:
    from pytest_kvcache.emulator.costmodel import PROFILES

    return tuple(PROFILES)


#: (option or None, ini key or None, valid(text) or None for "free text": any value may be fine,
#:  extra bad values to try)
OPTIONS: list[tuple[str | None, str | None, Any, tuple[str, ...]]] = [
    ("--input-len", None, _comma(_token_ok), ("1000m", "0", "1k,,x", "-5")),
    ("--concurrency", None, _comma(_int_in(1)), ("0", "1,-1", "x")),
    ("--backend", None, lambda t: _comma(lambda p: p.strip() in BACKENDS)(t), ("floppy", "cpu,gpu")),
    ("--output-len", None, _comma(_int_in(1)), ("0", "1.5")),
    ("--trials", None, _int_in(1, 100), ("0", "101", "1000000000")),
    ("--kv-server", "kvcache_server", lambda t: t in ("emulator", "vllm", "external"), ("triton", "EMULATOR")),
    ("--kv-endpoint", "kvcache_endpoint", _endpoint_ok, ("nope", "http://x:99999", "ftp://h", "http://u:p@:1",
                                                          "http://:80", "http://h:0")),
    ("--kv-server-args", "kvcache_server_args", _shlex_ok, ("'--unclosed", '"a')),
    ("--model", "kvcache_model", None, ()),
    ("--tokenizer", "kvcache_tokenizer", None, ("/no/such/tokenizer", "x" * 300, "a\x00b")),
    ("--kv-results-dir", "kvcache_results_dir", None, ("a-file", "a-file/out", "~no_such_user_zz/x")),
    ("--baseline-dir", "kvcache_baseline_dir", None, ("a-file", "a-file/bl", "~no_such_user_zz/bl")),
    (None, "kvcache_strict_baselines", _strtobool_ok, ("maybe", "2", "yes please")),
    ("--alpha", "kvcache_alpha", _float_in(0, 0.5), ("0.5", "0", "nan", "inf", "x")),
    ("--threshold", "kvcache_thresholds", _threshold_ok, ("median_ttft_ms", "speed=5%", "median_ttft_ms=-5%")),
    ("--emulator-profile", "kvcache_emulator_profile", lambda t: t in _profile_names(),
     ("warp", "no/such.json", "a\x00b.json", "x" * 300 + ".json")),
    ("--emulator-slowdown", "kvcache_emulator_slowdown", _float_in(0, 1000), ("0", "-1", "1000", "nan")),
    ("--kv-python", "kvcache_python", None, ("/no/python", "x" * 300, "a\x00b")),
    ("--kv-lmcache-mode", "kvcache_lmcache_mode", lambda t: t in LMCACHE_MODES, ("gpu", "MP")),
    ("--kv-lmcache", "kvcache_lmcache", _pairs_ok, ("chunk_size", "=1", "a b=1")),
    ("--kv-redis-url", "kvcache_redis_url",
     lambda t: bool(re.match(r"^(redis|rediss|valkey)://[^/\s:]+(:\d+)?/?$", t)), ("localhost:6379", "http://x")),
    ("--kv-gds-path", "kvcache_gds_path", None, ()),
    ("--kv-label", "kvcache_labels", _pairs_ok, ("bandwidth", "=x", "k=")),
    ("--kv-min-hit-ratio", "kvcache_min_hit_ratio", _float_in(0, 1, low_ok=True, high_ok=True), ("1.5", "-0.1")),
    ("--kv-tensor-parallel-size", "kvcache_tensor_parallel_size", _int_in(1), ("0", "eight")),
    ("--kv-max-model-len", "kvcache_max_model_len", _int_in(1), ("long", "-1")),
    ("--kv-gpu-memory-utilization", "kvcache_gpu_memory_utilization", _float_in(0, 1.000001), ("1.5", "0")),
    ("--kv-ready-timeout", "kvcache_ready_timeout", _float_in(0, 86400, high_ok=True), ("0", "soon", "inf")),
    ("--kv-request-timeout", "kvcache_request_timeout", _float_in(0, 86400, high_ok=True), ("0", "nan", "86401")),
    ("--kv-client-floor", "kvcache_client_floor", _float_in(0.5, 1, low_ok=True, high_ok=True), ("0.4", "nan", "1.5")),
    ("--kv-gpus-per-worker", "kvcache_gpus_per_worker", _int_in(1), ("0", "two")),
    ("--percentiles", "kvcache_percentiles", _percentiles_ok, ("50,50", "0", "101", "p99", "50,,90")),
    ("--kv-client-processes", "kvcache_client_processes", _int_in(1, 256), ("0", "257", "-1")),
    ("--kv-version", "kvcache_versions", _pairs_ok, ("commit", "=abc")),
    (None, "kvcache_testbed_keys", lambda t: all(re.fullmatch(r"[A-Za-z0-9_.*?-]+", line.strip())
                                                 for line in t.splitlines() if line.strip()), ("torch version",)),
    (None, "kvcache_software_keys", lambda t: all(re.fullmatch(r"[A-Za-z0-9_.*?-]+", line.strip())
                                                  for line in t.splitlines() if line.strip()), ("gpu=1",)),
    ("--kv-run-noise", "kvcache_run_noise", _pct_in, ("0", "100%", "lots")),
    ("--kv-confirm-runs", "kvcache_confirm_runs", _int_in(0, 1000), ("-1", "1001", "many")),
    ("--kv-history", "kvcache_history", None, ("ftp://x/y", "sqlite://relative", "~no_such_user_zz/h.db")),
    ("--kv-history-window", "kvcache_history_window", _int_in(2, 1000), ("1", "0", "x")),
    # the emulator runs here: naming an external server's backend is refused whatever it is
    ("--kv-external-backend", "kvcache_external_backend", lambda t: not t.strip(), ("cpu", "none", "floppy")),
    (None, "kvcache_check_outputs", lambda t: t.strip().lower() in ("", "auto", "true", "false"), ("maybe", "yes")),
]
#: path options whose bad values are listed (or made under a file, where nothing can be)
FREE_BAD = {"--tokenizer", "--kv-python", "--kv-results-dir", "--baseline-dir", "--kv-history"}
LINELIST = {"kvcache_thresholds", "kvcache_lmcache", "kvcache_labels", "kvcache_versions", "kvcache_testbed_keys",
            "kvcache_software_keys"}
NUMBERISH = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats().map(repr),
                      st.sampled_from(["nan", "inf", "-inf", "1e309", "1_000", " 5 ", "0x10", "½", "١"]))
#: characters that keep a value on one line of an ini file
VALUE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@st.composite
def option_input(draw) -> tuple[list[str], list[str], bool]:
    """(arguments, names the error must mention one of, must it be refused)."""
    flag, ini, valid, extra = draw(st.sampled_from(OPTIONS))
    use_ini = flag is None or (ini is not None and draw(st.booleans()))
    if valid is None and flag in FREE_BAD and flag != "--kv-history":  # nothing can be under a file
        value = draw(st.one_of(st.sampled_from(extra), st.from_regex(r"[a-z0-9_]{1,10}", fullmatch=True).map(
            lambda name: f"a-file/{name}")))
        bad = True
    elif valid is None:
        value, bad = draw(st.sampled_from(extra) if extra else VALUE_TEXT), bool(extra)
    else:
        value = draw(st.one_of(st.sampled_from(extra), VALUE_TEXT, NUMBERISH).filter(
            lambda v: v != "" and not valid(v)
            and not (use_ini and ini in LINELIST and not v.strip())))  # no lines: the default
        bad = True
    if use_ini:
        args = ["-o", f"{ini}={value}"]
    else:
        args = [f"{flag}={value}"]
    if flag == "--baseline-dir" and draw(st.booleans()):
        args.append("--update-baselines")
    return args, [n for n in (flag, ini) if n], bad


@pytest.fixture
def options_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_ADDOPTS")  # the suite's --kv-client-floor (conftest.py) would win over a bad ini value
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "s.yaml").write_text(
        "name: s\nphase: prefill\nmatrix:\n  backend: [cpu]\n  input_len: [1k]\n")
    pytester.path.joinpath("a-file").write_text("not a folder")
    return pytester


def _run_options(project: pytest.Pytester, args: list[str], names: list[str], bad: bool) -> None:
    result = project.runpytest("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    text = result.stdout.str() + result.stderr.str()
    if "Traceback" in text or "INTERNALERROR" in text:
        COUNTS["options", "traceback"] += 1
        raise AssertionError(f"{args}: {text}")
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        COUNTS["options", "clean-error"] += 1
        assert any(name in result.stderr.str() for name in names), (args, text)
        return
    COUNTS["options", "silently-accepted" if bad else "loaded"] += 1
    assert not bad, f"{args} accepted: {text}"
    assert result.ret == pytest.ExitCode.OK, (args, text)


@settings(FUZZ, max_examples=230)
@given(case=option_input())
def test_every_bad_option_and_ini_value_is_a_usage_error_naming_it(options_project, case):
    _run_options(options_project, *case)


def test_update_and_reset_together_are_a_usage_error(options_project):
    _run_options(options_project, ["--update-baselines", "--reset-baselines"],
                 ["--update-baselines and --reset-baselines"], True)


def test_every_option_and_ini_key_is_fuzzed():
    """The table above covers every option and ini key the plugin declares."""
    from pytest_kvcache import plugin

    declared_options, declared_ini = set(), set()

    class Group:
        def addoption(self, *names, **kwargs):
            declared_options.update(n for n in names if n.startswith("--"))

    class Parser:
        def getgroup(self, *args, **kwargs):
            return Group()

        def addini(self, name, *args, **kwargs):
            declared_ini.add(name)

    plugin.pytest_addoption(Parser())
    flags = {"--update-baselines", "--reset-baselines", "--strict-baselines", "--kv-check-outputs",
             "--no-kv-check-outputs"}  # no value to fuzz
    assert declared_options - flags == {o for o, _, _, _ in OPTIONS if o}
    assert declared_ini == {i for _, i, _, _ in OPTIONS if i}
