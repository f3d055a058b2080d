"""The emulator's tiers and seed profiles in-process: Redis URLs, KV bytes from a model's
config, the quick profile's numbers, and the waterfall tier; tests/integration/emulator runs
the emulator."""

from __future__ import annotations

import pytest

from pytest_kvcache.emulator.costmodel import (
    PROFILES,
    kv_bytes_per_token,
    make_profile,
    mla_kv_bytes_per_token,
)
from pytest_kvcache.emulator.prefix_cache import PrefixCache
from pytest_kvcache.emulator.tiers import make_tier
from pytest_kvcache._redis_url import parse_redis_url


# -- units: RESP client and redis tier -----------------------------------------------------
def test_parse_redis_url():
    assert parse_redis_url("redis://h:7000/2") == ("h", 7000, 2, None)
    assert parse_redis_url("redis://:pw@h") == ("h", 6379, 0, "pw")
    assert parse_redis_url("valkey://10.0.0.5") == ("10.0.0.5", 6379, 0, None)
    for bad in ("http://h:1", "h:6379", "redis://", "redis://h:port", "redis://h:1/db"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


# -- units: profiles -----------------------------------------------------------------------
def test_seed_profiles_kv_bytes_from_model_config():
    assert kv_bytes_per_token(28, 4, 128) == 57_344  # Qwen2.5-7B
    assert PROFILES["a100-qwen2.5-7b"].kv_bytes_per_token == 57_344
    assert PROFILES["rtx4090-qwen3-8b"].kv_bytes_per_token == 36 * 8 * 128 * 2 * 2 == 147_456
    assert PROFILES["h100-mistral-7b"].kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 131_072
    assert mla_kv_bytes_per_token(61, 512, 64) == 61 * 576 * 2 == 70_272
    assert PROFILES["h100x8-deepseek-v3"].kv_bytes_per_token == 70_272
    for name in ("a100-qwen2.5-7b", "rtx4090-qwen3-8b", "h100-mistral-7b", "h100x8-deepseek-v3"):
        p = PROFILES[name]
        assert p.scheduler == "batched" and p.time_scale == 1.0 and p.description
        bw = p.bandwidth_gbps
        assert bw["cpu"] > bw["disk"] > bw["redis"], name
    assert PROFILES["quick"].scheduler == "fifo"
    p = make_profile("quick", {"scheduler": "batched", "max_num_seqs": 4})
    assert p.scheduler == "batched" and p.max_num_seqs == 4
    for bad in ({"scheduler": "lifo"}, {"max_num_seqs": 0}, {"description": "x"}):
        with pytest.raises(ValueError):
            make_profile("quick", bad)


def test_quick_profile_numbers():
    """The quick profile's figures (the costmodel docstring's table): seed 001's shape at
    10k tokens, cold rounds and ``none`` as before the tiers were retuned."""
    q = PROFILES["quick"]
    assert round(q.ttft_model_ms("none", 10_000, 0, 0), 2) == 8.02
    assert round(q.ttft_model_ms("none", 100_000, 0, 0), 2) == 60.25
    assert round(q.ttft_model_ms("cpu", 10_000, 0, 9984), 2) == 8.29
    assert round(q.ttft_model_ms("cpu", 10_000, 9984, 0), 2) == 4.25
    assert round(q.ttft_model_ms("gds", 10_000, 9984, 0), 2) == 4.74
    assert round(q.ttft_model_ms("disk", 10_000, 9984, 0), 2) == 4.97
    assert round(q.ttft_model_ms("redis", 10_000, 9984, 0), 2) == 5.99
    assert round(q.ttft_model_ms("disk", 100_000, 99_840, 0), 2) == 22.24
    assert (q.decode_base_ms, q.decode_ms_per_running_seq, q.time_scale) == (5.0, 0.2, 0.02)
    assert (q.prefill_base_ms, q.prefill_ms_per_token, q.prefill_ms_per_token_sq) == (2.95, 5.0e-4, 1.46e-6)


# -- the waterfall tier (cpu over disk) ----------------------------------------------------
def test_waterfall_tier_demotes_to_disk_and_promotes_on_hit(tmp_path):
    tier = make_tier("waterfall", capacity_bytes=2 * 100, disk_path=str(tmp_path / "wf"),
                     lower_capacity_bytes=10 * 100)
    cache = PrefixCache(tier, chunk_size=4, kv_bytes_per_token=25, payload_scale=1.0)
    keys = cache.keys(list(range(16)))  # 4 chunks; RAM holds 2
    assert cache.store(keys) == 4
    assert [tier.where(k) for k in keys] == ["disk", "disk", "cpu", "cpu"]
    assert len(list((tmp_path / "wf").glob("*.kvchunk"))) == 2  # real files for the demoted
    assert len(tier) == 4 and cache.lookup(keys) == 4
    assert cache.load(keys) == (4, [])  # their true bytes, from the fastest holder
    # the hits promoted the first chunks back to RAM (LRU), demoting the others
    assert tier.where(keys[3]) == "cpu" and tier.where(keys[0]) == "disk"
    assert all(tier.contains(k) for k in keys)
    tier.clear()
    assert len(tier) == 0 and not list((tmp_path / "wf").glob("*.kvchunk"))
