"""``python -m pytest_kvcache compare`` over three run folders with different labels."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.kvproject import make_project, run_pytest

from pytest_kvcache.report.rows import SEED_COLUMNS

SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none, cpu]
  input_len: [1k]
  concurrency: [8]
  output_len: [1]
num_prompts: 8
rounds: [cold, warm]
trials: 2
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""
RUNS = {  # run folder -> labels, as three runners of a network comparison would set them
    "run-400g-ew": ("bandwidth=400Gbps", "direction=east-west", "arcc=off"),
    "run-800g-ew": ("bandwidth=800Gbps", "direction=east-west", "arcc=on"),
    "run-800g-ns": ("bandwidth=800Gbps", "direction=north-south", "arcc=on"),
}
ITEMS = ("prefill[none-1k-c8]", "prefill[cpu-1k-c8]")


def compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_kvcache", "compare", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("compare-project"), SCENARIO)
    for name, labels in RUNS.items():
        args = [a for label in labels for a in ("--kv-label", label)]
        done = run_pytest(project, "-p", "no:benchmark", f"--kv-results-dir=kvcache-results/{name}", *args)
        assert done.returncode in (0, 1), done.stdout + done.stderr  # skipped: no baseline; never an error
        assert (project / "kvcache-results" / name / "run.json").is_file(), done.stdout
    return project


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def brute_force_frontier(rows: list[dict]) -> set[tuple[str, str]]:
    pts = [(r["folder"], r["item"], float(r["mean_ttft_ms"]), float(r["total_token_throughput"])) for r in rows]
    return {(f, i) for f, i, x, y in pts
            if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for _, _, x2, y2 in pts)}


def test_three_runs_one_row_per_item_and_run_and_the_frontier(results):
    done = compare("kvcache-results", "-o", "cmp", cwd=results)  # a folder of run folders
    assert done.returncode == 0, done.stderr
    rows = read_csv(results / "cmp" / "compare.csv")
    assert tuple(rows[0])[:len(SEED_COLUMNS)] == SEED_COLUMNS
    assert sorted((r["folder"], r["item"]) for r in rows) == sorted((run, i) for run in RUNS for i in ITEMS)
    by_run = {r["folder"]: (r["bandwidth"], r["direction"], r["arcc"]) for r in rows}
    assert by_run == {name: tuple(label.split("=")[1] for label in labels) for name, labels in RUNS.items()}
    frontier = read_csv(results / "cmp" / "pareto_frontier.csv")
    assert {(r["folder"], r["item"]) for r in frontier} == brute_force_frontier(rows)
    assert "Pareto frontier (mean_ttft_ms lower is better" in done.stdout
    for r in frontier:  # printed, one line each
        assert any(r["folder"] in line and r["item"] in line for line in done.stdout.splitlines())
    for png in ("ttft_vs_input_len.png", "throughput_vs_input_len.png", "pareto.png", "network.png"):
        assert (results / "cmp" / png).stat().st_size > 10_000, png


def test_per_trial_rows_and_filters(results):
    runs = [f"kvcache-results/{name}" for name in RUNS]
    done = compare(*runs, "-o", "cmp-trial", "--per-trial", "--bandwidth", "800gbps", "--backend", "cpu",
                   "--input-len", "1k", "--phase", "prefill", "--modality", "CPU", "--arcc", "on", cwd=results)
    assert done.returncode == 0, done.stderr
    rows = read_csv(results / "cmp-trial" / "compare.csv")
    assert sorted((r["folder"], r["iteration"]) for r in rows) == [
        ("run-800g-ew", "1"), ("run-800g-ew", "2"), ("run-800g-ns", "1"), ("run-800g-ns", "2")]
    assert {r["kvcache"] for r in rows} == {"cpu"}
    frontier = read_csv(results / "cmp-trial" / "pareto_frontier.csv")
    assert {(r["folder"], r["item"], r["iteration"]) for r in frontier} == _frontier_trials(rows)


def _frontier_trials(rows: list[dict]) -> set[tuple[str, str, str]]:
    keyed = [dict(r, item=f"{r['item']}#{r['iteration']}") for r in rows]
    return {(f, i.split("#")[0], i.split("#")[1]) for f, i in brute_force_frontier(keyed)}


def test_direction_filter_keeps_one_run(results):
    done = compare("kvcache-results", "-o", "cmp-ns", "--direction", "north-south", "--no-plots", cwd=results)
    assert done.returncode == 0, done.stderr
    assert {r["folder"] for r in read_csv(results / "cmp-ns" / "compare.csv")} == {"run-800g-ns"}
    assert not (results / "cmp-ns" / "pareto.png").exists()


@pytest.mark.parametrize("args,code,message", [
    (["nowhere"], 2, "pytest-kvcache compare: error: nowhere: no such folder"),
    (["scenarios"], 2, "scenarios: no pytest-kvcache results here"),
    (["kvcache-results", "--backend", "gds"], 1, "no rows match the filters (--backend gds)"),
    (["kvcache-results", "--input-len", "ten"], 2, "argument --input-len: 'ten': use an integer"),
    (["kvcache-results", "--x", "colour"], 2, "--x/--y 'colour' is not a CSV column"),
    ([], 2, "the following arguments are required: DIR"),
])
def test_clear_errors(results, args, code, message):
    done = compare(*args, "-o", "cmp-err", cwd=results)
    assert done.returncode == code
    assert message in done.stderr


def test_a_broken_item_file_is_named(results, tmp_path):
    run = tmp_path / "run"
    (run / "small").mkdir(parents=True)
    (run / "small" / "prefill[cpu-1k-c8].json").write_text('{"schema_version": 1, ')
    done = compare(str(run), "-o", str(tmp_path / "o"), cwd=results)
    assert done.returncode == 2
    assert "no pytest-kvcache results here" in done.stderr  # not even one readable item file
    (run / "run.json").write_text('{"items": [], "item_files": ["small/prefill[cpu-1k-c8].json"]}')
    done = compare(str(run), "-o", str(tmp_path / "o"), cwd=results)
    assert done.returncode == 2
    assert f"{run}/small/prefill[cpu-1k-c8].json: not valid JSON" in done.stderr
