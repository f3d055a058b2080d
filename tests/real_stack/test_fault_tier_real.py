"""A partial-loss tier on the real stack: LMCache's ``fault_inject`` L2 adapter around the
``disk`` tier's ``fs`` adapter (issue 17), beside ``none`` in the same session.

``--kv-lmcache 'fault_inject={"rate": 0.3, "seed": 7}'`` makes the multi-process server drop
about 30% of the disk tier's keys on load (a seeded hash of each key), and store with
``--l2-store-policy skip_l1`` so that warm loads go through the faulty adapter. LMCache
serves a prompt's chunks up to the first lost one (its prefix trim), so a warm round loads
about a third of what a healthy one does, and vLLM recomputes the rest. The item must:

- fail the hit check with the shortfall measured against what was asked, naming the
  rehearsal as its cause (not "the tier is too small");
- run and record every trial (the cost of the loss is the measurement): cold and warm
  TTFT beside ``none``'s, the overhead a missing chunk costs, measured on the real stack;
- never become a baseline, while ``none`` (no LMCache, no fault) does.

About 5 minutes on 2 cores (two vLLM starts, one LMCache server).
"""

from __future__ import annotations

import json
import statistics

import pytest

pytest_plugins = ("pytester",)

NUM_PROMPTS = 8
TRIALS = 2
#: whole 256-token chunks of 8 prompts of 2,000 tokens
EXPECTED_HIT_TOKENS = NUM_PROMPTS * 1792
FAULT = '{"rate": 0.3, "seed": 7}'



def _item(pytester: pytest.Pytester, backend: str) -> dict:
    (path,) = pytester.path.joinpath("out", "lossy").glob(f"lossy[[]{backend}-*].json")
    return json.loads(path.read_text())


def _medians(data: dict, round_name: str) -> list[float]:
    return [t["rounds"][round_name]["median_ttft_ms"] for t in data["trials"]]


def test_a_partial_loss_tier_is_measured_named_and_never_a_baseline(pytester, real_stack, no_leftovers,
                                                                   two_round_scenario):
    pytester.makeini("[pytest]\n")
    pytester.path.joinpath("scenarios").mkdir()
    pytester.path.joinpath("scenarios", "lossy.yaml").write_text(two_round_scenario(
        "lossy", ["none", "disk"], output_len=1, num_prompts=NUM_PROMPTS, trials=TRIALS))
    result = pytester.runpytest_subprocess(
        "scenarios", f"--rootdir={pytester.path}", "-p", "no:cacheprovider", "-v", "--kv-server", "vllm",
        "--model", real_stack.model, "--tokenizer", real_stack.model, "--kv-python", real_stack.python,
        "--kv-server-args=--enforce-eager --max-model-len 4096", f"--kv-lmcache=fault_inject={FAULT}",
        "--update-baselines", "--baseline-dir", "bl", "--kv-results-dir", "out", timeout=1200)
    text = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text[-6000:]
    result.stdout.fnmatch_lines(["*lossy[[]none-2k-c1[]] PASSED*", "*lossy[[]disk-2k-c1[]] FAILED*"])
    result.stdout.fnmatch_lines([
        f"*trial 1 warm round of backend 'disk' loaded * tokens from the offload tier, *% of the "
        f"{EXPECTED_HIT_TOKENS} expected*",
        f"*likely cause: LMCache setting fault_inject={FAULT} drops tier keys on purpose (a partial-loss "
        "rehearsal: the shortfall is the one asked for)*",
        "*(1 more warm rounds missed the same way)*"])

    lossy = _item(pytester, "disk")
    assert lossy["status"] == "failed" and len(lossy["trials"]) == TRIALS  # every trial measured
    hits = [t["rounds"]["warm"]["telemetry"]["external_hit_tokens"] for t in lossy["trials"]]
    assert all(0 < h < 0.9 * EXPECTED_HIT_TOKENS for h in hits), hits  # some chunks came back, not all
    for trial in lossy["trials"]:
        assert trial["rounds"]["cold"]["telemetry"]["external_hit_tokens"] == 0
        assert trial["rounds"]["warm"]["telemetry"]["lmcache_l1_hit_tokens"] == 0  # skip_l1: loads from L2
    (server_log,) = pytester.path.joinpath("out", "logs").glob("lmcache_server-disk-*.log")
    log = server_log.read_text()
    assert "FaultInjectL2Adapter ACTIVE (rate=0.300 seed=7" in log and "--l2-store-policy skip_l1" in log

    # the healthy none item is a baseline; the rehearsal never is
    assert [p.name for p in pytester.path.joinpath("bl").rglob("*.json")] == ["lossy[none-2k-c1].json"]

    plain = _item(pytester, "none")
    figures = {"none": {"cold": _medians(plain, "cold"), "warm": _medians(plain, "warm")},
               "disk lossy": {"cold": _medians(lossy, "cold"), "warm": _medians(lossy, "warm")}}
    overhead = statistics.median(_medians(lossy, "warm")) / statistics.median(_medians(plain, "warm"))
    print(f"partial-loss tier: warm hit tokens {hits} of {EXPECTED_HIT_TOKENS} asked "
          f"({statistics.mean(hits) / EXPECTED_HIT_TOKENS:.0%}); median TTFT per trial (ms) {figures}; "
          f"warm TTFT lossy disk / none = {overhead:.2f}")
