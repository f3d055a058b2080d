"""pytest-xdist: ``pytest -n 2`` gives the same items, results and verdicts as a serial run,
with one gate, one summary table and one set of run files (gathered by the controller)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from helpers.kvproject import make_project, run_pytest

pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e '.[test]')")

# The gate must give the same answer both ways, whatever this machine's noise: the
# compared runs are twice as slow as the baseline (--emulator-slowdown 2), a regression
# every item FAILs on in both runs. The emulator's `fixed` profile (a constant modeled
# TTFT) keeps the trial-to-trial noise small on a busy 2-core machine.
SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none, cpu]
  input_len: [1k]
  concurrency: [16]
  output_len: [1]
num_prompts: 16
rounds: [cold]
trials: 3
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_pytest(project, "-rA", "--emulator-profile", "fixed", *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    project = make_project(tmp_path_factory.mktemp("xdist-project"), SCENARIO)
    base = _pytest(project, "--update-baselines", "--kv-results-dir=base")
    assert base.returncode == 0, base.stdout + base.stderr
    out = {}
    for name, extra in (("serial", []), ("xdist", ["-n", "2"])):
        done = _pytest(project, "--emulator-slowdown", "2", "--kv-run-noise=3%", f"--kv-results-dir={name}",
                       f"--junitxml={name}.xml", *extra)
        out[name] = (done, project / name)
    out["project"] = project
    return out


def _verdicts(folder: Path) -> dict:
    verdicts = {}
    for path in sorted(folder.glob("small/*.json")):
        doc = json.loads(path.read_text())
        verdicts[path.name] = (doc["status"], doc["verdict"]["zone"],
                               [(c["metric"], c["verdict"]["zone"], c["n_baseline"], c["n_current"])
                                for c in doc["verdict"]["comparisons"]], doc["usable_trials"])
    return verdicts


def _table(stdout: str) -> list[tuple[str, str, str]]:
    """item, metric and verdict columns of the summary table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("item ") and "verdict" in line)
    rows = []
    for line in lines[start + 2:]:
        cells = line.split()
        if len(cells) < 3 or not cells[0].startswith("prefill[") or cells[1].endswith(":"):
            break  # the notes under the table start here
        rows.append((cells[0], cells[1], cells[-1]))
    return rows


def test_same_items_results_and_verdicts(runs):
    serial, serial_dir = runs["serial"]
    xdist, xdist_dir = runs["xdist"]
    assert "2 workers [2 items]" in xdist.stdout
    for done in (serial, xdist):
        assert done.returncode == 1, done.stdout + done.stderr  # the regression fails the run
        assert "2 failed" in done.stdout
    assert _verdicts(serial_dir) == _verdicts(xdist_dir)
    assert set(_verdicts(xdist_dir)) == {"prefill[none-1k-c16].json", "prefill[cpu-1k-c16].json"}
    assert all(v[1] == "FAIL" for v in _verdicts(xdist_dir).values())
    # one summary table and one gate line, in collection order, identical both ways
    assert _table(serial.stdout) == _table(xdist.stdout) == [
        ("prefill[none-1k-c16]", "median_ttft_ms", "FAIL"), ("prefill[cpu-1k-c16]", "median_ttft_ms", "FAIL")]
    for done in (serial, xdist):
        assert done.stdout.count("regression gate: FAILED after Holm correction") == 1
    gate = [json.loads((d / "run.json").read_text())["gate"] for d in (serial_dir, xdist_dir)]
    assert gate[0]["failing"] == gate[1]["failing"] == ["prefill[none-1k-c16]: median_ttft_ms",
                                                        "prefill[cpu-1k-c16]: median_ttft_ms"]


def test_one_set_of_run_files_and_a_log_folder_per_worker(runs):
    _, serial_dir = runs["serial"]
    _, xdist_dir = runs["xdist"]
    for d in (serial_dir, xdist_dir):
        for name in ("run.json", "results.csv", "summary.md", "report.html", "plots/pareto.png"):
            assert (d / name).is_file(), (d, name)
    with (serial_dir / "results.csv").open() as a, (xdist_dir / "results.csv").open() as b:
        keys = [[(r["item"], r["iteration"], r["status"], r["verdict"]) for r in csv.DictReader(f)] for f in (a, b)]
    assert keys[0] == keys[1] and len(keys[0]) == 6
    workers = sorted(p.name for p in (xdist_dir / "logs").iterdir())
    assert workers and set(workers) <= {"gw0", "gw1"}  # each worker its own server logs
    assert not list(runs["project"].glob("kvcache-results"))  # the workers used the controller's folder


def test_junit_properties_reach_the_controller(runs):
    import xml.etree.ElementTree as ET

    tree = ET.parse(runs["project"] / "xdist.xml")
    verdicts = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}.get("kvcache.verdict")
                for c in tree.iter("testcase")}
    assert verdicts == {"prefill[none-1k-c16]": "FAIL", "prefill[cpu-1k-c16]": "FAIL"}
