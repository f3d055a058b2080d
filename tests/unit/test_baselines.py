"""Unit tests of pytest_kvcache.baselines (files, locking, testbeds, runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_kvcache.baselines import (
    MAX_RUNS,
    SCHEMA_VERSION,
    Baseline,
    BaselineRun,
    BaselineStore,
    BaselineTrial,
    describe_runs,
    key_to_relpath,
)
from pytest_kvcache.errors import BaselineCorruptError, BaselineError, KVCacheError, TestbedMismatchError
from pytest_kvcache.identity import diff_testbeds

KEY = "seed-prefill/prefill[cpu-10k-c16]"
TESTBED = {"gpu": "1 x NVIDIA H100 80GB HBM3", "model": "Qwen/Qwen3-8B", "backend": "cpu", "workload_hash": "d4e5f6"}


def make_run(i: int, **software: str) -> BaselineRun:
    return BaselineRun(run_id=f"r{i}", created=f"2026-11-{i + 1:02d}T00:00:00+00:00",
                       software=software or {"vllm_version": "0.11.0"}, commit="abc",
                       trials=(BaselineTrial(index=0, summary={"median_ttft_ms": 100.0 + i, "p90_ttft_ms": 120.5},
                                             ttfts_ms=(0.1, 0.2)),
                               BaselineTrial(index=1, summary={"median_ttft_ms": 101.0 + i, "mean_tpot_ms": None})))


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines")


# ------------------------------------------------------------------ paths


def test_path_for_is_readable(store: BaselineStore) -> None:
    assert store.path_for(KEY) == store.root / "seed-prefill" / "prefill[cpu-10k-c16].json"
    assert store.path_for("a/b/c[x,y]") == store.root / "a" / "b" / "c[x,y].json"
    assert store.lock_path_for(KEY).name == ".prefill[cpu-10k-c16].json.lock"


def test_path_for_replaces_unsafe_characters() -> None:
    p = key_to_relpath('s p/a:b*c?"<>|\\d')
    assert p.parts[0] == "s_p"
    assert p.name.startswith("a_b_c______d~") and p.name.endswith(".json")
    # escaping .. and hidden names: nothing leaves the root
    q = key_to_relpath("../../etc/passwd")
    assert ".." not in q.parts and not q.is_absolute()
    assert all(not part.startswith(".") for part in q.parts)
    assert not key_to_relpath("/abs").is_absolute()
    # keys that differ only in replaced characters still get distinct files
    assert key_to_relpath("a b") != key_to_relpath("a_b")
    assert key_to_relpath("a b") != key_to_relpath("a:b")
    with pytest.raises(ValueError):
        key_to_relpath("")


# ------------------------------------------------------------------ round trip


def test_load_missing_is_none(store: BaselineStore) -> None:
    assert store.load(KEY) is None


def test_round_trip(store: BaselineStore) -> None:
    written, dropped = store.write(KEY, TESTBED, make_run(0))
    assert isinstance(written, Baseline) and dropped == ()
    loaded = store.load(KEY)
    assert loaded == written
    assert loaded.key == KEY and loaded.testbed == TESTBED and loaded.runs == (make_run(0),)
    assert loaded.schema_version == SCHEMA_VERSION == 2
    assert loaded.path == store.path_for(KEY)
    text = loaded.path.read_text(encoding="utf-8")
    doc = json.loads(text)
    assert list(doc) == ["schema_version", "key", "testbed", "runs"]
    assert list(doc["runs"][0]) == ["run_id", "created", "software", "commit", "trials"]
    assert text == json.dumps(doc, indent=1) + "\n"  # pretty, indent=1, insertion order


def test_runs_keep_their_trials_grouped(store: BaselineStore) -> None:
    for i in range(3):
        b, _ = store.write(KEY, TESTBED, make_run(i))
    assert [r.run_id for r in b.runs] == ["r0", "r1", "r2"] and b.latest == make_run(2)
    assert b.metric_runs("median_ttft_ms") == [[100.0, 101.0], [101.0, 102.0], [102.0, 103.0]]
    assert b.metric_runs("mean_tpot_ms") == []  # missing and null values are dropped


def test_runs_bound_says_what_it_dropped(store: BaselineStore) -> None:
    for i in range(7):
        _, dropped = store.write(KEY, TESTBED, make_run(i), max_runs=3)
    assert [r.run_id for r in store.load(KEY).runs] == ["r4", "r5", "r6"] and [r.run_id for r in dropped] == ["r3"]
    for i in range(MAX_RUNS + 5):
        b, _ = store.write("other", TESTBED, make_run(i % 28))
    assert len(b.runs) == MAX_RUNS == 20 and b.runs[0].run_id == "r5"
    with pytest.raises(ValueError):
        store.write(KEY, TESTBED, make_run(0), max_runs=0)


def test_replace(store: BaselineStore) -> None:
    store.write(KEY, TESTBED, make_run(0))
    store.write(KEY, TESTBED, make_run(1))
    other = dict(TESTBED, gpu="1 x NVIDIA H200")
    b, dropped = store.write(KEY, other, make_run(2), replace=True)
    assert b.runs == (make_run(2),) and [r.run_id for r in dropped] == ["r0", "r1"]
    assert store.load(KEY).testbed == other


def test_software_is_provenance_not_identity(store: BaselineStore) -> None:
    store.write(KEY, TESTBED, make_run(0, vllm_version="0.11.0"))
    b, _ = store.write(KEY, TESTBED, make_run(1, vllm_version="0.11.1"))  # an upgrade joins the same baseline
    assert [r.software["vllm_version"] for r in b.runs] == ["0.11.0", "0.11.1"]
    assert describe_runs(b.runs) == "2 runs from 2026-11-01 to 2026-11-02 (vllm_version 0.11.0/0.11.1)"
    assert describe_runs(b.runs[:1]) == "1 run on 2026-11-01 (vllm_version 0.11.0)"


def test_bad_arguments(store: BaselineStore) -> None:
    with pytest.raises(TypeError):
        store.write(KEY, {"gpu_count": 1}, make_run(0))  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        store.write(KEY, TESTBED, {"run_id": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        store.write(KEY, TESTBED, BaselineRun("x", "t", trials=(BaselineTrial({"x": float("nan")}),)))
    assert not store.path_for(KEY).exists()


# ------------------------------------------------------------------ testbeds


def test_testbed_diff() -> None:
    stored = {"gpu": "H100", "model": "m", "old_only": "x"}
    current = {"gpu": "H200", "model": "m", "new_only": "y"}
    assert diff_testbeds(stored, current) == [
        "gpu: stored H100, now H200",
        "old_only: stored x, now (absent)",
        "new_only: stored (absent), now y",
    ]
    assert diff_testbeds(TESTBED, dict(TESTBED)) == []


def test_testbed_mismatch(store: BaselineStore) -> None:
    store.write(KEY, TESTBED, make_run(0))
    before = store.path_for(KEY).read_bytes()
    with pytest.raises(TestbedMismatchError) as info:
        store.write(KEY, dict(TESTBED, gpu="2 x NVIDIA H100 80GB HBM3"), make_run(1))
    err = info.value
    assert isinstance(err, BaselineError) and isinstance(err, KVCacheError)
    assert err.differences == ["gpu: stored 1 x NVIDIA H100 80GB HBM3, now 2 x NVIDIA H100 80GB HBM3"]
    assert "another testbed" in str(err) and "--reset-baselines" in str(err) and KEY in str(err)
    assert store.path_for(KEY).read_bytes() == before


def test_schema_1_files_are_read(store: BaselineStore) -> None:
    """A file of the first schema (one fingerprint, software in it) reads as testbed + runs."""
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema_version": 1, "key": KEY, "fingerprint": {
        "fingerprint_version": "1", "gpu": "emulated", "vllm_version": "0.10.1", "endpoint": "http://x:1"},
        "history": [{"created": "2026-11-22T06:41:48+00:00", "plugin_version": "0.1.0", "commit": "99a",
                     "trials": [{"index": 0, "summary": {"median_ttft_ms": 5.0}}]}]}))
    b = store.load(KEY)
    assert b.schema_version == 1
    assert b.testbed == {"measurement_version": "1", "gpu": "emulated"}  # no software, no endpoint
    assert b.runs[0].software == {"vllm_version": "0.10.1"} and b.runs[0].run_id == "2026-11-22T06:41:48+00:00"
    assert b.metric_runs("median_ttft_ms") == [[5.0]]


# ------------------------------------------------------------------ corruption


def _assert_corrupt(store: BaselineStore, content: bytes, needle: str) -> None:
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(BaselineCorruptError) as info:
        store.load(KEY)
    msg = str(info.value)
    assert str(path) in msg and needle in msg
    assert f"git checkout -- {path}" in msg and "--update-baselines" in msg
    for replace in (False, True):
        with pytest.raises(BaselineCorruptError):
            store.write(KEY, TESTBED, make_run(9), replace=replace)
        assert path.read_bytes() == content  # byte-for-byte untouched


def test_truncated_file(store: BaselineStore) -> None:
    store.write(KEY, TESTBED, make_run(0))
    full = store.path_for(KEY).read_bytes()
    _assert_corrupt(store, full[: len(full) // 2], "not valid JSON")


@pytest.mark.parametrize(
    "doc,needle",
    [
        ([], "expected an object"),
        ({"schema_version": 0, "key": KEY, "testbed": {}, "runs": []}, "schema_version 0"),
        ({"schema_version": "2", "key": KEY, "testbed": {}, "runs": []}, "schema_version"),
        ({"schema_version": 2, "key": KEY, "testbed": {}}, "missing field(s) 'runs'"),
        ({"schema_version": 2, "key": KEY, "testbed": [], "runs": []}, "'testbed'"),
        ({"schema_version": 2, "key": KEY, "testbed": {"a": 1}, "runs": []}, "testbed['a']"),
        ({"schema_version": 2, "key": KEY, "testbed": {}, "runs": {}}, "'runs'"),
        ({"schema_version": 2, "key": KEY, "testbed": {}, "runs": [1]}, "runs[0]"),
        ({"schema_version": 2, "key": KEY, "testbed": {}, "runs": [{"trials": [1]}]}, "runs[0].trials"),
        ({"schema_version": 2, "key": KEY, "testbed": {}, "runs": [{"software": {"v": 2}}]}, "runs[0].software"),
        ({"schema_version": 2, "key": "other", "testbed": {}, "runs": []}, "holds key 'other'"),
        ({"schema_version": 2, "key": KEY, "testbed": {}, "runs": [], "x": 1}, "unexpected"),
        ({"schema_version": 1, "key": KEY, "fingerprint": {}, "history": {}}, "'history'"),
    ],
)
def test_wrong_shapes(store: BaselineStore, doc: object, needle: str) -> None:
    _assert_corrupt(store, json.dumps(doc).encode(), needle)


def test_not_utf8(store: BaselineStore) -> None:
    _assert_corrupt(store, b"\xff\xfe{}", "UTF-8")


def _doc_with(trials: object) -> bytes:
    return json.dumps({"schema_version": 2, "key": KEY, "testbed": {}, "runs": [
        {"run_id": "r0", "created": "", "trials": [{"index": 0, "summary": {"median_ttft_ms": 5.0}}]},
        {"run_id": "r1", "created": "", "trials": trials}]}, allow_nan=True).encode()


@pytest.mark.parametrize("trials,needle", [
    ([{"summary": {"median_ttft_ms": "12"}}], "runs[1].trials[0].summary.median_ttft_ms is a string"),
    ([{"summary": {"median_ttft_ms": -3.0}}], "runs[1].trials[0].summary.median_ttft_ms is -3.0"),
    ([{"summary": {"median_ttft_ms": 0}}], "runs[1].trials[0].summary.median_ttft_ms is 0, expected a positive"),
    ([{"summary": {"x": 1}}, {"summary": {"p99_ttft_ms": float("nan")}}],
     "runs[1].trials[1].summary.p99_ttft_ms is NaN"),
    ([{"summary": {"total_token_throughput": float("inf")}}], "summary.total_token_throughput is Infinity"),
    ([{"summary": {"failed": -1}}], "summary.failed is -1, expected a non-negative number"),
    ([{"summary": {"median_ttft_ms": True}}], "summary.median_ttft_ms is a boolean"),
    ([{"summary": {"median_ttft_ms": 10**400}}], "too large"),
    ([{"summary": {"odd name": [1]}}], "runs[1].trials[0].summary['odd name'] is a list"),
    ([{"index": 0}], "runs[1].trials[0] has no 'summary'"),
    ([{"index": -1, "summary": {}}], "runs[1].trials[0].index is -1"),
    ([{"summary": {}, "ttfts_ms": [1.0, float("nan")]}], "runs[1].trials[0].ttfts_ms[1] is NaN"),
    (5, "runs[1].trials is int"),
    ([3], "runs[1].trials[0] is int"),
])
def test_hostile_values_name_their_place(store: BaselineStore, trials: object, needle: str) -> None:
    _assert_corrupt(store, _doc_with(trials), needle)


def test_values_a_real_measurement_can_have_load(store: BaselineStore) -> None:
    """Zeros where a measurement can have them (failures, spreads, coalesced tokens), and null."""
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(_doc_with([{"summary": {"failed": 0, "std_ttft_ms": 0.0, "median_tpot_ms": 0.0,
                                             "median_itl_ms": None, "median_ttft_ms": 7.5}}]))
    assert store.load(KEY).metric_runs("median_ttft_ms") == [[5.0], [7.5]]
    assert store.load(KEY).metric_runs("median_tpot_ms") == []  # 0 never enters a log-scale comparison


def test_newer_schema_says_which_version_this_plugin_reads(store: BaselineStore) -> None:
    from pytest_kvcache import __version__
    from pytest_kvcache.errors import BaselineSchemaError

    content = json.dumps({"schema_version": 3, "key": KEY, "testbed": {}, "runs": []}).encode()
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(BaselineSchemaError) as info:
        store.load(KEY)
    msg = str(info.value)
    assert isinstance(info.value, BaselineCorruptError)  # never overwritten either
    assert f"{path} has schema_version 3" in msg and f"({__version__}) reads schema_version 2" in msg
    assert "corrupt" not in msg and "delete" not in msg and "upgrade" in msg
    for replace in (False, True):
        with pytest.raises(BaselineSchemaError):
            store.write(KEY, TESTBED, make_run(1), replace=replace)
    assert path.read_bytes() == content


def test_write_refuses_what_load_would_refuse(store: BaselineStore) -> None:
    bad = BaselineRun("x", "t", trials=(BaselineTrial({"median_ttft_ms": -1.0}),))
    with pytest.raises(ValueError, match=r"run.trials\[0\].summary.median_ttft_ms is -1.0"):
        store.write(KEY, TESTBED, bad)
    assert not store.path_for(KEY).exists()


def test_written_files_are_readable_by_others(store: BaselineStore) -> None:
    old = os.umask(0o022)
    try:
        store.write(KEY, TESTBED, make_run(0))
        store.write(KEY, TESTBED, make_run(1))  # a replaced file too
        assert store.path_for(KEY).stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        store.write(KEY, TESTBED, make_run(2))
        assert store.path_for(KEY).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# ------------------------------------------------------------------ atomicity


def test_no_temp_files_left(store: BaselineStore) -> None:
    for i in range(5):
        store.write(KEY, TESTBED, make_run(i))
    names = sorted(os.listdir(store.path_for(KEY).parent))
    assert names == [".prefill[cpu-10k-c16].json.lock", "prefill[cpu-10k-c16].json"]


def test_failed_write_leaves_old_file_and_no_temp(store: BaselineStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.write(KEY, TESTBED, make_run(0))
    path = store.path_for(KEY)
    before = path.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write(KEY, TESTBED, make_run(1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(path.parent) if n.endswith(".tmp")]


# ------------------------------------------------------------------ concurrency
