"""The check of a warm round's answers against recomputation (outputs.py), alone."""

from __future__ import annotations

import math

import pytest

from pytest_kvcache.models import RequestRecord, RoundResult, ScenarioCase, TrialResult
from pytest_kvcache.outputs import (
    CONTROL_ROUND,
    OUTPUT_MARGIN,
    check_outputs,
    checks_outputs,
    first_difference,
    output_digest,
)


def _case(backend: str = "cpu", output_len: int = 16, rounds=("cold", "warm"), check=None) -> ScenarioCase:
    return ScenarioCase(scenario="prefill", path="s.yaml", phase="prefill", case_id="x", backend=backend,
                        input_len=1024, concurrency=4, output_len=output_len, num_prompts=4, dataset="random",
                        rounds=tuple(rounds), measure_round=rounds[-1], trials=1, seed=0, api="completions",
                        request_rate=math.inf, thresholds=(), check_outputs=check)


def _round(name: str, texts: list[str | None]) -> RoundResult:
    records = tuple(RequestRecord(index=i, prompt_len=10, output_len_requested=4, scheduled=0.0, start=0.0, end=1.0,
                                  chunk_times=(0.5,) if t is not None else (), chunk_tokens=(1,) if t is not None
                                  else (), error=None if t is not None else "HTTP 400", text=t or "",
                                  first_chars=len((t or "").split(" ")[0]) + 1)
                    for i, t in enumerate(texts))
    return RoundResult(round=name, records=records, duration=1.0, summary={}, max_loop_lag_ms=0.0)


def _trial(index: int, cold, warm, control) -> TrialResult:
    return TrialResult(index=index, rounds=(_round("cold", cold), _round("warm", warm)), measure_round="warm",
                       control=_round(CONTROL_ROUND, control) if control is not None else None)


ANSWERS = [f"answer {i} of the model" for i in range(20)]  # first token: "answer "


def test_first_difference_and_digest():
    assert first_difference("abc", "abc") is None
    assert first_difference("abcd", "abXd") == 2
    assert first_difference("abc", "abcdef") == 3
    assert output_digest("x") != output_digest("y") and len(output_digest("x")) == 16


def test_honest_tier_passes():
    check = check_outputs(_case(), "cpu", [_trial(0, ANSWERS, ANSWERS, ANSWERS), _trial(1, ANSWERS, ANSWERS, ANSWERS)])
    assert check.status == "passed" and check.tier["warm"].compared == 40 and check.control.compared == 40
    assert check.p_value == pytest.approx(1.0)


def test_a_corrupting_tier_fails_naming_prompts_positions_and_the_control():
    warm = [a if i % 2 else a[:2] + "X" + a[3:] for i, a in enumerate(ANSWERS)]
    check = check_outputs(_case(), "cpu", [_trial(0, ANSWERS, warm, ANSWERS)])
    assert check.failed
    assert check.tier["warm"].first_token_rate == 0.5 and check.control.rate == 0.0 and check.p_value < 0.01
    assert "10 of 20 warm-round answers start with another token" in check.reason
    assert "0 of 20 in the control recomputation" in check.reason
    assert "trial 1 prompt 0 (from character 2)" in check.reason and "trial 1 prompt 2" in check.reason


def test_late_near_ties_of_a_split_prefill_are_reported_not_failed():
    # an honest tier on a real engine: a few answers part from the recomputation late on
    # (the prompt's tail computed apart from its loaded prefix); the first token agrees
    warm = [a + " then more" if i % 4 == 0 else a for i, a in enumerate(ANSWERS)]
    check = check_outputs(_case(), "cpu", [_trial(0, ANSWERS, warm, ANSWERS)])
    assert check.status == "passed" and check.tier["warm"].rate == 0.25 and check.tier["warm"].first_token == 0
    assert check.to_dict()["tier"]["warm"]["requests"][0]["first_token"] is False


def test_divergence_the_control_shows_too_is_not_the_tier():
    # an engine whose answers change with batch shapes: the control differs as often as the tier
    shaky = ["!" + a if i % 4 == 0 else a for i, a in enumerate(ANSWERS)]
    check = check_outputs(_case(), "cpu", [_trial(0, ANSWERS, shaky, shaky)])
    assert check.status == "passed" and check.tier["warm"].rate == check.control.rate == 0.25


def test_a_small_excess_within_the_margin_passes():
    # 1 of 20 more than the control: below the practical margin whatever the p-value
    warm = ["?" + ANSWERS[0]] + ANSWERS[1:]
    check = check_outputs(_case(), "cpu", [_trial(0, ANSWERS, warm, ANSWERS)])
    assert check.tier["warm"].rate - check.control.rate <= OUTPUT_MARGIN and check.status == "passed"


def test_a_check_that_cannot_be_made_never_looks_like_a_pass():
    refused = check_outputs(_case(), "cpu", [_trial(0, ANSWERS, ANSWERS, [None] * 20)])
    assert refused.status == "unchecked" and "cache_salt" in refused.reason
    nothing = check_outputs(_case(), "cpu", [_trial(0, [None] * 20, ANSWERS, ANSWERS)])
    assert nothing.status == "unchecked"


def test_what_has_nothing_to_check_says_why():
    none = check_outputs(_case(backend="none"), "none", [_trial(0, ANSWERS, ANSWERS, None)])
    assert none.status == "not_applicable" and "backend none has no tier" in none.reason
    cold_only = check_outputs(_case(rounds=("cold",)), "cpu", [])
    assert cold_only.status == "not_applicable" and "rounds ['cold']" in cold_only.reason


@pytest.mark.parametrize(("output_len", "scenario", "option", "backend", "expected"), [
    (16, None, None, "cpu", True),     # default: answers longer than one token
    (1, None, None, "cpu", False),     # one token: off by default
    (1, True, None, "cpu", True),      # the scenario turns it on
    (16, False, None, "cpu", False),   # ... or off
    (16, True, False, "cpu", False),   # the option wins
    (1, False, True, "cpu", True),
    (16, True, True, "none", False),   # nothing to check on none
])
def test_when_outputs_are_checked(output_len, scenario, option, backend, expected):
    assert checks_outputs(_case(backend=backend, output_len=output_len, check=scenario), backend, option) is expected
