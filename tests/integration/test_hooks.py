"""``pytest_kvcache_after_round``: called after every round with the server, its failure the item's."""

from __future__ import annotations

import json

import pytest

SCENARIO = """
name: hooked
phase: prefill
matrix: {backend: [cpu], input_len: [1k], concurrency: [1], output_len: [4]}
num_prompts: 4
rounds: [cold, warm]
trials: 2
thresholds: {median_ttft_ms: {direction: lower, threshold: 10%}}
"""

RECORDING = """
import json, os

def pytest_kvcache_after_round(item, backend, trial, round_name, server):
    with open(os.path.join(os.path.dirname(__file__), "calls.jsonl"), "a") as f:
        f.write(json.dumps([item, backend, trial, round_name, server.kind, server.base_url.startswith("http"),
                            sorted(server.ports)]) + "\\n")
"""

FAILING = """
def pytest_kvcache_after_round(item, backend, trial, round_name, server):
    if round_name == "warm":
        raise RuntimeError("the page cache could not be dropped")
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "hooked.yaml").write_text(SCENARIO)
    return pytester


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess("-p", "no:cacheprovider", f"--kv-results-dir={project.path / 'out'}",
                                        "--kv-history=none", *args, timeout=300)


def test_called_after_every_round_with_the_server(project):
    project.makeconftest(RECORDING)
    run(project).assert_outcomes(skipped=1)  # no baseline: measured, then skipped
    calls = [json.loads(line) for line in (project.path / "calls.jsonl").read_text().splitlines()]
    rounds = [(trial, name) for _, _, trial, name, *_ in calls]
    assert rounds == [(0, "cold"), (0, "warm"), (0, "control"), (1, "cold"), (1, "warm"), (1, "control")]
    assert {(c[0], c[1], c[4], c[5]) for c in calls} == {("hooked[cpu-1k-c1]", "cpu", "emulator", True)}


def test_a_failing_hook_fails_the_item_naming_it(project):
    project.makeconftest(FAILING)
    result = run(project, "--update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*pytest_kvcache_after_round after trial 1's warm round raised RuntimeError: "
                                 "the page cache could not be dropped*"])
    assert not (project.path / "baselines" / "hooked").exists()


def test_without_an_implementation_nothing_is_called(project):
    run(project).assert_outcomes(skipped=1)
    assert not (project.path / "calls.jsonl").exists()
