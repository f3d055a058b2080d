"""The whole path through pytest: emulator up, load, results, baselines, the gate.

These run real emulator processes on loopback; each session takes a few seconds.
"""

from __future__ import annotations

import json
import statistics

import pytest

from pytest_kvcache.servers._process import free_port
from pytest_kvcache.testing import start_reference_server

pytest_plugins = ("pytester",)

# `none` at 10k tokens: the emulator's most stable TTFT, so an unchanged rerun is quiet.
STABLE = """
name: prefill
phase: prefill
matrix:
  backend: [none]
  input_len: [10k]
  concurrency: [16]
  output_len: [1]
num_prompts: 32
rounds: [cold]
trials: 3
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "e2e.yaml").write_text(STABLE)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--kv-results-dir={pytester.path / 'out'}",
                                         *args, timeout=300)


def result_json(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "out" / "e2e" / "prefill[none-10k-c16].json").read_text())


def test_baseline_then_unchanged_then_30_percent_slower(project):
    for _ in range(3):
        run(project, "--update-baselines").assert_outcomes(passed=1)
    stored = json.loads((project.path / "baselines" / "e2e" / "prefill[none-10k-c16].json").read_text())
    assert stored["schema_version"] == 2 and len(stored["runs"]) == 3
    assert all(len(r["trials"]) == 3 for r in stored["runs"])
    assert stored["testbed"]["server"] == "emulator" and "plugin_version" in stored["runs"][0]["software"]

    unchanged = run(project)
    unchanged.assert_outcomes(passed=1)
    unchanged.stdout.fnmatch_lines(["*prefill?none-10k-c16?*median_ttft_ms*PASS*", "regression gate: passed*"])
    doc = result_json(project)
    assert doc["verdict"]["zone"] == "PASS"
    # vLLM's field names at the top level, one trial summary per trial
    for key in ("completed", "failed", "duration", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "total_token_throughput", "output_throughput", "request_throughput"):
        assert key in doc, key
    assert doc["completed"] == 96 and doc["failed"] == 0 and len(doc["trials"]) == 3

    slower = run(project, "--emulator-slowdown=1.3")
    assert slower.ret == pytest.ExitCode.TESTS_FAILED
    slower.assert_outcomes(failed=1)
    text = slower.stdout.str()
    assert "performance regression" in text
    line = next(line for line in slower.outlines if line.strip().startswith("median_ttft_ms: baseline"))
    # the message names the metric, baseline, current, change in percent and p-value
    baseline = float(line.split("baseline ")[1].split(" ms")[0])
    current = float(line.split("current ")[1].split(" ms")[0])
    change = float(line.split("change ")[1].split("%")[0])
    assert 1.2 < current / baseline < 1.45
    assert change == pytest.approx((current / baseline - 1) * 100, abs=0.2)
    assert "p=" in line and "threshold 10%" in line
    assert result_json(project)["verdict"]["zone"] == "FAIL"
    # a failed comparison leaves the stored baseline as it was
    assert json.loads((project.path / "baselines" / "e2e" / "prefill[none-10k-c16].json").read_text()) == stored


def test_missing_baseline_skips_and_strict_fails(project):
    skipped = run(project, "--trials=2", "-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*no baseline for e2e/prefill?none-10k-c16? in*--update-baselines*"])
    # the measurement is still written
    assert result_json(project)["completed"] == 64
    strict = run(project, "--trials=2", "--strict-baselines")
    strict.assert_outcomes(failed=1)


FIXED = """
name: prefill
phase: prefill
matrix:
  backend: [none]
  input_len: [1k]
  concurrency: [16]
  output_len: [4]
num_prompts: 160
rounds: [cold]
trials: 1
"""


def test_external_endpoint_with_known_ttft(pytester, tmp_path):
    """Against a server whose TTFT is fixed at 40 ms, external mode reports it within 2 ms."""
    server = start_reference_server(tmp_path, "--ttft-ms", "40", "--itl-ms", "8", model="fixed-model")
    port = server.port
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "fixed.yaml").write_text(FIXED)
    medians = []
    try:
        # Client and server share 2 cores with whatever else runs: up to three sessions,
        # each checked in full, and one of them must read the known TTFT within 2 ms.
        for attempt in range(3):
            out = pytester.path / f"out{attempt}"
            result = pytester.runpytest_subprocess(
                "-p", "no:cacheprovider", "--kv-server=external", f"--kv-endpoint=http://127.0.0.1:{port}",
                "--model=fixed-model", f"--kv-results-dir={out}", timeout=300)
            result.assert_outcomes(skipped=1)  # measured, but no baseline to compare with
            doc = json.loads((out / "fixed" / "prefill[none-1k-c16].json").read_text())
            assert doc["completed"] == 160 and doc["failed"] == 0
            assert doc["server"]["server"] == "external"
            details = doc["trials"][0]["rounds"]["cold"]["details"]
            assert statistics.median(details["ttfts"]) == pytest.approx(doc["median_ttft_ms"] / 1000, rel=1e-6)
            assert set(details["output_lens"]) == {4} and set(details["input_lens"]) == {1000}
            assert abs(doc["median_itl_ms"] - 8.0) < 0.5, doc["median_itl_ms"]
            medians.append(round(doc["median_ttft_ms"], 3))
            if abs(doc["median_ttft_ms"] - 40.0) < 2.0:
                break
        else:
            pytest.fail(f"median TTFT of each session (truth 40 ms): {medians}")
    finally:
        server.stop()


def test_dead_external_endpoint_is_one_clear_error(project):
    port = free_port()
    result = run(project, "--kv-server=external", f"--kv-endpoint=http://127.0.0.1:{port}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*--kv-endpoint http://127.0.0.1:{port}: GET /v1/models failed*start the server*"])
    assert "Traceback" not in result.stdout.str()


def test_server_that_dies_at_start_is_one_clear_error_with_the_log_tail(project):
    result = run(project, "--kv-server-args=--no-such-flag")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*emulator (none) exited with code 2 while starting (log *emulator-none-0.log):*",
                                 "*unrecognized arguments: --no-such-flag*"])
    assert "Traceback" not in result.stdout.str()
