"""The storage phase as pytest items: ``-m storage`` runs a storage scenario without a server,
gates it against its stored baseline, writes its JSON with the seed's figures and names the
trials it excluded; an item none of whose trials completed fails and is never stored."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ("pytester",)

INFERENCE = """\
name: seed
phase: prefill
matrix:
  backend: [cpu]
  input_len: [1k]
  concurrency: [1]
output_len: 1
num_prompts: 2
trials: 2
"""

STORAGE = """\
name: tiers
phase: storage
matrix:
  tiers: [cpu, cpu+disk]
  users: [2]
capacities:
  cpu: {{cpu: 16MiB}}
  cpu+disk: {{cpu: 2MiB, disk: 32MiB}}
trace:
  conversations: 4
  turns: 2
  block_tokens: 4
  decode_reads: 2
  prompt_tokens: [8, 16]
  output_tokens: [4, 8]
trials: 3
trial_timeout_s: {timeout}
threshold: 60%
seed: 7
"""

#: a conftest that makes trial 1 of every storage item lose one request
SHORT_TRIAL = """\
import dataclasses

from pytest_kvcache.storage import replay

_REAL = replay.run_trial


def _one_short(config, requests, trial, folder):
    result = _REAL(config, requests, trial, folder)
    if trial != 1:
        return result
    return dataclasses.replace(result, requests_completed=result.requests_completed - 1,
                               failures=("injected: a request lost",))


def pytest_configure(config):
    replay.run_trial = _one_short


def pytest_unconfigure(config):
    replay.run_trial = _REAL
"""

ITEMS = ("tiers[cpu-u2]", "tiers[cpu+disk-u2]")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "seed.yaml").write_text(INFERENCE)
    pytester.path.joinpath("scenarios", "tiers.yaml").write_text(STORAGE.format(timeout=20))
    return pytester


def _doc(pytester: pytest.Pytester, results: str, item: str) -> dict:
    return json.loads(pytester.path.joinpath(results, "tiers", f"{item}.json").read_text())


def test_storage_marker_runs_only_storage_items_and_passes_against_its_baseline(project):
    for run in ("u1", "u2"):
        stored = project.runpytest_subprocess("-m", "storage", "--update-baselines", f"--kv-results-dir={run}")
        stored.assert_outcomes(passed=2, deselected=1)
    assert sorted(p.name for p in project.path.joinpath("baselines", "tiers").glob("*.json")) == \
        sorted(f"{item}.json" for item in ITEMS)
    result = project.runpytest_subprocess("-m", "storage", "--kv-results-dir=run")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*tiers[[]cpu-u2[]]*storage_throughput_tokens_per_sec*PASS*",
                                 "storage phase (tokens / storage I/O time*", "*tiers[[]cpu+disk-u2[]]*cpu+disk*3/3*",
                                 "regression gate: passed (2 comparisons*"])
    assert not project.path.joinpath("run", "logs").exists()  # no server was started
    doc = _doc(project, "run", "tiers[cpu+disk-u2]")
    assert doc["kind"] == "storage" and doc["status"] == "compared" and doc["verdict"]["zone"] == "PASS"
    summary = doc["summary"]
    assert set(summary["tier_read_p95_ms"]) == {"cpu", "disk"} and summary["tier_read_p95_ms"]["disk"] > 0
    assert summary["tier_evictions"]["cpu"] > 0 and summary["read_bytes"] > summary["write_bytes"] > 0
    assert doc["excluded"] == [] and summary["trials_used"] == 3
    assert project.path.joinpath("run", "plots", "storage_tiers.png").is_file()
    run = json.loads(project.path.joinpath("run", "run.json").read_text())
    assert run["gate"]["comparisons"] == 2 and not run["gate"]["failed"]
    # the tier table: a row per tier of each hierarchy, in the terminal and the run's files
    result.stdout.fnmatch_lines(["tiers, the storage phase and the servers side by side:",
                                 "tiers[[]cpu+disk-u2[]]*storage*disk*3/3"])
    assert [row[:3] for row in run["tiers"]["rows"]] == [
        ["tiers[cpu-u2]", "storage", "cpu"], ["tiers[cpu+disk-u2]", "storage", "cpu"],
        ["tiers[cpu+disk-u2]", "storage", "disk"]]
    md = project.path.joinpath("run", "summary.md").read_text()
    assert "| tiers[cpu+disk-u2] | storage | disk |" in md and "`plots/storage_tiers.png`" in md
    page = project.path.joinpath("run", "report.html").read_text()
    assert '<table id="tiers">' in page and '<img src="plots/storage_tiers.png"' in page


def test_an_incomplete_trial_is_excluded_and_named_in_the_json(project):
    project.runpytest_subprocess("-m", "storage", "--update-baselines", "--kv-results-dir=u1").assert_outcomes(passed=2,
                                                                                                     deselected=1)
    project.makeconftest(SHORT_TRIAL)
    result = project.runpytest_subprocess("-m", "storage", "--kv-results-dir=run")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*tiers[[]cpu-u2[]] EXCLUDED trial 2: completed * of * requests (injected: a "
                                 "request lost)*"])
    doc = _doc(project, "run", "tiers[cpu-u2]")
    assert doc["summary"]["trials_used"] == 2
    assert len(doc["excluded"]) == 1 and doc["excluded"][0].startswith("trial 2: completed ")
    assert [t["complete"] for t in doc["trials"]] == [True, False, True]
    # a run with an incomplete trial is compared, never stored
    refused = project.runpytest_subprocess("-m", "storage", "--update-baselines", "--kv-results-dir=u2")
    refused.assert_outcomes(failed=2, deselected=1)
    refused.stdout.fnmatch_lines(["*baseline NOT updated: every trial must be complete*"])


def test_a_storage_item_with_every_trial_incomplete_fails_and_is_never_stored(project):
    # a microsecond per trial: every trial runs out of time
    project.path.joinpath("scenarios", "tiers.yaml").write_text(STORAGE.format(timeout="0.000001"))
    result = project.runpytest_subprocess("-m", "storage", "--update-baselines", "--kv-results-dir=run")
    result.assert_outcomes(failed=2, deselected=1)
    result.stdout.fnmatch_lines(["*only 0 of 3 trials are usable, too few to compare*",
                                 "*trial 1: storage round invalid: incomplete, completed 0 of *"])
    assert not project.path.joinpath("baselines", "tiers").exists()
    doc = _doc(project, "run", "tiers[cpu-u2]")
    assert doc["status"] == "failed" and len(doc["excluded"]) == 3 and doc["summary"]["trials_used"] == 0
    compared = project.runpytest_subprocess("-m", "storage", "--kv-results-dir=run2")
    compared.assert_outcomes(failed=2, deselected=1)


def test_compare_prints_storage_items(project, capsys):
    from pytest_kvcache.__main__ import main

    for run in ("a", "b"):
        project.runpytest_subprocess("-m", "storage", "--update-baselines", f"--kv-results-dir={run}")
    capsys.readouterr()
    assert main(["compare", str(project.path / "a"), str(project.path / "b"), "--no-plots",
                 "--out", str(project.path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Storage items (tokens / storage I/O time" in out
    rows = [line.split() for line in out.splitlines() if "tiers[cpu+disk-u2]" in line]
    assert [row[1] for row in rows] == ["a", "b"] and rows[0][4] == "reference" and rows[1][4].endswith("%")


def test_a_tier_that_cannot_open_fails_the_item_saying_why(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "remote.yaml").write_text(
        "name: remote\nphase: storage\nmatrix: {tiers: [redis]}\ncapacities: {redis: {redis: 8MiB}}\n"
        "redis_url: redis://127.0.0.1:1\ntrace: {conversations: 2, turns: 1}\ntrials: 2\n")
    result = pytester.runpytest_subprocess("--kv-results-dir=run")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*remote[[]redis-u4[]] FAILED: the storage replay could not run: *"])
    doc = json.loads(pytester.path.joinpath("run", "remote", "remote[redis-u4].json").read_text())
    assert doc["status"] == "failed" and doc["kind"] == "storage"


#: a conftest that makes the first run of tiers[cpu-u2] (its first 3 trials) 10 times slower: far past
#: any noise of this machine, so the first run always looks worse
SLOW_FIRST_RUN = """\
import dataclasses

from pytest_kvcache.storage import replay

_REAL = replay.run_trial
_CALLS = []


def _slow_first_run(config, requests, trial, folder):
    result = _REAL(config, requests, trial, folder)
    if config.name != "tiers[cpu-u2]":
        return result
    _CALLS.append(trial)
    if len(_CALLS) > 3:
        return result
    return dataclasses.replace(result, storage_io_s=result.storage_io_s * 10,
                               storage_throughput_tokens_per_sec=result.storage_throughput_tokens_per_sec / 10)


def pytest_configure(config):
    replay.run_trial = _slow_first_run


def pytest_unconfigure(config):
    replay.run_trial = _REAL
"""


def test_a_storage_item_is_confirmed_recorded_in_history_junit_and_pytest_benchmark(project):
    import xml.etree.ElementTree as ET

    for run in ("u1", "u2"):
        project.runpytest_subprocess("-m", "storage", "--update-baselines", f"--kv-results-dir={run}",
                                     "--kv-history=none").assert_outcomes(passed=2, deselected=1)
    project.makeconftest(SLOW_FIRST_RUN)
    result = project.runpytest_subprocess("-m", "storage", "-v", "--kv-results-dir=run", "--kv-run-noise=5%",
                                          "--junitxml=junit.xml", "--benchmark-json=bench.json")
    assert result.ret in (0, 1), result.stdout.str()  # the verdict on one slow run of two is the gate's
    result.stdout.fnmatch_lines(["*tiers[[]cpu-u2[]]*the first run looks worse: confirming with run 2 on fresh tiers*"])
    doc = _doc(project, "run", "tiers[cpu-u2]")
    (comparison,) = doc["verdict"]["comparisons"]
    assert comparison["runs_current"] == 2 and len(doc["confirmation_runs"]) == 1
    assert len(doc["confirmation_runs"][0]["trials"]) == 3 and "confirmation_runs" not in _doc(
        project, "run", "tiers[cpu+disk-u2]")
    # the history: both runs of the confirmed item, every figure of its trials, per tier too
    history = json.loads(project.path.joinpath("run", "history.json").read_text())["runs"]
    attempts = sorted(r["attempt"] for r in history if r["item"] == "tiers/tiers[cpu-u2]")
    assert attempts == [0, 1]
    trial = next(r for r in history if r["item"] == "tiers/tiers[cpu+disk-u2]")["trials"][0]["summary"]
    assert trial["storage_throughput_tokens_per_sec"] > 0 and trial["tier_read_p95_ms:disk"] > 0
    assert trial["tier_evictions:cpu"] > 0 and trial["read_bytes"] > trial["write_bytes"] > 0
    from pytest_kvcache.history import open_history

    with open_history(str(project.path / ".kvcache" / "history.sqlite"), rootdir=project.path) as store:
        stored = {(r.item, r.attempt) for r in store.runs()}
    assert stored == {("tiers/tiers[cpu-u2]", 0), ("tiers/tiers[cpu-u2]", 1), ("tiers/tiers[cpu+disk-u2]", 0)}
    # JUnit properties and the pytest-benchmark entry: a round is a trial's storage I/O time
    case = next(c for c in ET.parse(project.path / "junit.xml").iter("testcase") if "cpu+disk" in c.get("name"))
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(props["kvcache.storage_throughput_tokens_per_sec"]) > 0 and props["kvcache.phase"] == "storage"
    assert props["kvcache.usable_trials"] == "3/3" and props["kvcache.storage_throughput_tokens_per_sec.verdict"]
    bench = {b["name"]: b for b in json.loads(project.path.joinpath("bench.json").read_text())["benchmarks"]}
    entry = bench["tiers[cpu+disk-u2]"]
    assert entry["stats"]["rounds"] == 3 and entry["extra_info"]["kvcache_round_metric"] == "storage_io_s"
    assert 0 < entry["stats"]["mean"] < 60


def test_a_gds_tier_without_a_mount_skips_its_item_saying_what_is_missing(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "direct.yaml").write_text(
        "name: direct\nphase: storage\nmatrix: {tiers: [gds]}\ncapacities: {gds: {gds: 8MiB}}\n"
        "trace: {conversations: 2, turns: 1}\ntrials: 2\n")
    result = pytester.runpytest_subprocess("--kv-results-dir=run", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*tier gds cannot open: no folder on a GDS mount given (set --kv-gds-path DIR*"])
    # --kv-gds-path reaches a file that names no gds_path
    missing = pytester.path / "no-such-mount"
    given = pytester.runpytest_subprocess("--kv-results-dir=run2", "-rs", f"--kv-gds-path={missing}")
    given.assert_outcomes(skipped=1)
    given.stdout.fnmatch_lines([f"*{missing}*"])
    doc = json.loads(pytester.path.joinpath("run2", "direct", "direct[gds-u4].json").read_text())
    assert doc["status"] == "skipped" and str(missing) in doc["message"]


def test_storage_items_run_before_the_items_that_start_servers(project):
    # seed.yaml sorts before tiers.yaml: collected first, run after
    result = project.runpytest_subprocess("--collect-only", "-q")
    items = [line for line in result.stdout.lines if "::" in line]
    assert [line.split("::")[0] for line in items] == ["scenarios/tiers.yaml"] * 2 + ["scenarios/seed.yaml"]
