"""--kv-client-floor / kvcache_client_floor: the client guard's floor for delivered vs configured load."""

from __future__ import annotations

import json

import pytest

SCENARIO = """
name: floor
phase: prefill
matrix:
  backend: [none]
  input_len: [1k]
  concurrency: [8]
  output_len: [1]
num_prompts: 32
rounds: [cold]
trials: 2
"""

PRINT_FLOOR = """
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    print("FLOOR", kv_session(session.config).settings.client_floor)
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_ADDOPTS")  # the suite's lowered floor (conftest.py): the default is tested here
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "floor.yaml").write_text(SCENARIO)
    return pytester


def _floor(result: pytest.RunResult) -> float:
    (line,) = [line for line in result.outlines if line.startswith("FLOOR ")]
    return float(line.split()[1])


def test_option_and_ini_good_bad_and_help(project: pytest.Pytester) -> None:
    text = project.runpytest("--help").stdout.str()
    assert "--kv-client-floor" in text and "kvcache_client_floor" in text
    project.makeconftest(PRINT_FLOOR)
    assert _floor(project.runpytest("--collect-only", "-q", "-s")) == 0.95
    assert _floor(project.runpytest("--collect-only", "-q", "-s", "--kv-client-floor", "0.7")) == 0.7
    for bad in ("0.4", "0", "1.01", "nan", "most"):
        result = project.runpytest("--collect-only", f"--kv-client-floor={bad}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        expected = f"--kv-client-floor / kvcache_client_floor = '{bad}': use a fraction from 0.5 to 1"
        assert expected in result.stderr.str()
        assert "Traceback" not in result.stdout.str() + result.stderr.str()
    project.makeini("[pytest]\nkvcache_client_floor = 0.8\n")
    assert _floor(project.runpytest("--collect-only", "-q", "-s")) == 0.8
    assert _floor(project.runpytest("--collect-only", "-q", "-s", "--kv-client-floor=0.9")) == 0.9  # option wins
    project.makeini("[pytest]\nkvcache_client_floor = always\n")
    result = project.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "kvcache_client_floor = 'always'" in result.stderr.str()


def test_the_floor_reaches_the_guard_and_a_lowered_one_is_said_and_recorded(project: pytest.Pytester) -> None:
    # A client never keeps exactly 8 in flight while requests wait (each hand-over takes some
    # time), so a floor of 1 invalidates every round: the option reaches the guard.
    strict = project.runpytest("-p", "no:cacheprovider", f"--kv-results-dir={project.path / 'strict'}",
                               "--kv-client-floor=1")
    text = strict.stdout.str()
    assert strict.ret == pytest.ExitCode.TESTS_FAILED, text[-2000:]
    assert "configured 8 (floor 100%): it could not start requests fast enough" in text
    assert "kvcache: client floor" not in text
    lowered = project.runpytest("-p", "no:cacheprovider", f"--kv-results-dir={project.path / 'lowered'}",
                                "--kv-client-floor=0.5")
    text = lowered.stdout.str()
    assert lowered.ret == pytest.ExitCode.OK, text[-2000:]
    assert "kvcache: client floor 50% (--kv-client-floor)" in text
    run = json.loads((project.path / "lowered" / "run.json").read_text())
    assert run["settings"]["client_floor"] == 0.5
    assert any(line.startswith("kvcache: client floor 50%") for line in run["header"])
