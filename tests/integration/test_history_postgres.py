"""The run history on PostgreSQL: a private server started from the installed binaries.

The server runs as the ``postgres`` system user when the tests run as root (initdb refuses
root), in a folder under /tmp that user owns, on a free port of 127.0.0.1 with its unix
socket in that folder; it is stopped and removed at the end. Only a machine without
PostgreSQL binaries skips these tests (``apt-get install postgresql``).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers.history import (
    CHANGE_AT,
    DECODE,
    PREFILL,
    TESTBED,
    expected_keys,
    history_cmd,
    make_run,
    run_writers,
    seeded_runs,
    session_time,
)

from pytest_kvcache.errors import HistoryError
from pytest_kvcache.history import open_history, write_run_file
from pytest_kvcache.history import testbed_id as series_testbed
from helpers.postgres import free_port


def count_session(url: str, session: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM kvcache_item_runs WHERE session_id = %s", (session,)).fetchone()[0]


def test_round_trip_and_idempotence(pg_url, tmp_path):
    runs = [make_run("s1", DECODE, commit=None), make_run("s1", PREFILL),
            make_run("s1", PREFILL, attempt=1, ttft=(120.0,), throughput=(900.0,)),
            make_run("s2", PREFILL, time="2024-05-02T02:00:00+00:00")]
    with open_history(pg_url, rootdir=tmp_path) as store:
        assert store.location == pg_url
        assert store.record(runs[::-1]) == 4
        assert store.record(runs) == 0
        retry = make_run("s2", PREFILL, attempt=1, time="2024-05-02T02:00:00+00:00")
        assert store.record([*runs, retry]) == 1
        assert [r.to_dict() for r in store.runs()] == [r.to_dict() for r in (*runs, retry)]
    with open_history(pg_url.replace("postgresql://", "postgres://"), rootdir=tmp_path) as store:
        assert len(store.runs()) == 5  # the tables were there: opened, not created again


def test_reads_agree_with_sqlite(pg_url, tmp_path):
    runs = [*seeded_runs(), make_run("odd", "seedXdecode/decode[none-1k-c8]"),
            make_run("odd", "seed_decode/100%[x]")]
    with open_history(pg_url, rootdir=tmp_path) as pg, open_history("h.sqlite", rootdir=tmp_path) as lite:
        assert pg.record(runs) == lite.record(runs) == len(runs)
        assert pg.series() == lite.series()
        for glob in ("seed_decode/*", "seed?decode/*", "seed_decode/100%[x]", "*[none-1k-c8]", "seed_prefill/*",
                     "SEED*", "*%*", "*"):
            assert [r.to_dict() for r in pg.runs(item_glob=glob)] == \
                [r.to_dict() for r in lite.runs(item_glob=glob)], glob
        assert len(pg.runs(item_glob="seed_decode/*")) == 31  # "_" is literal: seedXdecode is not matched
        since = pg.runs()[40].time
        from pytest_kvcache.history import parse_time

        assert pg.runs(since=parse_time(since)) == lite.runs(since=parse_time(since))


def test_two_writers_at_once_lose_nothing(pg_url, tmp_path):
    news = run_writers(pg_url, 2, 40, 8, tmp_path)
    keys = expected_keys(2, 40, 8)
    with open_history(pg_url, rootdir=tmp_path) as store:
        assert sorted((r.session_id, r.item) for r in store.runs()) == sorted(keys)
    assert sum(news) == len(keys)


def test_many_writers_at_once_lose_nothing(pg_url, tmp_path):
    news = run_writers(pg_url, 12, 15, 10, tmp_path)  # 6 pairs recording the same sessions, all creating the tables
    keys = expected_keys(12, 15, 10)
    with open_history(pg_url, rootdir=tmp_path) as store:
        assert sorted((r.session_id, r.item) for r in store.runs()) == sorted(keys)
    assert sum(news) == len(keys)


def test_server_stopped_before_record(postgres, pg_url, tmp_path):
    store = open_history(pg_url, rootdir=tmp_path)
    try:
        store.record([make_run("before", time="2024-05-01T02:00:00Z")])
        postgres.stop()
        try:
            with pytest.raises(HistoryError) as down:
                store.record([make_run("while-down"), make_run("while-down", DECODE)])
        finally:
            postgres.start()
        message = str(down.value)
        assert "\n" not in message and pg_url in message and "start the server or fix the URL" in message
        assert count_session(pg_url, "while-down") == 0
        assert store.record([make_run("after", time="2024-05-03T02:00:00Z")]) == 1  # the same store reconnects
    finally:
        store.close()
    assert [r.session_id for r in open_history(pg_url, rootdir=tmp_path).runs()] == ["before", "after"]


def test_server_stopped_mid_record_leaves_nothing_partial(postgres, pg_url, tmp_path):
    import psycopg

    runs = [make_run("big", f"item-{i:05d}") for i in range(15_000)]  # long enough to stop the server during it
    outcome: dict[str, object] = {}
    store = open_history(pg_url, rootdir=tmp_path)  # the tables exist before the record starts

    def record() -> None:
        try:
            outcome["new"] = store.record(runs)
        except HistoryError as exc:
            outcome["error"] = exc
        finally:
            store.close()

    writer = threading.Thread(target=record)
    seen_writing = False
    with psycopg.connect(pg_url, autocommit=True, application_name="watcher") as watcher:
        writer.start()
        deadline = time.monotonic() + 60
        while writer.is_alive() and time.monotonic() < deadline:  # wait until the transaction has written rows
            seen_writing = watcher.execute(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'pytest-kvcache' "
                "AND backend_xid IS NOT NULL AND query LIKE 'INSERT INTO kvcache_item_runs%'").fetchone()[0]
            if seen_writing:
                break
            time.sleep(0.002)
    try:
        postgres.stop()
        writer.join(60)
    finally:
        postgres.start()
    assert seen_writing, "the record finished before the server could be stopped: make the batch larger"
    # stopped a second or so before the insert's end: the record fails, and none of it stays
    message = str(outcome["error"])
    assert "\n" not in message and pg_url in message and "recording 15000 item run(s)" in message
    assert count_session(pg_url, "big") == 0
    with open_history(pg_url, rootdir=tmp_path) as again:  # recorded once the server is back
        assert again.record(runs) == len(runs)


def test_newer_schema_is_refused(pg_url, tmp_path):
    import psycopg

    open_history(pg_url, rootdir=tmp_path).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE kvcache_history_meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(HistoryError, match=r"PostgreSQL database postgresql://.* was written by a newer "
                                           r"pytest-kvcache \(history schema version 7"):
        open_history(pg_url, rootdir=tmp_path)


def test_history_command_on_postgresql(pg_url, tmp_path):
    with open_history(pg_url, rootdir=tmp_path) as store:
        store.record(seeded_runs())
    done = history_cmd(pg_url, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (change,) = json.loads(done.stdout)
    assert (change["item"], change["metric"], change["run"], change["time"]) == (
        PREFILL, "median_ttft_ms", f"session-{CHANGE_AT}", session_time(CHANGE_AT))
    assert change["testbed_id"] == series_testbed(TESTBED) and change["worse"] is True
    assert change["software_after"]["vllm"] == "0.6.2" and change["software_before"]["vllm"] == "0.6.1"
    table = history_cmd(pg_url, "--item", "seed_decode/*", cwd=tmp_path)
    assert table.returncode == 0 and "no change points in 2 series" in table.stdout

    folder = tmp_path / "run-late"
    write_run_file(folder, [make_run("late", PREFILL)])
    imported = history_cmd("import", str(folder), "--to", pg_url, cwd=tmp_path)
    assert imported.returncode == 0 and "1 new item run(s) of 1" in imported.stdout


def test_unreachable_and_empty_servers_are_one_line(postgres, pg_url, tmp_path):
    url = f"postgresql://kv:s3cret@127.0.0.1:{free_port()}/kv"
    done = history_cmd(url, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert "postgresql://kv:***@127.0.0.1" in done.stderr and "s3cret" not in done.stderr
    assert "unreachable" in done.stderr and "start the server or fix the URL" in done.stderr
    empty = history_cmd(pg_url, cwd=tmp_path)  # reading never creates the tables
    assert empty.returncode == 2 and "holds no pytest-kvcache history" in empty.stderr
    assert empty.stderr.count("\n") == 1
