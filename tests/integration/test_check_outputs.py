"""Offload correctness through pytest on the emulator: an honest tier passes, a corrupting
one fails naming the answers and is never stored, ``none`` says it has nothing to check,
and the option, its ini key and the scenario key behave."""

from __future__ import annotations

import json

import pytest

SCENARIO = """
name: check
phase: prefill
matrix:
  backend: [none, cpu]
  input_len: [1k]
  concurrency: [1]
  output_len: [16]
num_prompts: 8
rounds: [cold, warm]
trials: 2
thresholds: {{median_ttft_ms: {{direction: lower, threshold: 10%}}}}
{extra}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "check.yaml").write_text(SCENARIO.format(extra=""))
    return pytester


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess("-p", "no:cacheprovider", f"--kv-results-dir={project.path / 'out'}",
                                        "--kv-history=none", *args, timeout=300)


def item_json(project: pytest.Pytester, backend: str) -> dict:
    return json.loads((project.path / "out" / "check" / f"check[{backend}-1k-c1].json").read_text())


def test_an_honest_tier_passes_and_keeps_every_answer(project):
    result = run(project, "--update-baselines")
    result.assert_outcomes(passed=2)
    cpu, none = item_json(project, "cpu"), item_json(project, "none")
    assert cpu["outputs"]["status"] == "passed"
    assert cpu["outputs"]["tier"]["warm"]["compared"] == 16 and cpu["outputs"]["tier"]["warm"]["differing"] == 0
    assert cpu["outputs"]["control"]["compared"] == 16
    assert none["outputs"]["status"] == "not_applicable" and "backend none has no tier" in none["outputs"]["reason"]
    # digests in the item JSON, the answers in full beside it
    digests = {(a["trial"], a["round"]): a["sha256_16"] for a in cpu["outputs"]["answers"]}
    assert set(digests) == {(t, r) for t in (0, 1) for r in ("cold", "warm", "control")}
    assert digests[(0, "cold")] == digests[(0, "warm")] == digests[(0, "control")] != digests[(1, "cold")]
    assert cpu["outputs"]["details"] == "answers/check/check[cpu-1k-c1].answers.json"
    details = json.loads((project.path / "out" / cpu["outputs"]["details"]).read_text())
    assert sorted(p.name for p in (project.path / "out" / "check").iterdir()) == [  # item JSON files only
        "check[cpu-1k-c1].json", "check[none-1k-c1].json"]
    assert details["schema_version"] == 1 and details["item"].endswith("check[cpu-1k-c1]")
    texts = [a["text"] for r in details["rounds"] if r["round"] == "warm" and r["trial"] == 0 for a in r["answers"]]
    assert len(texts) == 8 and all(len(t.split()) == 16 for t in texts)
    assert (project.path / "baselines" / "check" / "check[cpu-1k-c1].json").is_file()


def test_a_corrupting_tier_fails_naming_the_answers_and_is_never_stored(project):
    result = run(project, "--update-baselines", "--kv-server-args=--corrupt-rate 0.5")
    result.assert_outcomes(passed=1, failed=1)
    text = " ".join(result.stdout.str().split())
    assert "wrong outputs from the tier:" in text
    assert "warm-round answers start with another token than the cold round's recomputation" in text
    assert "0 of 16 in the control recomputation (0%" in text and "trial 1 prompt" in text
    cpu = item_json(project, "cpu")
    assert cpu["status"] == "failed" and cpu["outputs"]["status"] == "failed"
    assert cpu["outputs"]["tier"]["warm"]["first_token_differing"] >= 8 and cpu["outputs"]["p_value"] < 0.01
    assert len(cpu["trials"]) == 2 and cpu["testbed"]  # what was measured is kept
    assert not (project.path / "baselines" / "check" / "check[cpu-1k-c1].json").exists()
    assert (project.path / "baselines" / "check" / "check[none-1k-c1].json").is_file()


def test_the_check_can_be_turned_off(project):
    result = run(project, "--no-kv-check-outputs", "--kv-server-args=--corrupt-rate 0.5", "-k", "cpu")
    result.assert_outcomes(skipped=1)  # no baseline: measured, not judged, not failed by the check
    cpu = item_json(project, "cpu")
    assert cpu["outputs"]["status"] == "off" and cpu["outputs"]["reason"] == "--no-kv-check-outputs"
    assert "control" not in {a["round"] for a in cpu["outputs"]["answers"]}


def test_the_scenario_key_and_one_token_answers(project):
    scenario = project.path / "scenarios" / "check.yaml"
    scenario.write_text(SCENARIO.format(extra="check_outputs: false"))
    run(project, "-k", "cpu").assert_outcomes(skipped=1)
    assert item_json(project, "cpu")["outputs"]["reason"] == "check_outputs: false"
    scenario.write_text(SCENARIO.replace("output_len: [16]", "output_len: [1]").format(extra=""))
    run(project, "-k", "cpu").assert_outcomes(skipped=1)
    assert "answers of one token are not checked by default" in item_json(project, "cpu")["outputs"]["reason"]
    run(project, "-k", "cpu", "--kv-check-outputs").assert_outcomes(skipped=1)
    assert item_json(project, "cpu")["outputs"]["status"] == "passed"


@pytest.mark.parametrize(("value", "ok"), [("auto", True), ("true", True), ("False", True), ("maybe", False)])
def test_ini_values(project, value, ok):
    project.makeini(f"[pytest]\nkvcache_check_outputs = {value}\n")
    result = project.runpytest("--collect-only", "-q")
    if ok:
        assert result.ret == 0
    else:
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*kvcache_check_outputs = 'maybe': use auto, true or false*"])


def test_a_bad_scenario_value_names_the_key(project):
    (project.path / "scenarios" / "check.yaml").write_text(SCENARIO.format(extra="check_outputs: sometimes"))
    result = project.runpytest("--collect-only", "-q")
    assert "check_outputs" in result.stdout.str() and "must be true or false" in result.stdout.str()


def test_help(project):
    text = project.runpytest("--help").stdout.str()
    assert "--kv-check-outputs" in text and "--no-kv-check-outputs" in text and "kvcache_check_outputs" in text
