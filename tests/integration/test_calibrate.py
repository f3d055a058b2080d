"""Calibration: the fit, profile files, and ``python -m pytest_kvcache calibrate`` end to end
against an emulator whose profile is the truth (the real vLLM stack: tests/real_stack)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kvcache.emulator.profile_file import (
    read_profile_file,
    write_profile_file,
)
from pytest_kvcache.servers import ServerPool, ServerSettings
from helpers.calibrate import TRUTH


# -- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth_emulator(tmp_path_factory):
    """An emulator serving the TRUTH profile with a cpu tier."""
    tmp = tmp_path_factory.mktemp("truth")
    path = write_profile_file(tmp / "truth.json", TRUTH, {})
    pool = ServerPool(ServerSettings(kind="emulator", emulator_profile=str(path)), tmp / "work", tmp / "logs")
    handle = pool.acquire(pool.backend("cpu"))
    yield handle
    pool.close()


def run_calibrate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_kvcache", "calibrate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_calibrate_recovers_an_emulated_server_and_verifies_on_held_out_lengths(truth_emulator, tmp_path):
    out = tmp_path / "fitted.json"
    proc = run_calibrate("--kv-endpoint", truth_emulator.base_url, "--backend", "cpu", "--kv-bytes-per-token",
                         "4096", "--input-lens", "300,700,1.3k,2.6k", "--holdout", "1.8k", "--prompts", "4",
                         "-o", str(out), "--work-dir", str(tmp_path / "work"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "calibrate: cold   1800 tokens" in proc.stdout and "(held out)" in proc.stdout
    assert f"wrote {out}" in proc.stdout
    profile, record = read_profile_file(out)
    # the emulator adds its own real overhead (HTTP, JSON, tier I/O) to the truth: close, not equal
    # (per-token and per-pair terms trade off over a short range: compare what they predict)
    # and the emulator's own ~2 ms that is left after its overhead is taken off: absolute at 300 tokens)
    assert profile.prefill_ms(300, 300) == pytest.approx(TRUTH.prefill_ms(300, 300), abs=3.0)
    for n in (1800, 2600):
        assert profile.prefill_ms(n, n) == pytest.approx(TRUTH.prefill_ms(n, n), rel=0.1), n
        assert profile.load_ms("cpu", n // 256 * 256) == pytest.approx(TRUTH.load_ms("cpu", n // 256 * 256),
                                                                       rel=0.25), n
    assert record["emulator_overhead"]["base_ms"] > 0  # measured on a zero-cost emulator, taken off the fit
    assert record["within_tolerance"] is True and record["server"]["server"] == "external"
    assert {(c["input_len"], c["round"]) for c in record["checks"]} == {(1800, "cold"), (1800, "warm")}
    assert all(c["emulated_ms"] is not None and c["emulated_error"] <= 0.15 for c in record["checks"])
    assert len([p for p in record["points"] if p["round"] == "cold"]) == 5
    assert not list(tmp_path.joinpath("work").glob("*.candidate.json"))


def test_a_profile_beyond_tolerance_is_kept_aside_not_written(truth_emulator, tmp_path):
    out = tmp_path / "fitted.json"
    out.write_text("the user's previous profile")
    proc = run_calibrate("--kv-endpoint", truth_emulator.base_url, "--input-lens", "300,700,1.3k",
                         "--holdout", "1k", "--prompts", "3", "--tolerance", "0.01%", "--no-verify",
                         "-o", str(out), "--work-dir", str(tmp_path / "work"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "misses a held-out length by more than 0%" in proc.stderr
    assert out.read_text() == "the user's previous profile"
    rejected = json.loads(tmp_path.joinpath("fitted.rejected.json").read_text())
    assert rejected["calibration"]["within_tolerance"] is False


@pytest.mark.parametrize("args,message", [
    (["--kv-server", "external"], "--kv-server external needs --kv-endpoint"),
    (["--kv-server", "vllm"], "needs --model"),
    (["--kv-endpoint", "http://127.0.0.1:9", "--backend", "cpu"], "KV bytes per token"),
    (["--kv-endpoint", "http://127.0.0.1:9"], "GET /v1/models failed"),
    (["--kv-endpoint", "http://127.0.0.1:9", "--input-lens", "300,600"], "at least 3 different lengths"),
])
def test_calibrate_errors_are_one_clear_line(tmp_path, args, message):
    proc = run_calibrate(*args, "--work-dir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pytest-kvcache calibrate: error:")


@pytest.mark.parametrize("args,message", [
    (["--input-lens", "3x"], "a comma list of"),
    (["--tolerance", "150%"], "between 0 and 100%"),
])
def test_calibrate_rejects_malformed_options(tmp_path, args, message):
    proc = run_calibrate(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


def test_calibrate_help_lists_its_options(tmp_path):
    proc = run_calibrate("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for option in ("--kv-endpoint", "--backend", "--input-lens", "--holdout", "--tolerance", "--no-verify"):
        assert option in proc.stdout


# -- the plugin's --emulator-profile FILE ------------------------------------------------------

SCENARIO = ("name: s\nphase: prefill\nmatrix:\n  backend: [none]\n  input_len: [300]\n  concurrency: [1]\n"
            "  output_len: [2]\nnum_prompts: 3\ntrials: 2\n")


def test_plugin_runs_the_emulator_with_a_profile_file(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "s.yaml").write_text(SCENARIO)
    write_profile_file(pytester.path / "fitted.json", TRUTH, {"note": "from calibrate"})
    pytester.makeini("[pytest]\nkvcache_emulator_profile = fitted.json\n")  # relative to the rootdir
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--update-baselines", "--kv-results-dir", "out",
                                           timeout=120)
    assert result.ret == 0, result.stdout.str()
    (path,) = pytester.path.joinpath("out").rglob("s[[]none-300-c1[]].json")
    data = json.loads(path.read_text())
    assert data["server"]["emulator_profile"].startswith("truth (file, ")
    # the profile's modeled prefill of 300 tokens, plus the emulator's own ~1-3 ms
    assert TRUTH.prefill_ms(300, 300) < data["median_ttft_ms"] < TRUTH.prefill_ms(300, 300) + 10


@pytest.mark.parametrize("value,message", [
    ("missing.json", ("*--emulator-profile / kvcache_emulator_profile = 'missing.json': profile file "
                      "*missing.json: no such file*calibrate*")),
    ("bad.json", "*kvcache_emulator_profile = 'bad.json': profile file *bad.json: cannot be read as JSON*"),
])
def test_plugin_rejects_a_bad_profile_file(pytester, value, message):
    pytester.path.joinpath("bad.json").write_text("{")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "--emulator-profile", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_plugin_help_names_profile_files(pytester):
    text = " ".join(pytester.runpytest_subprocess("--help").stdout.str().split())
    assert "--emulator-profile=NAME|FILE" in text and "'python -m pytest_kvcache calibrate'" in text
