"""Telemetry: metrics and log parsing per round, and the proof of hits (in plugin runs)."""

from __future__ import annotations

import pytest


pytest_plugins = ("pytester",)


# -- on the emulator, through the plugin -------------------------------------------------------------


EMULATED = """
name: hits
phase: prefill
matrix:
  backend: [{backends}]
  input_len: [{input_len}]
  concurrency: [2]
  output_len: [1]
dataset: random
num_prompts: 4
rounds: [cold, warm]
measure: warm
trials: 2
seed: 0
api: completions
thresholds:
  median_ttft_ms: {{direction: lower, threshold: 10%}}
"""


def _emulated(pytester, backends, input_len="1k", *args):
    pytester.path.joinpath("scenarios").mkdir(exist_ok=True)
    pytester.path.joinpath("scenarios", "hits.yaml").write_text(EMULATED.format(backends=backends,
                                                                                input_len=input_len))
    import uuid

    run = uuid.uuid4().hex[:8]
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--emulator-profile", "fixed",
                                         "--update-baselines", "--baseline-dir", f"bl-{run}",
                                         "--kv-results-dir", "out", *args, timeout=300)


def test_emulator_offload_hits_pass_and_none_shows_no_external_hits(pytester):
    result = _emulated(pytester, "none, cpu")
    assert result.ret == 0, result.stdout.str()
    import json

    data = json.loads(pytester.path.joinpath("out", "hits", "hits[cpu-1k-c2].json").read_text())
    warm = [t["rounds"]["warm"]["telemetry"] for t in data["trials"]]
    assert all(t["external_hit_tokens"] == 4 * 768 and t["log_hit_tokens"] == 4 * 768 for t in warm)


def test_emulator_with_offload_silently_disabled_is_caught(pytester):
    # a tier too small for one chunk: LMCache-style "Stored" lines, lookups, but nothing ever comes back
    result = _emulated(pytester, "cpu", "1k", "--kv-server-args=--cpu-size-gb 1e-9")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*trial 1 warm round of backend 'cpu' loaded 0 tokens from the offload tier, 0% of the 3072 expected*",
        "*likely cause: the connector was asked but found nothing*"])


def test_short_prompts_expect_no_hits_and_the_check_can_be_turned_off(pytester):
    assert _emulated(pytester, "cpu", "200", "--kv-server-args=--cpu-size-gb 1e-9").ret == 0
    assert _emulated(pytester, "cpu", "1k", "--kv-server-args=--cpu-size-gb 1e-9", "--kv-min-hit-ratio", "0").ret == 0
