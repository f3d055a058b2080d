import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.history import seeded_runs
from helpers.postgres import PostgresServer, newest_bindir

from pytest_kvcache.history import ItemRun, open_history

#: The client guard's floor for the projects these tests run. They test what the plugin does
#: with a round, on the emulator's millisecond requests, where a client on a shared runner
#: with a busy core hands a slot over late enough to deliver 6.6 of 8 in flight; the guard at
#: its default floor is tested in test_client_floor.py and test_loadgen.py.
TEST_PROJECT_CLIENT_FLOOR = "--kv-client-floor=0.5"


@pytest.fixture(autouse=True)
def _test_project_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """What every pytest run a test starts (pytester or a subprocess) sees.

    pytest prints whole failure reasons in its short summary when CI or BUILD_NUMBER is set;
    tests that count a reason in a run's output expect the laptop's output, where the short
    summary cuts the line at COLUMNS. pytester clears PYTEST_ADDOPTS when it is set up, so a
    test's pytester comes first.
    """
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", TEST_PROJECT_CLIENT_FLOOR)


# The PostgreSQL history store's server, for the store tests and the plugin's runs against it.
@pytest.fixture(scope="module")
def postgres():
    bindir = newest_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    # pytest's tmp_path is private to root (0700): the server user needs a folder of its own
    folder = Path(tempfile.mkdtemp(prefix="kvcache-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = PostgresServer(bindir, folder)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres) -> Iterator[str]:
    """A fresh database on the server for one test."""
    import psycopg

    name = f"kv_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres.url(name)
    if (postgres.data / "postmaster.pid").exists():
        with psycopg.connect(postgres.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# The history store's tests (tests/unit and tests/integration test_history.py).
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
