"""The report's pure parts: Pareto frontier, rows, filters, errors naming files, markdown, header."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from pytest_kvcache.report import rows as R
from pytest_kvcache.report.markdown import md_table
from pytest_kvcache.report.terminal import header_lines


def brute_force_frontier(points: list[dict], x: str, y: str) -> list[dict]:
    """O(n^2): a point is on the frontier if no other is at least as good in both and better in one."""
    def dominates(a, b):
        return a[x] <= b[x] and a[y] >= b[y] and (a[x] < b[x] or a[y] > b[y])
    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


@pytest.mark.parametrize("seed", range(30))
def test_pareto_frontier_matches_brute_force(seed):
    rng = random.Random(seed)
    # small integer grids make ties and exact duplicates common
    points = [{"id": i, "mean_ttft_ms": rng.randint(0, 12), "total_token_throughput": rng.randint(0, 12)}
              for i in range(rng.randint(1, 40))]
    got = R.pareto_frontier(points)
    want = brute_force_frontier(points, "mean_ttft_ms", "total_token_throughput")
    assert sorted(p["id"] for p in got) == sorted(p["id"] for p in want)
    assert [p["mean_ttft_ms"] for p in got] == sorted(p["mean_ttft_ms"] for p in got)


def test_pareto_frontier_skips_rows_without_figures():
    rows = [{"mean_ttft_ms": None, "total_token_throughput": 9.0}, {"mean_ttft_ms": 1.0, "total_token_throughput": 1.0},
            {"mean_ttft_ms": float("nan"), "total_token_throughput": 99.0}]
    assert R.pareto_frontier(rows) == [rows[1]]


def test_modality_mapping_and_label_override():
    assert [R.modality(b) for b in ("none", "cpu", "disk", "gds")] == ["HBM", "CPU", "Local Disk", "GDS"]
    assert R.modality("disk", {"modality": "NVMe-oF"}) == "NVMe-oF"


def test_filters_ignore_case_and_parse_token_counts():
    rows = [{"modality": "Local Disk", "input_len": 10000, "kvcache": "disk"},
            {"modality": "GDS", "input_len": 1000, "kvcache": "gds"}]
    assert R.filter_rows(rows, {"modality": ["local disk"]}) == [rows[0]]
    assert R.filter_rows(rows, {"input_len": ["1k", "100k"]}) == [rows[1]]
    assert R.filter_rows(rows, {"kvcache": ["gds"], "input_len": ["10k"]}) == []
    assert R.filter_rows(rows, {"kvcache": []}) == rows


def _doc(item="prefill[cpu-1k-c16]", **extra):
    doc = {"schema_version": 1, "item": f"scenarios/s.yaml::{item}", "status": "measured",
           "mean_ttft_ms": 10.0, "total_token_throughput": 100.0, "usable_trials": 1,
           "scenario": {"file": "/x/scenarios/s.yaml", "phase": "prefill", "backend": "cpu", "input_len": 1000,
                        "concurrency": 16, "output_len": 1, "num_prompts": 4, "measure_round": "warm"},
           "server": {"server": "emulator", "label.bandwidth": "800Gbps", "label.rack": "r7"},
           "trials": [{"index": 0, "usable": True, "rounds": {"cold": {"mean_ttft_ms": 50.0},
                                                              "warm": {"mean_ttft_ms": 11.0, "std_ttft_ms": 1.0}}}],
           "verdict": {"zone": None}}
    doc.update(extra)
    return doc


def test_rows_per_trial_and_per_item(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.json").write_text(json.dumps(_doc()))
    (tmp_path / "s" / "other.json").write_text(json.dumps({"benchmarks": []}))  # not ours: ignored
    run = R.load_run(tmp_path)
    [trial] = R.item_rows(run, per_trial=True)
    assert trial["iteration"] == 1 and trial["mean_ttft_ms"] == 11.0 and trial["std_ttft_ms"] == 1.0
    assert trial["bandwidth"] == "800Gbps" and trial["labels"] == "rack=r7" and trial["modality"] == "CPU"
    [item] = R.item_rows(run, per_trial=False)
    assert item["iteration"] == "" and item["mean_ttft_ms"] == 10.0 and item["file"] == "s/a.json"
    path = R.write_csv([trial], tmp_path / "x.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header[:14]) == R.SEED_COLUMNS


def test_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(R.ResultsError, match=r"/nowhere: no such folder"):
        R.find_runs([tmp_path / "nowhere"])
    with pytest.raises(R.ResultsError, match="no pytest-kvcache results here"):
        R.find_runs([tmp_path])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "bad.json").write_text("{not json")
    with pytest.raises(R.ResultsError, match=r"run/bad.json: not valid JSON \(line 1"):
        R.load_run(tmp_path / "run")
    (tmp_path / "run" / "bad.json").write_text(json.dumps(_doc(schema_version=99)))
    with pytest.raises(R.ResultsError, match=r"run/bad.json: schema_version 99 is not one"):
        R.load_run(tmp_path / "run")


def test_find_runs_expands_a_folder_of_runs_and_keeps_names_unique(tmp_path):
    for parent in ("a", "b"):
        run = tmp_path / parent / "run-1"
        (run / "s").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"items": [], "item_files": []}))
        (run / "s" / "x.json").write_text(json.dumps(_doc()))
    runs = R.find_runs([tmp_path / "a", tmp_path / "b"])
    assert [r.name for r in runs] == ["a/run-1", "b/run-1"]


def test_markdown_table_escapes_pipes():
    assert md_table(("a", "b"), [("x|y", None)]) == ["| a | b |", "| --- | --- |", "| x\\|y |  |"]


def test_header_names_server_versions_gpu_labels(tmp_path):
    server = SimpleNamespace(kind="vllm", endpoint=None, model="Qwen/Qwen2.5-7B", emulator_profile="quick",
                             emulator_slowdown=1.0, labels=(("bandwidth", "400Gbps"), ("arcc", "on")))
    settings = SimpleNamespace(server=server, results_dir=tmp_path, versions=(("commit", "abc123"),),
                               client_floor=0.95)
    lines = header_lines(settings, gpu="8 x NVIDIA H100", versions={"vllm_version": "0.11.0"})
    assert lines[0].startswith("kvcache: pytest-kvcache ") and "server=vllm model=Qwen/Qwen2.5-7B" in lines[0]
    assert lines[1:5] == ["kvcache: versions: vllm_version 0.11.0", "kvcache: software under test: commit=abc123",
                          "kvcache: GPU: 8 x NVIDIA H100", "kvcache: labels: bandwidth=400Gbps, arcc=on"]
    assert not any("client floor" in line for line in lines)
    lowered = header_lines(SimpleNamespace(**{**vars(settings), "client_floor": 0.6}))
    assert "kvcache: client floor 60% (--kv-client-floor): a round counts while the client delivers that share " \
           "of its concurrency and request rate" in lowered
