"""The nightly gate end to end: the testbed is what must match, the software is what is
compared across (an upgrade on a server restarted on another port is judged, not skipped)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pytest_kvcache.testing import start_reference_server


pytest_plugins = ("pytester",)

SCENARIO = """
name: nightly
phase: prefill
matrix:
  backend: [none]
  input_len: [1k]
  concurrency: [1]
  output_len: [4]
num_prompts: 12
rounds: [cold]
trials: 3
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""
# concurrency 1: a nightly gate on a busy shared runner, where a client that is late to
# start the next request changes no request's latency
ITEM = "nightly[none-1k-c1]"


@contextmanager
def reference_server(tmp_path, ttft_ms: float, version: str) -> Iterator[int]:
    """A server with a known TTFT that reports ``version`` at GET /version, on a new port."""
    server = start_reference_server(tmp_path, "--ttft-ms", str(ttft_ms), "--itl-ms", "5", "--served-version",
                                    version, model="m", name=f"reference server {version}")
    try:
        yield server.port
    finally:
        server.stop()


def night(pytester: pytest.Pytester, port: int, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kv-server=external",
                                         f"--kv-endpoint=http://127.0.0.1:{port}", "--model=m",
                                         f"--kv-results-dir={pytester.path / 'out'}", *args, timeout=300)


def item_doc(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "out" / "nightly" / f"{ITEM}.json").read_text())


def test_an_upgrade_on_another_port_is_judged_and_named(pytester, tmp_path):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "nightly.yaml").write_text(SCENARIO)
    for _ in range(3):  # three nights of 0.11.0, each server on a port of its own
        with reference_server(tmp_path, 40, "0.11.0") as port:
            night(pytester, port, "--update-baselines").assert_outcomes(passed=1)
    stored = json.loads((pytester.path / "baselines" / "nightly" / f"{ITEM}.json").read_text())
    assert not [k for k, v in stored["testbed"].items() if "127.0.0.1" in v or k == "endpoint"]
    assert [r["software"]["server_version"] for r in stored["runs"]] == ["0.11.0"] * 3

    with reference_server(tmp_path, 48, "0.11.1") as port:  # upgraded, restarted elsewhere, 20% slower
        slower = night(pytester, port)
    assert slower.ret == pytest.ExitCode.TESTS_FAILED
    slower.assert_outcomes(failed=1)
    slower.stdout.fnmatch_lines(["*median_ttft_ms: baseline 4* ms (3 runs), current 4* ms*change +*% (threshold 10%)*"
                                 "software since the baseline: server_version 0.11.0 -> 0.11.1*"])
    doc = item_doc(pytester)
    assert doc["software_change"] == "server_version 0.11.0 -> 0.11.1"
    assert doc["verdict"]["zone"] == "FAIL" and doc["software"]["server_version"] == "0.11.1"

    with reference_server(tmp_path, 40, "0.11.1") as port:  # the upgrade without the slowdown
        same = night(pytester, port)
    assert same.ret == 0
    assert item_doc(pytester)["verdict"]["zone"] == "PASS"


def test_another_testbed_is_counted_loudly_and_a_key_can_be_moved(pytester, tmp_path):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "nightly.yaml").write_text(SCENARIO)
    with reference_server(tmp_path, 40, "0.11.0") as port:
        night(pytester, port, "--update-baselines", "--kv-label=gpu_pool=a").assert_outcomes(passed=1)
        other = night(pytester, port, "--kv-label=gpu_pool=b")
        other.assert_outcomes(skipped=1)
        other.stdout.fnmatch_lines(["*NOT COMPARED: 1 item(s) have baselines recorded on another testbed*",
                                    "regression gate: nothing judged; 1 item(s) NOT COMPARED"])
        assert "label.gpu_pool: stored a, now b" in item_doc(pytester)["message"]
        # the team says the pool is not part of the testbed: the label is compared across instead
        pytester.makeini("[pytest]\nkvcache_software_keys = label.*\n")
        moved = night(pytester, port, "--kv-label=gpu_pool=b", "--kv-run-noise=2%")
    moved.assert_outcomes(passed=1)
    doc = item_doc(pytester)
    assert doc["verdict"]["zone"] == "PASS" and doc["software"]["label.gpu_pool"] == "b"
    assert "label.gpu_pool" not in doc["testbed"]


def test_every_night_is_remembered_and_a_step_is_found_where_it_came(pytester, tmp_path):
    """16 nights against a server whose TTFT steps up 6% with version 0.11.1 from night 9:
    every night passes its gate; the history finds one change point, at night 9, naming
    the software of nights 8 and 9; the first 8 nights alone have none."""
    import subprocess

    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "nightly.yaml").write_text(SCENARIO)
    store = tmp_path / "team-history.sqlite"
    folders = []
    for n in range(1, 17):
        version, ttft = ("0.11.0", 40.0) if n < 9 else ("0.11.1", 42.4)
        out = pytester.path / f"night{n:02d}"
        with reference_server(tmp_path, ttft, version) as port:
            result = pytester.runpytest_subprocess(
                "-p", "no:cacheprovider", "--kv-server=external", f"--kv-endpoint=http://127.0.0.1:{port}",
                "--model=m", f"--kv-results-dir={out}", f"--kv-history={store}",
                *(["--update-baselines"] if n <= 3 else []), timeout=300)
        assert result.ret == 0, f"night {n}: {result.stdout.str()[-3000:]}"
        assert (out / "history.json").is_file()
        folders.append(out)
    result.stdout.fnmatch_lines(["*WARN change point: nightly/nightly?none-1k-c1? median_ttft_ms +6.*% (worse)*"
                                 "server_version 0.11.0 -> 0.11.1*"])

    def history(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest_kvcache", "history", *args], capture_output=True,
                              text=True, timeout=120, cwd=pytester.path)

    found = history(str(store), "--json")
    assert found.returncode == 0, found.stderr
    points = json.loads(found.stdout)
    assert len(points) == 1
    point = points[0]
    assert point["item"] == f"nightly/{ITEM}" and point["metric"] == "median_ttft_ms"
    sessions = [json.loads((f / "history.json").read_text())["runs"][0]["session_id"] for f in folders]
    assert point["run"] == sessions[8]  # night 9
    assert point["software_before"]["server_version"] == "0.11.0"
    assert point["software_after"]["server_version"] == "0.11.1"
    assert 4.0 < point["change_pct"] < 8.0 and point["p"] < 0.001
    assert point["before"] == pytest.approx(40.0, rel=0.02) and point["after"] == pytest.approx(42.4, rel=0.02)
    assert {"time", "commit_before", "commit_after"} <= set(point)

    flat = tmp_path / "first-eight.sqlite"
    imported = history("import", *map(str, folders[:8]), "--to", str(flat))
    assert imported.returncode == 0, imported.stderr
    assert json.loads(history(str(flat), "--json").stdout) == []
