"""The regression gate end to end, against a server with fixed, known timings.

The emulator's ``fixed`` profile answers every request with the first token 200 ms
after arrival and one token every 8 ms; ``--emulator-slowdown`` scales both, standing
in for a server that got slower (or faster) between two runs.
"""

from __future__ import annotations

import json

import pytest

pytest_plugins = ("pytester",)

SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none]
  input_len: [1k]
  concurrency: [16]
  output_len: [4]
num_prompts: 48
rounds: [cold]
trials: 3
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""
ITEM = "prefill[none-1k-c16]"




@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "gate.yaml").write_text(SCENARIO)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--emulator-profile=fixed", "--kv-server-args=--fixed-ttft-ms 200 --fixed-itl-ms 8",
        f"--kv-results-dir={pytester.path / 'out'}", *args, timeout=300)


def verdict(pytester: pytest.Pytester) -> dict:
    doc = json.loads((pytester.path / "out" / "gate" / f"{ITEM}.json").read_text())
    return doc["verdict"]


def test_gate_fails_only_for_a_real_regression(project):
    # the baseline is a set of runs: three sessions, the run-to-run noise estimated from them
    for _ in range(3):
        run(project, "--update-baselines").assert_outcomes(passed=1)
    stored = json.loads((project.path / "baselines" / "gate" / f"{ITEM}.json").read_text())
    assert stored["schema_version"] == 2 and len(stored["runs"]) == 3
    assert len({r["run_id"] for r in stored["runs"]}) == 3 and all(len(r["trials"]) == 3 for r in stored["runs"])

    unchanged = run(project)
    assert unchanged.ret == 0
    comparison = verdict(project)["comparisons"][0]
    assert comparison["verdict"]["zone"] == "PASS" and abs(comparison["change_pct"]) < 3
    assert comparison["runs_baseline"] == 3 and comparison["test"] == "run-level"

    slower = run(project, "--emulator-slowdown=1.2")
    assert slower.ret == pytest.ExitCode.TESTS_FAILED
    slower.stdout.fnmatch_lines(["*median_ttft_ms: baseline * ms (3 runs), current * ms (2 runs), change +*% "
                                 "(threshold 10%), p=*",
                                 "regression gate: FAILED after Holm correction*prefill?none-1k-c16?: median_ttft_ms*"])
    comparison = verdict(project)["comparisons"][0]
    assert comparison["verdict"]["zone"] == "FAIL" and 15 < comparison["change_pct"] < 25
    # the first run looked worse, so a second run on a fresh server confirmed it before the verdict
    assert comparison["runs_current"] == 2 and comparison["test"] == "run-level, confirmed"
    doc = json.loads((project.path / "out" / "gate" / f"{ITEM}.json").read_text())
    assert len(doc["confirmation_runs"]) == 1 and len(doc["confirmation_runs"][0]["trials"]) == 3

    slightly = run(project, "--emulator-slowdown=1.02")
    assert slightly.ret == 0
    comparison = verdict(project)["comparisons"][0]
    assert comparison["verdict"]["zone"] in ("PASS", "WARN")
    assert 0.5 < comparison["change_pct"] < 3.5  # the change is measured and reported
    slightly.stdout.fnmatch_lines(["*prefill?none-1k-c16?*median_ttft_ms*+*%*"])

    faster = run(project, "--emulator-slowdown=0.8")
    assert faster.ret == 0
    comparison = verdict(project)["comparisons"][0]
    assert comparison["verdict"]["zone"] == "IMPROVED" and comparison["change_pct"] < -15
    faster.stdout.fnmatch_lines(["*IMPROVED: median_ttft_ms *% better than the baseline (3 runs)*refresh*"])


def test_one_baseline_run_is_not_judged_unless_the_noise_is_given(project):
    run(project, "--update-baselines").assert_outcomes(passed=1)
    slower = run(project, "--emulator-slowdown=1.3")
    assert slower.ret == 0  # a comparison that cannot be made is no failure...
    slower.stdout.fnmatch_lines(["*WARN: median_ttft_ms *% worse than the baseline (1 run), not judged*--kv-run-noise*",
                                 "regression gate: nothing judged; 1 item(s) NOT COMPARED"])  # ...and no pass
    assert verdict(project)["zone"] == "WARN"
    strict = run(project, "--emulator-slowdown=1.3", "--strict-baselines")
    strict.assert_outcomes(failed=1)  # strict: every item must be judged
    strict.stdout.fnmatch_lines(["*could not be judged: cannot judge: the baseline has 1 run*(--strict-baselines)*"])
    given = run(project, "--emulator-slowdown=1.3", "--kv-run-noise=2%")
    assert given.ret == pytest.ExitCode.TESTS_FAILED
    assert verdict(project)["comparisons"][0]["noise_source"] == "configured (2%)"


def test_a_rehearsal_or_a_sick_run_never_becomes_the_baseline(project):
    # the server's arguments compared across runs like a version (an ini move), so a slower
    # server stands for a sick run on the same testbed
    project.makeini("[pytest]\nkvcache_software_keys = server_args\n")
    for _ in range(3):
        run(project, "--update-baselines").assert_outcomes(passed=1)
    path = project.path / "baselines" / "gate" / f"{ITEM}.json"
    before = path.read_bytes()
    rehearsal = run(project, "--update-baselines", "--emulator-slowdown=1.0001")
    rehearsal.assert_outcomes(failed=1)
    rehearsal.stdout.fnmatch_lines(["*baseline NOT updated: --emulator-slowdown 1.0001 rehearses a regression*"])
    sick = run(project, "--update-baselines", "--kv-server-args=--fixed-ttft-ms 260 --fixed-itl-ms 8")
    sick.assert_outcomes(failed=1)
    sick.stdout.fnmatch_lines(["*baseline NOT updated: this run is worse than the stored runs:*",
                               "*median_ttft_ms: baseline * ms (3 runs), current * ms*",
                               "*if the change is intended, replace them with --reset-baselines*"])
    assert path.read_bytes() == before
    reset = run(project, "--reset-baselines", "--kv-server-args=--fixed-ttft-ms 260 --fixed-itl-ms 8")
    reset.assert_outcomes(passed=1)
    assert len(json.loads(path.read_text())["runs"]) == 1
    doc = json.loads((project.path / "out" / "gate" / f"{ITEM}.json").read_text())
    assert "replaced 3 runs on" in doc["message"]


def test_incomplete_run_is_never_stored_as_baseline(project):
    # every 5th request fails: trials are incomplete, so nothing may be stored
    result = run(project, "--update-baselines",
                 "--kv-server-args=--fixed-ttft-ms 40 --config-json '{\"error_rate\": 0.2}'")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*only 0 of 3 trials are usable*"])
    assert not (project.path / "baselines").exists() or not list((project.path / "baselines").rglob("*.json"))


PAIRED = """
name: offload_gain
phase: prefill
matrix:
  backend: [{candidate}]
  input_len: [10k]
  concurrency: [16]
  output_len: [1]
num_prompts: 32
rounds: [cold, warm]
trials: 4
paired_with: {{backend: {reference}}}
thresholds:
  median_ttft_ms: {{direction: lower, threshold: 10%}}
"""


@pytest.mark.parametrize("candidate,reference,outcome", [("cpu", "none", "passed"), ("none", "cpu", "failed")])
def test_paired_comparison_without_a_baseline(pytester, candidate, reference, outcome):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "paired.yaml").write_text(PAIRED.format(candidate=candidate,
                                                                                reference=reference))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--kv-results-dir={pytester.path / 'out'}",
                                           timeout=300)
    result.assert_outcomes(**{outcome: 1})
    name = f"offload_gain[{candidate}-vs-{reference}-10k-c16]"
    doc = json.loads((pytester.path / "out" / "paired" / f"{name}.json").read_text())
    assert len(doc["trials"]) == 4 and len(doc["reference"]["trials"]) == 4
    comparison = doc["verdict"]["comparisons"][0]
    assert comparison["test"] == "paired-t"
    if outcome == "passed":
        # a warm round served from the CPU tier beats recomputing
        assert comparison["change_pct"] < -20 and comparison["verdict"]["zone"] == "PASS"
    else:
        assert comparison["change_pct"] > 20 and comparison["verdict"]["zone"] == "FAIL"
        result.stdout.fnmatch_lines(["*paired comparison: the candidate is worse than the reference*"])
    assert not (pytester.path / "baselines").exists()  # no baseline needed, none written


def test_truncated_baseline_is_a_clear_error_and_stays_as_it_was(project):
    run(project, "--update-baselines").assert_outcomes(passed=1)
    path = project.path / "baselines" / "gate" / f"{ITEM}.json"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    truncated = path.read_bytes()
    for args in ((), ("--update-baselines",), ("--reset-baselines",)):
        result = run(project, *args)
        result.assert_outcomes(failed=1)
        text = result.stdout.str()
        assert str(path) in text and "git checkout" in text, text  # names the file and the fix
        assert "Traceback" not in text
        assert path.read_bytes() == truncated  # never repaired or overwritten silently
