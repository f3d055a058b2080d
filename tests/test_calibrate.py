"""Calibration: the fit, profile files, and ``python -m pytest_kvcache calibrate`` end to end
against an emulator whose profile is the truth (the real vLLM stack: tests/real_stack)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kvcache.calibrate import (
    CalibrationError,
    CalibrationPlan,
    DecodePoint,
    LengthPoint,
    Measurements,
    check_profile,
    fit_profile,
    predict_ttft_ms,
)
from pytest_kvcache.emulator.__main__ import parse_settings
from pytest_kvcache.emulator.costmodel import PROFILES, attended_pairs
from pytest_kvcache.emulator.profile_file import (
    ProfileFileError,
    profile_label,
    read_profile_file,
    write_profile_file,
)
from pytest_kvcache.models import RequestRecord, RoundResult
from pytest_kvcache.servers import ServerPool, ServerSettings
from pytest_kvcache.workloads import Prompt

#: A profile with large, distinct coefficients: its TTFTs dwarf the emulator's own overhead.
TRUTH = dataclasses.replace(
    PROFILES["quick"], name="truth", time_scale=1.0, kv_bytes_per_token=4096, prefill_base_ms=10.0,
    prefill_ms_per_token=0.01, prefill_ms_per_token_sq=0.012, lookup_ms=2.0, store_base_ms=0.0,
    store_fraction=0.0, decode_base_ms=3.0, decode_ms_per_running_seq=0.25,
    bandwidth_gbps={**PROFILES["quick"].bandwidth_gbps, "cpu": 0.5})
PLAN = CalibrationPlan(input_lens=(300, 700, 1300, 2600), holdout_lens=(1800,), backend="cpu", prompts=4)


def synthetic(profile, plan: CalibrationPlan) -> Measurements:
    points = [LengthPoint(n, r, predict_ttft_ms(profile, plan.backend, n, r, plan.chunk_size), (), n in plan.holdout_lens)
              for n in (*plan.input_lens, *plan.holdout_lens) for r in plan.rounds]
    decode = [DecodePoint(c, profile.itl_ms(c)) for c in (1, plan.decode_concurrency)]
    return Measurements(tuple(points), tuple(decode))


def test_fit_recovers_the_profile_that_made_the_points():
    fitted = fit_profile(synthetic(TRUTH, PLAN), PLAN, name="fit", kv_bytes_per_token=4096)
    for field in ("prefill_base_ms", "prefill_ms_per_token", "prefill_ms_per_token_sq", "lookup_ms",
                  "decode_base_ms", "decode_ms_per_running_seq"):
        assert getattr(fitted, field) == pytest.approx(getattr(TRUTH, field), rel=1e-6), field
    assert fitted.bandwidth_gbps["cpu"] == pytest.approx(0.5, rel=1e-6)
    assert fitted.scheduler == "fifo" and fitted.time_scale == 1.0 and fitted.store_fraction == 0.0
    checks = check_profile(fitted, synthetic(TRUTH, PLAN), PLAN)
    assert [(c.input_len, c.round) for c in checks] == [(1800, "cold"), (1800, "warm")]
    assert all(c.predicted_error < 1e-9 and c.passes(0.01) for c in checks)


def test_warm_tail_attends_the_whole_context():
    # a warm request computes its uncached tail over the whole context: more pairs per token than cold
    assert attended_pairs(1000, 1000) == 1000 * 1001 / 2
    assert attended_pairs(16, 10_000) == pytest.approx(16 * 10_000 - 16 * 15 / 2)
    assert predict_ttft_ms(TRUTH, "cpu", 1800, "warm", 256) < predict_ttft_ms(TRUTH, "cpu", 1800, "cold", 256)


def test_fit_weighs_every_length_alike():
    # one noisy long point must not buy its fit with a large relative error at the short ones
    meas = synthetic(TRUTH, dataclasses.replace(PLAN, backend="none"))
    points = [dataclasses.replace(p, median_ttft_ms=p.median_ttft_ms * (1.1 if p.input_len == 2600 else 1.0))
              for p in meas.points]
    plan = dataclasses.replace(PLAN, backend="none")
    fitted = fit_profile(Measurements(tuple(points)), plan, name="fit", kv_bytes_per_token=4096)
    for p in points:
        if not p.held_out and p.input_len < 2600:
            assert predict_ttft_ms(fitted, "none", p.input_len, "cold", 256) == pytest.approx(p.median_ttft_ms,
                                                                                              rel=0.1)


@pytest.mark.parametrize("kwargs,message", [
    ({"input_lens": (300, 600)}, "at least 3 different lengths"),
    ({"holdout_lens": (600,)}, "must not also be fitted"),
    ({"backend": "mooncake"}, "the emulator models"),
    ({"backend": "cpu", "input_lens": (200, 600, 900)}, "exceed the chunk size"),
    ({"prompts": 2}, "--prompts >= 3"),
    ({"tolerance": 1.5}, "0 < --tolerance < 1"),
])
def test_plan_rejects_what_cannot_be_fitted(kwargs, message):
    with pytest.raises(CalibrationError, match=message):
        CalibrationPlan(**{"input_lens": (300, 600, 1200), **kwargs})


# -- profile files -----------------------------------------------------------------------------


def test_profile_file_round_trip_and_label(tmp_path):
    path = write_profile_file(tmp_path / "p.json", TRUTH, {"note": "x"})
    profile, record = read_profile_file(path)
    assert profile == TRUTH and record == {"note": "x"}
    label = profile_label(str(path))
    assert label.startswith("truth (file, ") and profile_label("quick") == "quick"
    write_profile_file(path, dataclasses.replace(TRUTH, prefill_base_ms=11.0), {})
    assert profile_label(str(path)) != label  # a refitted file is another profile for the fingerprint


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("{not json", "cannot be read as JSON"),
    ('{"kind": "other", "schema_version": 1}', "not an emulator profile"),
    ('{"kind": "pytest-kvcache emulator profile", "schema_version": 99, "profile": {"name": "x"}}',
     "schema_version 99"),
    ('{"kind": "pytest-kvcache emulator profile", "schema_version": 1, "profile": {"name": "quick"}}',
     "built-in profile"),
    ('{"kind": "pytest-kvcache emulator profile", "schema_version": 1, "profile": {"name": "x", "bogus": 1}}',
     "unknown profile field 'bogus'"),
    (('{"kind": "pytest-kvcache emulator profile", "schema_version": 1, '
      '"profile": {"name": "x", "prefill_base_ms": -1}}'), "negative times"),
])
def test_bad_profile_files_name_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProfileFileError, match=message) as info:
        read_profile_file(path)
    assert str(path) in str(info.value)


def test_emulator_takes_a_profile_file(tmp_path, capsys):
    path = write_profile_file(tmp_path / "p.json", TRUTH, {})
    settings, _ = parse_settings(["--profile", str(path), "--config-json", '{"decode_base_ms": 4}'])
    assert settings.profile.name == "truth" and settings.profile.prefill_base_ms == 10.0
    assert settings.profile.decode_base_ms == 4.0
    with pytest.raises(SystemExit):
        parse_settings(["--profile", str(tmp_path / "missing.json")])
    assert "missing.json: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--profile", "no-such-name"])
    assert "or the path of a profile file" in capsys.readouterr().err


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


def _fake_round(ttft_s: float, invalid: str | None, round_name: str, n: int) -> RoundResult:
    records = tuple(RequestRecord(index=i, prompt_len=n, output_len_requested=4, scheduled=0.0, start=0.0,
                                  end=ttft_s + 0.01, chunk_times=(ttft_s, ttft_s + 0.01), chunk_tokens=(1, 1))
                    for i in range(3))
    return RoundResult(round=round_name, records=records, duration=1.0, summary={"median_itl_ms": 10.0},
                       max_loop_lag_ms=0.0, invalid_reason=invalid)


def test_a_round_the_guard_rejects_is_measured_again_with_new_prompts(monkeypatch):
    import asyncio

    from pytest_kvcache import calibrate as C

    built, spoiled = [], {"left": 2}

    async def fake_prompts(codec, *, input_len, num_prompts, trial, **_):
        built.append((input_len, trial))
        return [Prompt(text=f"{input_len}-{trial}", input_len=input_len, output_len=4)] * num_prompts

    async def fake_run_round(pool, spec, prompts, round_name, **_):
        n = prompts[0].input_len
        if n == 700 and round_name == "cold" and spoiled["left"] and not prompts[0].text.endswith("-900"):
            spoiled["left"] -= 1
            return _fake_round(0.5, "the client's event loop lagged 33 ms", round_name, n)
        return _fake_round(n / 1e5, None, round_name, n)

    monkeypatch.setattr(C, "build_prompts", fake_prompts)
    monkeypatch.setattr(C, "run_round", fake_run_round)
    lines: list[str] = []
    plan = CalibrationPlan(input_lens=(300, 700, 1300), prompts=3)
    meas = asyncio.run(C.measure("http://127.0.0.1:9", "m", lambda client: None, plan, progress=lines.append))
    assert {p.input_len: p.median_ttft_ms for p in meas.points} == pytest.approx({300: 3.0, 700: 7.0, 1300: 13.0})
    trials = [trial for n, trial in built if n == 700]
    # the warm-up's own prompts, then each attempt (and the second pass) new ones, never a spoiled round's
    assert trials == [900, 0, 1000, 2000, 1]
    # two passes, up the lengths then down, so a drifting machine slows every length alike
    assert [n for n, trial in built if trial in (0, 1)] == [300, 700, 1300, 1300, 700, 300]
    assert [n for n, trial in built if trial == 900] == [300, 700, 1300]  # every length warmed up first
    assert {len(p.ttfts_ms) for p in meas.points} == {6}  # 3 prompts: 2 in pass 1, 1 in pass 2, 3 records each
    assert sum("700 tokens (pass 1): not trustworthy" in line for line in lines) == 2

    spoiled["left"] = 3
    with pytest.raises(CalibrationError, match="rejected 3 attempts .*lagged 33 ms.*quieter machine"):
        asyncio.run(C.measure("http://127.0.0.1:9", "m", lambda client: None, plan))


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
