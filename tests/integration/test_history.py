"""The run history on SQLite: the store, its concurrency, history.json, and the ``history`` command.

Everything real: SQLite files in tmp_path, writer processes, the command in a subprocess.
tests/integration/test_history_postgres.py runs the same store checks on a private PostgreSQL server.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys

import pytest

from pytest_kvcache.errors import HistoryError
from pytest_kvcache.history import (
    HISTORY_FILE_NAME,
    open_history,
    write_run_file,
)
from pytest_kvcache.history import testbed_id as series_testbed
from helpers.history import (
    CHANGE_AT,
    PREFILL,
    SESSIONS,
    TESTBED,
    expected_keys,
    history_cmd,
    make_run,
    run_writers,
    seeded_runs,
    session_time,
)


# --- opening: URLs, schema versions, files that are not a history -----------------------------


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
