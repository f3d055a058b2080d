"""Every session is remembered: the plugin writes the history store and the run folder's
history.json; a store that cannot be written is one warning and changes no verdict.

PostgreSQL runs for real (the private server of test_history_postgres): two pytest
processes and a ``pytest -n 2`` run write one history at once, and a server stopped in
the middle of a run costs a warning, never a verdict; the run is loaded later.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from helpers.kvproject import make_project, run_pytest

from pytest_kvcache.history import open_history

SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none, cpu]
  input_len: [1k]
  concurrency: [16]
  output_len: [1]
num_prompts: 16
rounds: [cold, warm]
trials: 2
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""
ITEMS = ("small/prefill[none-1k-c16]", "small/prefill[cpu-1k-c16]")


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_pytest(project, "--emulator-profile", "fixed", "--kv-server-args=--fixed-ttft-ms 30", *args)


def history_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_kvcache", "history", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def sessions_in(url: str, rootdir: Path) -> dict[str, set[str]]:
    with open_history(url, rootdir=rootdir, create=False) as store:
        found: dict[str, set[str]] = {}
        for run in store.runs():
            found.setdefault(run.session_id, set()).add(run.item)
        return found


def test_every_session_is_recorded_and_a_broken_store_changes_no_verdict(tmp_path):
    project = make_project(tmp_path / "p", SCENARIO)
    first = _pytest(project, "--update-baselines", "--kv-results-dir=first")
    assert first.returncode == 0, first.stdout + first.stderr
    store = project / ".kvcache" / "history.sqlite"
    recorded = sessions_in(str(store), project)
    assert list(recorded.values()) == [set(ITEMS)]
    doc = json.loads((project / "first" / "history.json").read_text())
    assert [r["item"] for r in doc["runs"]] == list(ITEMS) and all(r["baseline_updated"] for r in doc["runs"])

    store.write_bytes(b"not a database, whatever it was")
    second = _pytest(project, "--kv-results-dir=second", "--kv-run-noise=3%")
    assert second.returncode == 0, second.stdout + second.stderr  # the verdicts stand
    assert "pytest-kvcache: WARNING: history not recorded" in second.stdout
    assert f"python -m pytest_kvcache history import {project / 'second'}" in second.stdout
    assert second.stdout.count("WARNING: history") == 1
    assert store.read_bytes() == b"not a database, whatever it was"  # never repaired or overwritten
    loaded = history_cmd("import", "second", "--to", "later.sqlite", cwd=project)
    assert loaded.returncode == 0, loaded.stderr
    assert list(sessions_in("later.sqlite", project).values()) == [set(ITEMS)]

    off = _pytest(project, "--kv-results-dir=third", "--kv-history=none", "--kv-run-noise=3%")
    assert off.returncode == 0 and "WARNING" not in off.stdout
    assert (project / "third" / "history.json").is_file()  # the run folder still carries its runs


def test_postgres_two_processes_and_xdist_at_once_lose_nothing(tmp_path, pg_url):  # noqa: F811
    projects = [make_project(tmp_path / f"p{i}", SCENARIO) for i in range(3)]
    procs = []
    for i, project in enumerate(projects):
        extra = ["-n", "2"] if i == 2 else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--emulator-profile", "fixed",
             "--update-baselines", f"--kv-history={pg_url}", "--kv-results-dir=out", *extra],
            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    assert not [o for o in outputs if "WARNING" in o]
    recorded = sessions_in(pg_url, tmp_path)
    assert len(recorded) == 3 and all(items == set(ITEMS) for items in recorded.values())
    for project in projects:  # each session's history.json names the same runs the store holds
        runs = json.loads((project / "out" / "history.json").read_text())["runs"]
        assert {r["item"] for r in runs} == recorded[runs[0]["session_id"]]


def test_postgres_stopped_mid_run_is_a_warning_and_the_run_loads_later(tmp_path, postgres, pg_url):  # noqa: F811
    project = make_project(tmp_path / "p", SCENARIO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--emulator-profile", "fixed", "--update-baselines",
         f"--kv-history={pg_url}", "--kv-results-dir=out", "--kv-server-args=--fixed-ttft-ms 300"],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_item = project / "out" / "small" / "prefill[none-1k-c16].json"
        deadline = time.monotonic() + 300
        while not first_item.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a file the run writes, not standing in for behaviour
        assert proc.poll() is None, "the run ended before the server could be stopped"
        postgres.stop()
        output = proc.communicate(timeout=600)[0]
    finally:
        if not (postgres.data / "postmaster.pid").exists():
            postgres.start()
    assert proc.returncode == 0, output[-3000:]  # both items measured and stored: the verdicts stand
    assert "2 passed" in output
    assert output.count("pytest-kvcache: WARNING: history not recorded") == 1
    assert "python -m pytest_kvcache history import" in output
    loaded = history_cmd("import", "out", "--to", pg_url, cwd=project)
    assert loaded.returncode == 0, loaded.stderr
    assert list(sessions_in(pg_url, tmp_path).values()) == [set(ITEMS)]
