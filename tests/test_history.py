"""The run history on SQLite: the store, its concurrency, history.json, and the ``history`` command.

Everything real: SQLite files in tmp_path, writer processes, the command in a subprocess.
tests/test_history_postgres.py runs the same store checks on a private PostgreSQL server.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pytest_kvcache.decision import Zone
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
from pytest_kvcache.history import (
    testbed_id as series_testbed,
)

TESTBED = {"gpu": "H100", "model": "llama-8b", "labels": "bandwidth=400Gbps"}
OTHER_TESTBED = {"gpu": "A100", "model": "llama-8b", "labels": "bandwidth=400Gbps"}
PREFILL = "seed_prefill/prefill[cpu-10k-c16]"
DECODE = "seed_decode/decode[none-1k-c8]"
METRICS = (("median_ttft_ms", "lower"), ("total_token_throughput", "higher"))
NOW = datetime.now(timezone.utc).replace(microsecond=0)
CHANGE_AT = 18  # the seeded store's first session after the change
SESSIONS = 30


def make_run(session: str, item: str = PREFILL, *, time: str = "2024-05-01T02:00:00Z", attempt: int = 0,
             ttft: tuple[float, ...] = (100.0, 101.0), throughput: tuple[float, ...] | None = None,
             testbed: dict | None = None, software: dict | None = None, commit: str | None = "a" * 40,
             metrics: tuple = METRICS) -> ItemRun:
    throughput = throughput or tuple(1000.0 - 10 * i for i in range(len(ttft)))  # 1000, 990, ...
    trials = tuple({"index": i, "usable": True, "summary": {"median_ttft_ms": t, "total_token_throughput": x}}
                   for i, (t, x) in enumerate(zip(ttft, throughput, strict=True)))
    return ItemRun(session_id=session, time=time, item=item, attempt=attempt, testbed=testbed or TESTBED,
                   software=software or {"vllm": "0.6.1", "lmcache": "0.1.3"}, commit=commit,
                   baseline_updated=attempt == 0, status="compared", zone=Zone.PASS, metrics=metrics, trials=trials)


def session_time(s: int) -> str:
    return (NOW - timedelta(days=SESSIONS - s)).isoformat().replace("+00:00", "Z")


def seeded_runs() -> list[ItemRun]:
    """30 nightly sessions: PREFILL's TTFT steps up 25% at session 18 with vLLM 0.6.2; its
    throughput, DECODE, and PREFILL on another testbed stay flat (2% noise)."""
    rng = random.Random(7)
    runs = []
    for s in range(SESSIONS):
        software = {"vllm": "0.6.1" if s < CHANGE_AT else "0.6.2", "lmcache": "0.1.3"}
        for session, item, testbed, ttft in (
                (f"session-{s:02d}", PREFILL, TESTBED, 100.0 if s < CHANGE_AT else 125.0),
                (f"session-{s:02d}", DECODE, TESTBED, 40.0),
                (f"runner2-{s:02d}", PREFILL, OTHER_TESTBED, 300.0)):  # another runner's sessions
            runs.append(make_run(session, item, time=session_time(s), testbed=testbed, software=software,
                                 commit=f"{s:02d}" + "c" * 38,
                                 ttft=tuple(ttft * rng.gauss(1, 0.02) for _ in range(5)),
                                 throughput=tuple(1000 * rng.gauss(1, 0.02) for _ in range(5))))
    return runs


def history_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_kvcache", "history", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "history.sqlite"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A project folder whose default store (.kvcache/history.sqlite) holds seeded_runs()."""
    root = tmp_path_factory.mktemp("seeded")
    with open_history(None, rootdir=root) as store:
        by_session: dict[str, list[ItemRun]] = {}
        for run in seeded_runs():
            by_session.setdefault(run.session_id, []).append(run)
        for runs in by_session.values():
            store.record(runs)
    return root


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


def test_a_file_that_is_not_a_history_is_refused_untouched(tmp_path):
    garbage = tmp_path / "random.sqlite"
    garbage.write_bytes(random.Random(1).randbytes(8192))
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.close()
    truncated = tmp_path / "truncated.sqlite"
    with open_history(str(truncated), rootdir=tmp_path) as store:
        store.record([make_run(f"s{i}", ttft=tuple(range(1, 200))) for i in range(50)])
    data = truncated.read_bytes()
    truncated.write_bytes(data[:100] + random.Random(2).randbytes(len(data) - 100))
    for path, what in ((garbage, "not a pytest-kvcache history database or is corrupt"),
                       (foreign, "not a pytest-kvcache history (its tables: orders)"),
                       (truncated, "not a pytest-kvcache history database or is corrupt")):
        before = path.read_bytes()
        with pytest.raises(HistoryError) as bad:
            with open_history(str(path), rootdir=tmp_path) as store:
                store.runs()
        assert str(path) in str(bad.value) and what in str(bad.value), bad.value
        assert path.read_bytes() == before
    done = history_cmd(str(garbage), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"pytest-kvcache history: error: {garbage} is not a pytest-kvcache history")


def test_postgresql_url_without_psycopg_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None\n"  # psycopg not installed, as far as imports go
            "from pathlib import Path\nfrom pytest_kvcache.history import open_history\n"
            "open_history('postgresql://kv@127.0.0.1:1/kv', rootdir=Path('.'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert ('HistoryError: history URL postgresql://kv@127.0.0.1:1/kv needs psycopg 3: pip install '
            '"pytest-kvcache[postgresql]"') in done.stderr


# --- concurrent writers ---------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from pytest_kvcache.decision import Zone
from pytest_kvcache.history import ItemRun, open_history
url, writer, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
new = 0
with open_history(url, rootdir=Path.cwd()) as store:  # a fresh store: the schema is created by whoever is first
    for s in range(SESSIONS):
        # writers 2k and 2k+1 both record sessions "shared-k-s": overlapping sessions, as when an
        # import runs beside the session that wrote the folder
        runs = [ItemRun(session_id=session, time=f"2024-05-01T02:{s % 60:02d}:00Z", item=f"item-{i}", attempt=0,
                        testbed={"gpu": "H100"}, software={"vllm": "0.6.1"}, commit=None, baseline_updated=False,
                        status="compared", zone=Zone.PASS, metrics=(("median_ttft_ms", "lower"),),
                        trials=tuple({"index": t, "usable": True, "summary": {"median_ttft_ms": 100.0 + t}}
                                     for t in range(5)))
                for session in (f"own-{writer}-{s}", f"shared-{writer // 2}-{s}") for i in range(ITEMS)]
        new += store.record(runs)
print(new)
"""


def run_writers(url: str, writers: int, sessions: int, items: int, cwd: Path) -> list[int]:
    go = cwd / f"go-{time.monotonic_ns()}"
    code = WRITER.replace("SESSIONS", str(sessions)).replace("ITEMS", str(items))
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(w), str(go)], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    time.sleep(1.0)  # every interpreter started and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    return [int(out) for out, _ in outs]


def expected_keys(writers: int, sessions: int, items: int) -> set[tuple[str, str]]:
    own = {(f"own-{w}-{s}", f"item-{i}") for w in range(writers) for s in range(sessions) for i in range(items)}
    return own | {(f"shared-{w // 2}-{s}", f"item-{i}") for w in range(writers) for s in range(sessions)
                  for i in range(items)}


def test_concurrent_writers_lose_nothing(tmp_path):
    writers, sessions, items = 6, 25, 8
    store_path = tmp_path / "shared.sqlite"
    news = run_writers(str(store_path), writers, sessions, items, tmp_path)
    keys = expected_keys(writers, sessions, items)
    with open_history(str(store_path), rootdir=tmp_path) as store:
        runs = store.runs()
    assert sorted((r.session_id, r.item) for r in runs) == sorted(keys)  # each once: nothing lost, none doubled
    assert sum(news) == len(keys)  # each row counted new by exactly one writer
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


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
        def recent(last: int, testbeds=(series_testbed(TESTBED),), items=(PREFILL, DECODE)):
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

def test_history_json_reports_the_change_at_its_run(seeded):
    done = history_cmd("--json", cwd=seeded)  # the default store: ./.kvcache/history.sqlite
    assert done.returncode == 0, done.stderr
    (change,) = json.loads(done.stdout)
    with open_history(None, rootdir=seeded, create=False) as store:
        (series,) = store.series(item_glob=PREFILL, testbed_id=series_testbed(TESTBED), metrics={"median_ttft_ms"})
    values = series.values
    assert change["item"] == PREFILL and change["metric"] == "median_ttft_ms"
    assert change["testbed_id"] == series_testbed(TESTBED)
    assert change["run"] == f"session-{CHANGE_AT}" and change["time"] == session_time(CHANGE_AT)
    assert change["before"] == pytest.approx(sum(values[:CHANGE_AT]) / CHANGE_AT)
    assert change["after"] == pytest.approx(sum(values[CHANGE_AT:]) / (SESSIONS - CHANGE_AT))
    assert change["change_pct"] == pytest.approx(100 * (change["after"] / change["before"] - 1))
    assert 22 < change["change_pct"] < 28 and change["p"] < 1e-6
    assert change["direction"] == "lower" and change["worse"] is True
    assert change["software_before"] == {"vllm": "0.6.1", "lmcache": "0.1.3"}
    assert change["software_after"] == {"vllm": "0.6.2", "lmcache": "0.1.3"}
    assert change["commit_before"] == f"{CHANGE_AT - 1:02d}" + "c" * 38
    assert change["commit_after"] == f"{CHANGE_AT:02d}" + "c" * 38


def test_history_table(seeded):
    done = history_cmd(cwd=seeded)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "6 series of 2 item(s)" in out and "1 change point(s) in 1 of 6 series, 1 for the worse" in out
    lines = out.splitlines()
    row = next(line for line in lines if f"session-{CHANGE_AT}" in line)
    assert lines[lines.index(row) - 3] == PREFILL  # grouped under its item
    for text in ("median_ttft_ms", series_testbed(TESTBED), "(worse, lower is better)", "vllm 0.6.1 -> 0.6.2",
                 f"{CHANGE_AT - 1:02d}cccccccccc -> {CHANGE_AT:02d}cccccccccc",
                 session_time(CHANGE_AT)[:16].replace("T", " ")):
        assert text in row, text
    assert "lmcache" not in row  # only what changed
    flat = history_cmd("--item", "seed_decode/*", cwd=seeded)
    assert flat.returncode == 0 and "no change points in 2 series" in flat.stdout


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


def test_history_plots(seeded, tmp_path):
    done = history_cmd("--plot", str(tmp_path / "plots"), cwd=seeded)
    assert done.returncode == 0, done.stderr
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 6 and f"wrote 6 plot(s) to {tmp_path / 'plots'}" in done.stdout
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert "[" not in png.name and "/" not in png.name
    assert any(p.name.startswith("seed_prefill_prefill_cpu-10k-c16") and "median_ttft_ms" in p.name for p in pngs)


def test_history_import(tmp_path):
    runs = seeded_runs()
    folders = []
    for s in (3, 4):
        folder = tmp_path / "kvcache-results" / f"run-{s}"
        write_run_file(folder, [r for r in runs if r.session_id == f"session-{s:02d}"])  # 2 items each
        folders.append(str(folder))

    def import_(*args: str) -> subprocess.CompletedProcess:
        return history_cmd("import", *args, cwd=tmp_path)

    done = import_(*folders)
    assert done.returncode == 0, done.stderr
    assert f"4 new item run(s) of 4 from 2 run folder(s) into {tmp_path / '.kvcache' / 'history.sqlite'}" \
        in done.stdout
    again = import_(folders[0], "--to", "sqlite:///.kvcache/history.sqlite")
    assert again.returncode == 0 and "0 new item run(s) of 2 from 1 run folder(s)" in again.stdout
    with open_history(None, rootdir=tmp_path) as store:
        assert sorted({r.session_id for r in store.runs()}) == ["session-03", "session-04"]
    other = import_(folders[1], "--to", str(tmp_path / "other.sqlite"))
    assert other.returncode == 0 and "2 new item run(s)" in other.stdout

    bad = tmp_path / "bad-run"
    bad.mkdir()
    (bad / HISTORY_FILE_NAME).write_text("[1, 2")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for args, text in (((str(tmp_path / "missing"),), f"run folder {tmp_path / 'missing'} does not exist"),
                       ((str(empty),), f"{empty / HISTORY_FILE_NAME} not found"),
                       ((folders[0], str(bad)), f"{bad / HISTORY_FILE_NAME} is not valid JSON")):
        failed = import_(*args, "--to", str(tmp_path / "untouched.sqlite"))
        assert failed.returncode == 2 and failed.stdout == "", failed.stdout
        assert failed.stderr.startswith("pytest-kvcache history import: error: ") and text in failed.stderr
        assert failed.stderr.count("\n") == 1
    assert not (tmp_path / "untouched.sqlite").exists()  # every file is checked before the store is opened


@pytest.mark.parametrize("args, text", [
    (("ftp://host/h.sqlite",), "unknown scheme 'ftp'"),
    (("none",), "turns the history off"),
    (("missing.sqlite",), "no history database at"),
    ((), "no history database at"),
])
def test_history_errors_are_one_line(tmp_path, args, text):
    done = history_cmd(*args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("pytest-kvcache history: error: ") and text in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / ".kvcache").exists()


@pytest.mark.parametrize("args", [("--since", "yesterday"), ("--max-p", "2"), ("--min-change", "-1")])
def test_history_bad_options(tmp_path, args):
    done = history_cmd(*args, cwd=tmp_path)
    assert done.returncode == 2 and f"argument {args[0]}" in done.stderr and args[1] in done.stderr


def test_store_is_closed_by_its_context(store_path):
    with open_history(str(store_path), rootdir=store_path.parent) as store:
        store.record([make_run("s1")])
    with pytest.raises(HistoryError):
        store.runs()
