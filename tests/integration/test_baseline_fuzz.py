"""Hostile baseline files: every input loads with sound values or fails as BaselineCorruptError.

Generated files (Hypothesis, derandomized): well-formed ones with hostile values (strings,
booleans, negatives, zeros, NaN, Infinity, huge integers, nested objects), broken shapes
(a part of a valid file replaced or removed), bad JSON (truncated, bytes flipped, deep
nesting) and huge files. Each goes through ``BaselineStore.load`` and through ``write``
with and without ``replace``. The outcome of each is tallied; the test fails on any other
exception (a traceback for the user) and on a file that loaded with an unsound value.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_kvcache.baselines import Baseline, BaselineRun, BaselineStore, BaselineTrial
from pytest_kvcache.errors import BaselineCorruptError, TestbedMismatchError

KEY = "fuzz/prefill[none-1k-c4]"
TESTBED = {"gpu": "emulated", "backend": "none"}
METRICS = ("median_ttft_ms", "p99_ttft_ms", "mean_e2el_ms", "total_token_throughput", "median_tpot_ms",
           "std_ttft_ms", "failed", "completed", "duration", "p99_arrival_lateness_ms")
POSITIVE = re.compile(r"^((mean|median|p\d+(\.\d+)?)_(ttft|e2el)_ms|(request|output|total_token)_throughput|duration)$")

sound_numbers = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
hostile_values = st.one_of(
    sound_numbers, st.just(0), st.just(0.0), st.just(-0.0), st.floats(max_value=-1e-9), st.just(math.nan),
    st.just(math.inf), st.just(-math.inf), st.text(max_size=8), st.booleans(), st.none(),
    st.just(10**400), st.lists(sound_numbers, max_size=2), st.dictionaries(st.text(max_size=3), sound_numbers,
                                                                           max_size=2))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=6), st.just("\ud800")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _trial(index: int, summary: dict) -> dict:
    return {"index": index, "summary": summary, "ttfts_ms": [1.5, 2.5]}


def _run(i: int, trials: list[dict]) -> dict:
    return {"run_id": f"r{i}", "created": f"2026-11-{i + 1:02d}T00:00:00+00:00", "software": {"v": "1"},
            "commit": None, "trials": trials}


def _document(runs: list[dict]) -> dict:
    return {"schema_version": 2, "key": KEY, "testbed": dict(TESTBED), "runs": runs}


@st.composite
def hostile_documents(draw) -> bytes:
    """A well-formed file whose summaries hold hostile values."""
    runs = []
    for i in range(draw(st.integers(1, 3))):
        trials = [_trial(t, draw(st.dictionaries(st.sampled_from(METRICS), hostile_values, min_size=1, max_size=4)))
                  for t in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):  # a field of its own, kept as it is on the next write
            trials[0]["note"] = draw(json_values)
        runs.append(_run(i, trials))
    return json.dumps(_document(runs), allow_nan=True).encode()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _valid() -> dict:
    return _document([_run(i, [_trial(t, {"median_ttft_ms": 10.0 + t, "failed": 0, "median_tpot_ms": None})
                                for t in range(2)]) for i in range(2)])


@st.composite
def broken_shapes(draw) -> bytes:
    """A valid file with one part replaced by any JSON value, or removed."""
    doc = _valid()
    where = draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = draw(json_values)
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def bad_json(draw) -> bytes:
    """Valid bytes truncated or with one byte changed; deep nesting; random bytes."""
    text = json.dumps(_valid(), indent=1).encode()
    kind = draw(st.sampled_from(["truncate", "flip", "deep", "bytes", "bigint"]))
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1:]
    if kind == "deep":
        depth = draw(st.integers(1000, 200_000))
        return b"[" * depth + b"]" * depth
    if kind == "bigint":
        return text.replace(b"10.0", b"1" * draw(st.integers(4400, 6000)), 1)
    return draw(st.binary(max_size=64))


@st.composite
def huge_files(draw) -> bytes:
    """Many runs of many trials with long TTFT lists (megabytes), sound or with one bad value."""
    n = draw(st.integers(200, 2000))
    trial = _trial(0, {"median_ttft_ms": 12.5, "total_token_throughput": 900.0})
    trial["ttfts_ms"] = [1.25] * n
    runs = [_run(i, [dict(trial, index=t) for t in range(10)]) for i in range(20)]
    if draw(st.booleans()):
        runs[draw(st.integers(0, 19))]["trials"][draw(st.integers(0, 9))]["ttfts_ms"][-1] = draw(
            st.sampled_from([math.nan, -1.0, "x", math.inf]))
    return json.dumps(_document(runs), allow_nan=True).encode()


def _number(value: Any) -> float | None:
    """A finite number >= 0 as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _unsound(baseline: Baseline) -> str | None:
    """What is unsound in a baseline that loaded, else None."""
    for run in baseline.runs:
        for trial in (t.to_json() for t in run.trials):  # as the file will hold it
            if not isinstance(trial.get("summary"), dict):
                return f"{run.run_id} a trial without a summary"
            for name, value in trial["summary"].items():
                if value is not None and (_number(value) is None or (value == 0 and POSITIVE.match(name))):
                    return f"{run.run_id} {name}={value!r}"[:80]
            if not isinstance(trial.get("ttfts_ms", []), list) \
                    or any(_number(value) is None for value in trial.get("ttfts_ms", [])):
                return f"{run.run_id} ttfts_ms"
        for metric in METRICS:
            if any(not (math.isfinite(v) and v > 0) for v in run.values(metric)):
                return f"{run.run_id} values({metric})"
    return None


def check(store: BaselineStore, content: bytes) -> str:
    """Load, then write with and without replace; the outcome's name (see the module)."""
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    try:
        loaded = store.load(KEY)
    except BaselineCorruptError as exc:
        if str(path) not in str(exc):
            return "error without the file"
        for replace in (False, True):
            try:
                store.write(KEY, TESTBED, BaselineRun("new", "2026-12-01"), replace=replace)
            except BaselineCorruptError:
                pass
            else:
                return "corrupt file overwritten"
            if path.read_bytes() != content:
                return "corrupt file changed"
        return "clean error"
    except Exception as exc:  # noqa: BLE001 - what the test exists to find
        return f"traceback: {type(exc).__name__}: {exc}"[:200]
    if _unsound(loaded):
        return f"silently accepted: {_unsound(loaded)}"
    try:
        try:
            store.write(KEY, TESTBED, BaselineRun("new", "2026-12-01",
                                                     trials=(BaselineTrial({"median_ttft_ms": 5.0}, 0, (1.5, 2.5)),)))
        except TestbedMismatchError:
            pass
        store.write(KEY, TESTBED, BaselineRun("new", "2026-12-01"), replace=True)
        return "loaded" if store.load(KEY).runs[0].run_id == "new" else "replace lost"
    except Exception as exc:  # noqa: BLE001 - a file that loads must also take the next run
        return f"traceback on write: {type(exc).__name__}: {exc}"[:200]


@pytest.mark.parametrize("name,strategy,examples", [
    ("hostile values", hostile_documents(), 150),
    ("broken shapes", broken_shapes(), 100),
    ("bad JSON", bad_json(), 60),
    ("huge files", huge_files(), 6),
])
def test_hostile_baseline_files(name: str, strategy, examples: int) -> None:
    tally: Counter[str] = Counter()

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(content=strategy)
    def run(content: bytes) -> None:
        with tempfile.TemporaryDirectory() as root:
            tally[check(BaselineStore(Path(root)), content)] += 1

    run()
    print(f"{name}: {dict(tally)}")
    bad = {k: v for k, v in tally.items() if k not in ("loaded", "clean error")}
    assert not bad, bad
    assert sum(tally.values()) >= min(examples, 50) * 0.9


# ------------------------------------------------------------------ through pytest

SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none]
  input_len: [1k]
  concurrency: [8, 9, 10, 11, 12, 13, 14, 15]
  output_len: [2]
num_prompts: 8
rounds: [cold]
trials: 2
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""


def _stored(key: str, trials: Any = None, version: int = 2, runs: Any = None) -> str:
    trials = trials if trials is not None else [{"index": 0, "summary": {"median_ttft_ms": 20.0}}]
    runs = runs if runs is not None else [{"run_id": "r0", "created": "2026-11-01T00:00:00+00:00", "software": {},
                                           "commit": None, "trials": trials}]
    return json.dumps({"schema_version": version, "key": key, "testbed": {}, "runs": runs}, allow_nan=True)


#: concurrency (none waits for a slot: 8 prompts) -> (hostile file content, what the message must name)
HOSTILE = {
    8: (lambda k: _stored(k, [{"index": 0, "summary": {"median_ttft_ms": math.nan}}]),
        "runs[0].trials[0].summary.median_ttft_ms is NaN"),
    9: (lambda k: _stored(k, [{"index": 0, "summary": {"median_ttft_ms": "fast"}}]),
        "runs[0].trials[0].summary.median_ttft_ms is a string"),
    10: (lambda k: _stored(k, [{"index": 0, "summary": {"median_ttft_ms": -5}}]),
        "runs[0].trials[0].summary.median_ttft_ms is -5, expected a positive number"),
    11: (lambda k: _stored(k, [{"index": 0, "summary": {"median_ttft_ms": 0}}]),
        "runs[0].trials[0].summary.median_ttft_ms is 0"),
    12: (lambda k: _stored(k, 5), "runs[0].trials is int"),
    13: (lambda k: _stored(k, [{"index": 0, "summary": {"median_ttft_ms": 20.0}}, {"index": 1}]),
        "runs[0].trials[1] has no 'summary'"),
    14: (lambda k: _stored(k, runs=[{"run_id": "r0", "trials": []}, [1, 2]]), "runs[1] is a list"),
    15: (lambda k: _stored(k, version=3), "has schema_version 3; this pytest-kvcache"),
}


@pytest.fixture
def hostile_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "hostile.yaml").write_text(SCENARIO)
    for c, (content, _) in HOSTILE.items():
        key = f"hostile/prefill[none-1k-c{c}]"
        path = pytester.path / "baselines" / "hostile" / f"prefill[none-1k-c{c}].json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content(key))
    return pytester


def _files(pytester: pytest.Pytester) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (pytester.path / "baselines").rglob("*.json")}


@pytest.mark.parametrize("update", [[], ["--update-baselines"], ["--reset-baselines"]])
def test_hostile_baselines_through_pytest(hostile_project: pytest.Pytester, update: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # pytest's one-line reasons are cut there: the full ones are counted
    before = _files(hostile_project)
    result = hostile_project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--emulator-profile=fixed", "--kv-server-args=--fixed-ttft-ms 20 --fixed-itl-ms 2",
        f"--kv-results-dir={hostile_project.path / 'out'}", *update, timeout=300)
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text[-3000:]
    result.assert_outcomes(failed=len(HOSTILE))
    assert "Traceback" not in text
    for c, (_, needle) in HOSTILE.items():
        path = hostile_project.path / "baselines" / "hostile" / f"prefill[none-1k-c{c}].json"
        assert f"baseline file {path}" in text and needle in text, needle
    # each reason in full twice: in pytest's failure section and as a note under the verdict
    # table (never chained, which would say it again within one of them)
    if update:
        assert text.count(f"{update[0]} never overwrites a baseline file it cannot read") == 2 * len(HOSTILE)
    newer = hostile_project.path / "baselines" / "hostile" / "prefill[none-1k-c15].json"
    line = next(line for line in text.splitlines() if f"{newer} has schema_version 3" in line)
    assert "corrupt" not in line and "delete" not in line
    assert text.count("the file is left as it is") == 2
    assert _files(hostile_project) == before
