"""The answers check (issue 16) against the real stack: vLLM's CPU build, LMCache's
multi-process server and a real redis-server as its L2.

Each pytester session runs ``pytest --kv-server vllm`` on a scenario whose answers are
16 greedy tokens (so the runner adds a control round and compares the warm answers with
the cold round's), with a ``conftest.py`` implementing ``pytest_kvcache_after_round``.

After each trial's cold round, that hook makes the warm round read from Redis, not from
LMCache's L1 (DRAM) copy: it waits until LMCache's store controller has copied the
cold round's chunks from L1 to Redis (it does so asynchronously, and keeps the L1 copy:
store policy ``default``), then clears L1 through the server's documented HTTP API
(``POST /cache/clear``, tier l1). On a lookup LMCache serves what L1 holds and loads
only the rest from L2 (``DefaultPrefetchPolicy.plan_load``), so every warm hit is then a
load from Redis; the hook reads LMCache's own ``lookup_hit_l1`` / ``lookup_hit_l2``
counters around the warm round to prove it.

- honest: nothing else; the item passes and its JSON says ``outputs.status: passed``.
- corrupt: before clearing L1, the hook also flips the sign of every bf16 value LMCache
  wrote to Redis (the values are the raw KV bytes of a chunk, no header; their length is
  kept), so the warm round loads wrong KV; the item fails with "wrong outputs from the
  tier" and nothing is stored as a baseline.

Runtimes on 2 cores: about 2 minutes per session (LMCache's server about 30 s to start, vLLM
about 50 s, the rounds about 50 s), 4-5 minutes for the file.
"""

from __future__ import annotations

import json
import re
import time

import pytest

pytest_plugins = ("pytester",)

NUM_PROMPTS = 8
TRIALS = 2

THRESHOLDS = "thresholds:\n  median_ttft_ms: {direction: lower, threshold: 10%}\n"

#: The pytester project's conftest.py: the hook, a raw RESP client (this interpreter has
#: no redis package) and a reader of LMCache's Prometheus text. MODE: honest or corrupt.
HOOK_CONFTEST = r'''
import json
import re
import socket
import time
import urllib.request
from pathlib import Path

MODE = "{mode}"
LOG = Path(__file__).with_name("hook-log.jsonl")
CONTROL_MARK = b"kvcache-control"  # the control round's cache_salt ends its keys: never touched
_corrupted = set()


class Resp:
    """Just enough of the Redis protocol: commands as arrays of bulk strings."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self):
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError("redis: " + rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.reader.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"redis: unexpected reply {{line!r}}")

    def keys(self):
        cursor, found = b"0", []
        while True:
            cursor, batch = self.call("SCAN", cursor, "COUNT", 1000)
            found += batch
            if cursor == b"0":
                return sorted(set(found))

    def close(self):
        self.sock.close()


def metrics(port):
    """LMCache's Prometheus text, summed over labels: name -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{{port}}/metrics", timeout=10).read().decode()
    out = {{}}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{{.*\}})?\s+(\S+)", line)
        if m and m.group(1).startswith("lmcache_mp_"):
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
            except ValueError:
                pass
    return out


def _one(values, *parts, exclude=()):
    return sum(v for k, v in values.items() if all(p in k for p in parts) and not any(x in k for x in exclude))


def settle(redis, http_port, timeout=90.0):
    """Wait until LMCache has copied the round's chunks to Redis (its store controller
    runs asynchronously): the key count unchanged for 2 s and no L2 store in flight."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        n = redis.call("DBSIZE")
        inflight = _one(metrics(http_port), "inflight_l2_stores")
        if n != last:
            last, since = n, time.monotonic()
        elif n and not inflight and time.monotonic() - since >= 2.0:
            return n
        time.sleep(0.25)
    raise RuntimeError(f"LMCache's copies to Redis did not settle in {{timeout:.0f}} s (keys: {{last}})")


FLIP = bytes(b ^ 0x80 for b in range(256))


def corrupt(redis):
    """Flip the sign bit of every bf16 value (the high byte, little-endian) of each new
    key; the length is kept, so LMCache's GET (it checks the size) accepts it."""
    done, sizes = 0, set()
    for key in redis.keys():
        if key in _corrupted or CONTROL_MARK in key:
            continue
        value = bytearray(redis.call("GET", key))
        value[1::2] = bytes(value[1::2]).translate(FLIP)
        assert redis.call("SETRANGE", key, 0, bytes(value)) == len(value)
        _corrupted.add(key)
        sizes.add(len(value))
        done += 1
    return done, sorted(sizes)


def clear_l1(http_port, timeout=30.0):
    """LMCache's POST /cache/clear (tier l1), until its L1 holds nothing."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"http://127.0.0.1:{{http_port}}/cache/clear",
                                         data=json.dumps({{"tier": "l1", "force": False}}).encode(),
                                         headers={{"Content-Type": "application/json"}}, method="POST")
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        used = _one(metrics(http_port), "l1_memory_usage_bytes")
        if not used or time.monotonic() > deadline:
            return answer, used
        time.sleep(0.5)


_before_warm = {{}}


def pytest_kvcache_after_round(backend, trial, round_name, server):
    if backend != "redis":
        return
    ports = server.ports
    record = {{"trial": trial, "round": round_name, "mode": MODE}}
    if round_name == "cold":
        redis = Resp(ports["redis"])
        try:
            record["l1_bytes_before_clear"] = _one(metrics(ports["lmcache_http"]), "l1_memory_usage_bytes")
            record["redis_keys"] = settle(redis, ports["lmcache_http"])
            if MODE == "corrupt":
                record["corrupted_keys"], record["value_sizes"] = corrupt(redis)
        finally:
            redis.close()
        record["clear"], record["l1_bytes_after_clear"] = clear_l1(ports["lmcache_http"])
        _before_warm[trial] = metrics(ports["lmcache_http"])
    elif round_name == "warm":
        after = metrics(ports["lmcache_http"])
        before = _before_warm.pop(trial, {{}})
        record["delta"] = {{k: v - before.get(k, 0.0) for k, v in after.items()
                           if "total" in k and v - before.get(k, 0.0)}}
    with LOG.open("a") as f:
        f.write(json.dumps(record) + "\n")
'''


def run_answers(pytester: pytest.Pytester, stack, scenario, backends: list[str], mode: str,
                timeout: float = 900) -> pytest.RunResult:
    pytester.makeini("[pytest]\n")  # this folder is the rootdir and its ini the config
    pytester.makeconftest(HOOK_CONFTEST.format(mode=mode))
    pytester.path.joinpath("scenarios").mkdir(exist_ok=True)
    pytester.path.joinpath("scenarios", "answers.yaml").write_text(scenario(
        "answers", backends, output_len=16, num_prompts=NUM_PROMPTS, trials=TRIALS, extra=THRESHOLDS))
    # --rootdir: the option values that are paths (model, interpreter) would move it to the repository
    return pytester.runpytest_subprocess(
        "scenarios", f"--rootdir={pytester.path}", "-p", "no:cacheprovider", "-v", "--kv-server", "vllm",
        "--model", stack.model, "--tokenizer", stack.model, "--kv-python", stack.python,
        "--kv-server-args=--enforce-eager --max-model-len 4096",
        "--update-baselines", "--baseline-dir", "bl", "--kv-results-dir", "out", timeout=timeout)


def item_json(pytester: pytest.Pytester, backend: str) -> dict:
    (path,) = pytester.path.joinpath("out", "answers").glob(f"answers[[]{backend}-*].json")
    return json.loads(path.read_text())


def hook_log(pytester: pytest.Pytester) -> list[dict]:
    path = pytester.path.joinpath("hook-log.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rounds(data: dict, name: str) -> list[dict]:
    return [t["rounds"][name] for t in data["trials"]]


def check_warm_rounds_read_redis(pytester: pytest.Pytester, mode: str) -> None:
    """The hook cleared L1 after every cold round, and every warm hit was a load from L2:
    LMCache's own counters over the warm round, and its log line for each lookup."""
    log = hook_log(pytester)
    colds = [r for r in log if r["round"] == "cold"]
    warms = [r for r in log if r["round"] == "warm"]
    assert [r["trial"] for r in colds] == list(range(TRIALS)) == [r["trial"] for r in warms], log
    for cold in colds:
        assert cold["redis_keys"] > 0 and cold["clear"]["status"] == "ok", cold
        assert cold["l1_bytes_before_clear"] > 0 and cold["l1_bytes_after_clear"] == 0, cold
        if mode == "corrupt":
            assert cold["corrupted_keys"] > 0, cold
    for warm in warms:
        delta = warm["delta"]
        l2 = sum(v for k, v in delta.items() if "lookup_hit_l2" in k and "keys" not in k)
        l1 = sum(v for k, v in delta.items() if "lookup_hit_l1" in k)
        assert l2 >= NUM_PROMPTS * 1792 * 0.5 and l1 == 0, delta
    # "Prefetch request completed (L1+L2): 7/7 retained keys (0 L1, 7 L2)": one per lookup that
    # hit (cold and control rounds hit nothing: new prompts, a fresh cache_salt)
    (server_log,) = pytester.path.joinpath("out", "logs").glob("lmcache_server-redis-*.log")
    hits = re.findall(r"retained keys \((\d+) L1, (\d+) L2\)", server_log.read_text())
    assert len(hits) == NUM_PROMPTS * TRIALS and all(l1 == "0" and int(l2) > 0 for l1, l2 in hits), hits


def check_telemetry(data: dict) -> None:
    """vLLM saw the warm rounds' hits as external (from LMCache), the cold rounds' none."""
    for warm in rounds(data, "warm"):
        assert warm["telemetry"]["external_hit_tokens"] >= NUM_PROMPTS * 1792 * 0.5, warm["telemetry"]
    for cold in rounds(data, "cold"):
        assert cold["telemetry"]["external_hit_tokens"] == 0, cold["telemetry"]


def describe(data: dict) -> str:
    out = data["outputs"]
    tier = out["tier"]["warm"]
    control = out["control"]
    return (f"tier (warm vs cold) first token {tier['first_token_differing']}/{tier['compared']}, anywhere "
            f"{tier['differing']}/{tier['compared']}; control (salted recomputation vs cold) first token "
            f"{control['first_token_differing']}/{control['compared']}, anywhere {control['differing']}/"
            f"{control['compared']}; p={out['p_value']}")


def test_honest_redis_tier_passes_the_answers_check(pytester, real_stack, redis_server_available, no_leftovers,
                                                    two_round_scenario):
    # ["cpu", "redis"] checks LMCache's L1 path too (about 2 minutes more: a second vLLM
    # start); its figures were the same as redis's (tier 2 of 16, control 0 of 16)
    start = time.monotonic()
    result = run_answers(pytester, real_stack, two_round_scenario, ["redis"], "honest")
    elapsed = time.monotonic() - start
    assert result.ret == 0, result.stdout.str()[-6000:]
    result.stdout.fnmatch_lines(["*answers[[]redis-2k-c1*] PASSED*"])
    data = item_json(pytester, "redis")
    out = data["outputs"]
    assert out["status"] == "passed", out
    assert out["tier"]["warm"]["compared"] == out["control"]["compared"] == NUM_PROMPTS * TRIALS, out
    assert pytester.path.joinpath("out", out["details"]).is_file()
    check_telemetry(data)
    check_warm_rounds_read_redis(pytester, "honest")
    assert [p.name for p in pytester.path.joinpath("bl").rglob("*.json")] == ["answers[redis-2k-c1].json"]
    print(f"honest redis: {describe(data)}; {elapsed:.0f} s; hook: {hook_log(pytester)}")


def test_corrupted_redis_values_fail_the_answers_check(pytester, real_stack, redis_server_available, no_leftovers,
                                                       two_round_scenario):
    start = time.monotonic()
    result = run_answers(pytester, real_stack, two_round_scenario, ["redis"], "corrupt")
    elapsed = time.monotonic() - start
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-6000:]
    result.stdout.fnmatch_lines(["*wrong outputs from the tier: * of 16 warm-round answers start with another "
                                 "token than the cold round's recomputation*"])
    data = item_json(pytester, "redis")
    assert data["outputs"]["status"] == "failed", data["outputs"]
    assert data["status"] == "failed" and "wrong outputs from the tier" in data["message"]
    check_telemetry(data)  # what was measured is kept in a failed item's JSON too
    check_warm_rounds_read_redis(pytester, "corrupt")
    stored = [p for p in pytester.path.joinpath("bl").rglob("*") if p.is_file()] if pytester.path.joinpath(
        "bl").exists() else []
    assert not stored, stored
    print(f"corrupted redis: {describe(data)}; {elapsed:.0f} s; hook: {hook_log(pytester)}")
