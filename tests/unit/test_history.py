"""The run history on SQLite: the store, its concurrency, history.json, and the ``history`` command.

In-process: SQLite files in tmp_path; tests/integration/test_history.py has the writer
processes and the command in a subprocess.
tests/integration/test_history_postgres.py runs the same store checks on a private PostgreSQL server.
"""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_kvcache.errors import HistoryError, KVCacheError
from pytest_kvcache.history import (
    HISTORY_FILE_NAME,
    HISTORY_FILE_SCHEMA_VERSION,
    ItemRun,
    load_run_folder,
    open_history,
    recent_change_points,
    write_run_file,
)
from pytest_kvcache.history import testbed_id as series_testbed
from helpers.history import (
    CHANGE_AT,
    DECODE,
    OTHER_TESTBED,
    PREFILL,
    SESSIONS,
    TESTBED,
    make_run,
    session_time,
)


# --- the store ---------------------------------------------------------------------------

def test_round_trip_keeps_every_field(store_path):
    # in the order runs() gives: time, session, item, attempt
    runs = [make_run("s1", DECODE, commit=None), make_run("s1", PREFILL),
            make_run("s1", PREFILL, attempt=1, ttft=(120.0,), throughput=(900.0,)),
            make_run("s2", PREFILL, time="2024-05-02T02:00:00+00:00")]
    with open_history(str(store_path), rootdir=Path("/nonexistent")) as store:
        assert store.record(runs[::-1]) == 4
        assert [r.to_dict() for r in store.runs()] == [r.to_dict() for r in runs]
    with open_history(f"sqlite:///{store_path}", rootdir=Path("/nonexistent")) as store:  # absolute: 4 slashes
        assert [r.to_dict() for r in store.runs()] == [r.to_dict() for r in runs]


def test_non_finite_values_are_stored_as_null(store_path):
    run = make_run("s1", ttft=(100.0, math.nan, math.inf), throughput=(1.0, 2.0, 3.0))
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record([run])
        (back,) = store.runs()
    assert [t["summary"]["median_ttft_ms"] for t in back.trials] == [100.0, None, None]
    assert back.usable_values("median_ttft_ms") == [100.0]


def test_record_is_idempotent_and_counts_new_runs(store_path):
    first = [make_run("s1"), make_run("s1", DECODE)]
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        assert store.record(first) == 2
        assert store.record(first) == 0
        assert store.record([]) == 0
        # a later confirmation attempt of the same session, beside the runs already there
        assert store.record([*first, make_run("s1", attempt=1)]) == 1
        changed = make_run("s1", ttft=(999.0,))  # same key, other values: the first record stands
        assert store.record([changed]) == 0
        assert len(store.runs()) == 3
        assert store.runs(items=[PREFILL])[0].usable_values("median_ttft_ms") == [100.0, 101.0]


def test_series_point_is_the_geometric_mean_of_all_attempts(store_path):
    s1 = make_run("s1", ttft=(100.0, 400.0), software={"vllm": "0.6.1"}, commit="first")
    unusable = {"index": 9, "usable": False, "summary": {"median_ttft_ms": 1e6, "total_token_throughput": 1.0}}
    s1_retry = make_run("s1", attempt=1, ttft=(200.0,), software={"vllm": "other"}, commit="second")
    s1_retry = ItemRun.from_dict({**s1_retry.to_dict(), "trials": [*s1_retry.to_dict()["trials"], unusable]})
    s2 = make_run("s2", time="2024-05-02T02:00:00Z", ttft=(50.0, 50.0))
    only_ttft = make_run("s3", time="2024-05-03T02:00:00Z", metrics=(("median_ttft_ms", "lower"),))
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record([s1_retry, s2, s1, only_ttft])
        series = store.series()
    assert [(s.item, s.metric, s.direction) for s in series] == [
        (PREFILL, "median_ttft_ms", "lower"), (PREFILL, "total_token_throughput", "higher")]
    ttft, throughput = series
    assert [p.session_id for p in ttft.points] == ["s1", "s2", "s3"]
    first = ttft.points[0]
    assert first.value == pytest.approx(200.0)  # (100 * 400 * 200) ** (1/3); the unusable 1e6 left out
    assert (first.trials, first.software, first.commit, first.time) == (3, {"vllm": "0.6.1"}, "first",
                                                                         "2024-05-01T02:00:00Z")
    assert ttft.values[1:] == pytest.approx([50.0, math.sqrt(100.0 * 101.0)])
    # s3 judged TTFT only: no throughput point from it, though its trials carry the figure
    assert [p.session_id for p in throughput.points] == ["s1", "s2"]
    assert throughput.points[0].value == pytest.approx((1000.0 * 990.0 * 1000.0) ** (1 / 3))
    assert ttft.testbed == TESTBED and ttft.testbed_id == series_testbed(TESTBED)


def test_testbeds_are_separate_series(store_path):
    runs = [make_run(f"s{i}", time=f"2024-05-0{i + 1}T02:00:00Z", testbed=tb, ttft=(v,))
            for i, (tb, v) in enumerate(((TESTBED, 100.0), (OTHER_TESTBED, 300.0), (TESTBED, 110.0)))]
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record(runs)
        series = store.series(metrics={"median_ttft_ms"})
        assert [(s.testbed_id, s.testbed) for s in series] == sorted(
            [(series_testbed(TESTBED), TESTBED), (series_testbed(OTHER_TESTBED), OTHER_TESTBED)])
        values = {s.testbed_id: s.values for s in series}
        assert values[series_testbed(TESTBED)] == pytest.approx([100.0, 110.0])
        assert values[series_testbed(OTHER_TESTBED)] == pytest.approx([300.0])
        assert [r.session_id for r in store.runs(testbed_id=series_testbed(OTHER_TESTBED))] == ["s1"]


def test_runs_filters(store_path):
    runs = [make_run("old", time="2024-05-01T02:00:00Z"), make_run("new", time="2024-05-03T02:00:00+02:00"),
            make_run("new", DECODE, time="2024-05-03T02:00:00+02:00"),
            make_run("new", "seed_prefill/prefill[disk-10k-c16]", time="2024-05-03T02:00:00+02:00")]
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record(runs)

        def items(**kw) -> list[tuple[str, str]]:
            return [(r.session_id, r.item) for r in store.runs(**kw)]

        # brackets are literal; * and ? are the only wildcards
        assert items(item_glob=PREFILL) == [("old", PREFILL), ("new", PREFILL)]
        assert items(item_glob="seed_prefill/prefill[?isk-*") == [("new", "seed_prefill/prefill[disk-10k-c16]")]
        assert items(item_glob="seed_decode/*") == [("new", DECODE)]
        assert items(item_glob="SEED_DECODE/*") == []  # case counts, as in PostgreSQL
        assert items(item_glob="seed_prefill/prefill[c]*") == []
        # 2024-05-03T02:00+02:00 is 00:00 UTC: since compares instants, not text
        assert {s for s, _ in items(since=datetime(2024, 5, 3, 0, 0, tzinfo=timezone.utc))} == {"new"}
        assert items(since=datetime(2024, 5, 3, 0, 1, tzinfo=timezone.utc)) == []
        assert items(items=[DECODE, "no such item"]) == [("new", DECODE)]
        assert items(items=[]) == []


def test_bad_time_is_refused_before_writing(store_path):
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        with pytest.raises(HistoryError, match=r"'s2'.*'yesterday' is not ISO 8601"):
            store.record([make_run("s1"), make_run("s2", time="yesterday")])
        assert store.runs() == []


# --- opening: URLs, schema versions, files that are not a history -----------------------------

def test_urls(tmp_path):
    store = open_history(None, rootdir=tmp_path)
    assert store is not None and Path(store.location) == tmp_path / ".kvcache" / "history.sqlite"
    store.close()
    assert (tmp_path / ".kvcache" / "history.sqlite").is_file()
    for url, where in (("sqlite:///rel/h.sqlite", tmp_path / "rel" / "h.sqlite"),
                       (f"sqlite:///{tmp_path}/abs.sqlite", tmp_path / "abs.sqlite"),
                       ("plain.sqlite", tmp_path / "plain.sqlite"),
                       (str(tmp_path / "sub" / "x.db"), tmp_path / "sub" / "x.db")):
        with open_history(url, rootdir=tmp_path) as store:
            assert Path(store.location) == where, url
        assert where.is_file(), url
    assert open_history("none", rootdir=tmp_path) is None
    assert open_history("NONE", rootdir=tmp_path) is None
    with pytest.raises(HistoryError) as bad:
        open_history("mysql://me:secret@db/kv", rootdir=tmp_path)
    message = str(bad.value)
    assert "mysql://me:***@db/kv" in message and "secret" not in message
    assert "sqlite:///PATH" in message and "postgresql://" in message and "none" in message
    with pytest.raises(HistoryError, match="sqlite:///PATH"):
        open_history("sqlite://host/x.sqlite", rootdir=tmp_path)
    with pytest.raises(HistoryError, match="is empty"):
        open_history("  ", rootdir=tmp_path)
    assert issubclass(HistoryError, KVCacheError)


def test_reading_never_creates_a_store(tmp_path):
    with pytest.raises(HistoryError, match=r"no history database at .*missing\.sqlite"):
        open_history("missing.sqlite", rootdir=tmp_path, create=False)
    assert not (tmp_path / "missing.sqlite").exists()


def set_schema_version(path: Path, version: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE kvcache_history_meta SET value = ? WHERE key = 'schema_version'", (version,))
    conn.close()


def test_newer_schema_is_refused_older_too(store_path):
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record([make_run("s1")])
    set_schema_version(store_path, "2")
    with pytest.raises(HistoryError) as newer:
        open_history(str(store_path), rootdir=store_path.parent)
    assert str(store_path) in str(newer.value) and "newer pytest-kvcache" in str(newer.value)
    assert "pip install -U pytest-kvcache" in str(newer.value)
    set_schema_version(store_path, "0")
    with pytest.raises(HistoryError, match=r"schema version 0, older than any"):
        open_history(str(store_path), rootdir=store_path.parent)


# --- history.json in run folders --------------------------------------------------------------

def test_run_file_round_trip(tmp_path):
    runs = [make_run("s1", ttft=(100.0, math.nan)), make_run("s1", DECODE, attempt=1)]
    path = write_run_file(tmp_path / "run", runs)
    assert path == tmp_path / "run" / HISTORY_FILE_NAME
    data = json.loads(path.read_text())
    assert data["schema_version"] == HISTORY_FILE_SCHEMA_VERSION
    back = load_run_folder(tmp_path / "run")
    assert [r.item for r in back] == [PREFILL, DECODE]
    assert back[0].trials[1]["summary"]["median_ttft_ms"] is None  # NaN is not JSON
    assert back[1].to_dict() == runs[1].to_dict()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [HISTORY_FILE_NAME]  # no temporary left


@pytest.mark.parametrize("content, problem", [
    (None, "history.json not found"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"runs": []}), "not a pytest-kvcache history file"),
    (json.dumps({"schema_version": 99, "runs": []}), "newer pytest-kvcache"),
    (json.dumps({"schema_version": 1, "runs": [{"session_id": "s"}]}), r"runs\[0\]: field 'metrics' is None"),
    (json.dumps({"schema_version": 1, "runs": [{**make_run("s").to_dict(), "time": "noon"}]}), r"runs\[0\]: "),
])
def test_bad_run_file_is_named(tmp_path, content, problem):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / HISTORY_FILE_NAME).write_text(content)
    with pytest.raises(HistoryError, match=problem) as bad:
        load_run_folder(run_dir)
    assert str(run_dir) in str(bad.value)


# --- change points of the last sessions ---------------------------------------------------------

def test_recent_change_points(seeded):
    with open_history(None, rootdir=seeded, create=False) as store:
        own = (series_testbed(TESTBED),)

        def recent(last: int, testbeds=own, items=(PREFILL, DECODE)):
            return recent_change_points(store, items, testbeds, last=last, max_p=0.001)

        assert recent(SESSIONS - CHANGE_AT - 1) == []  # the change is older than the window
        (change,) = recent(SESSIONS - CHANGE_AT)
        assert (change.item, change.metric, change.run, change.index) == (
            PREFILL, "median_ttft_ms", f"session-{CHANGE_AT}", CHANGE_AT)
        assert change.worse and change.software_after == {"vllm": "0.6.2", "lmcache": "0.1.3"}
        assert recent(SESSIONS, testbeds=(series_testbed(OTHER_TESTBED),)) == []
        assert recent(SESSIONS, items=(DECODE,)) == []
        with pytest.raises(ValueError, match="last=0"):
            recent(0)


# --- the history command ------------------------------------------------------------------------


def test_history_filters(seeded, capsys):
    from pytest_kvcache.__main__ import main  # in this process: scipy is imported once for all the calls

    store = str(seeded / ".kvcache" / "history.sqlite")

    def changes(*args: str) -> list[dict]:
        assert main(["history", store, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    assert changes("--metric", "total_token_throughput") == []
    assert [c["metric"] for c in changes("--metric", "median_ttft_ms", "--metric", "x")] == ["median_ttft_ms"]
    assert changes("--item", "seed_decode/*") == []
    assert [c["item"] for c in changes("--item", "seed_prefill/prefill[cpu-*")] == [PREFILL]
    # since: the series starts later, the change keeps its run
    (late,) = changes("--since", "15.5d")  # sessions 15 to 29
    assert late["run"] == f"session-{CHANGE_AT}" and late["index"] == CHANGE_AT - 15
    (iso,) = changes("--since", session_time(15))
    assert iso == late
    assert changes("--since", "10d") == []  # every session after the change: no change left
    assert changes("--min-change", "30") == []
    assert main(["history", store, "--item", "nothing*"]) == 0
    assert "no series" in capsys.readouterr().out


def test_store_is_closed_by_its_context(store_path):
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record([make_run("s1")])
    with pytest.raises(HistoryError):
        store.runs()
