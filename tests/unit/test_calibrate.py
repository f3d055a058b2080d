"""Calibration: the fit, profile files, and ``python -m pytest_kvcache calibrate`` end to end
against an emulator whose profile is the truth (the real vLLM stack: tests/real_stack)."""

from __future__ import annotations

import dataclasses

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
from pytest_kvcache.emulator.costmodel import attended_pairs
from pytest_kvcache.emulator.profile_file import (
    ProfileFileError,
    profile_label,
    read_profile_file,
    write_profile_file,
)
from pytest_kvcache.models import RequestRecord, RoundResult
from pytest_kvcache.workloads import Prompt
from helpers.calibrate import TRUTH

PLAN = CalibrationPlan(input_lens=(300, 700, 1300, 2600), holdout_lens=(1800,), backend="cpu", prompts=4)


def synthetic(profile, plan: CalibrationPlan) -> Measurements:
    points = [LengthPoint(n, r, predict_ttft_ms(profile, plan.backend, n, r, plan.chunk_size), (),
                          n in plan.holdout_lens)
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
